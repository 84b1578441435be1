"""The Keeper that owns in-memory snapshots: on the driver's node, and restarted
empty when its process dies, so a lost snapshot is reported, not fetched forever."""
import os
import signal
import threading
import time

import pytest

from tests.e2e.procs import session_actor_pids


def test_the_keeper_is_on_the_drivers_node_and_comes_back_empty(ray_address):
    import ray

    from cluster.keeper import start_keeper

    keeper = start_keeper()
    assert ray.get(keeper.node.remote()) == ray.get_runtime_context().get_node_id()
    key = ray.get(keeper.stash.remote("k", {"model": b"x"}))
    assert ray.get(ray.get(keeper.fetch.remote([key]))[0][0]) == {"model": b"x"}
    ray.kill(keeper, no_restart=False)  # its process dies (as if OOM-killed)
    for _ in range(100):  # ray.kill returns before the process is gone: a fetch may still be answered
        try:
            ray.get(keeper.fetch.remote([key]), timeout=30)
        except ray.exceptions.RayError:  # KeyError once back, or the actor error while it restarts
            break
        time.sleep(0.1)
    else:
        pytest.fail("the killed Keeper still held the snapshot")
    for _ in range(100):  # back, empty, and taking snapshots again
        try:
            assert ray.get(keeper.stash.remote("k2", 1), timeout=30) == "k2"
            break
        except ray.exceptions.RayActorError:
            time.sleep(0.1)
    else:
        pytest.fail("the Keeper did not come back")
    ray.kill(keeper)


@pytest.mark.slow
def test_a_lost_snapshot_falls_back_to_the_newest_checkpoint(ray_address, tmp_path):
    from tests.e2e.test_failures import _run

    killed = []

    def kill_the_keeper_once_a_rank_dies():
        seen, deadline = False, time.time() + 180
        while time.time() < deadline:
            workers = session_actor_pids("RankWorker")
            seen = seen or len(workers) == 2
            if seen and len(workers) < 2:  # rank 1 was killed: the group restarts after the backoff
                for pid in session_actor_pids("Keeper"):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                return
            time.sleep(0.1)

    threading.Thread(target=kill_the_keeper_once_a_rank_dies, daemon=True).start()
    result = _run(tmp_path, "lost", ray_address, checkpoint_every=5, inject=["kill:rank=1,step=8"],
                  failure={"max_failures": 1, "snapshot_every": 2, "backoff_s": 3, "heal": False})  # restores the snapshot
    ev = result.events
    assert killed
    lost = ev[ev.kind == "snapshot_lost"]
    assert len(lost) == 1 and lost.step.iloc[0] == 6 and "SnapshotLost" in lost.detail.iloc[0]
    restarts = ev[ev.kind == "restart"]
    assert list(restarts.step) == [6, 5] and "checkpoint" in restarts.detail.iloc[-1]
    assert (ev.kind == "failure:died").sum() == 1  # the lost snapshot is not counted against max_failures=1
