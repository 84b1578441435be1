"""The Keeper that owns in-memory snapshots: on the driver's node, and restarted
empty when its process dies, so a lost snapshot is reported, not fetched forever."""
import time

import pytest


def test_the_keeper_is_on_the_drivers_node_and_comes_back_empty(ray_address):
    import ray

    from cluster.worker_group import start_keeper

    keeper = start_keeper()
    assert ray.get(keeper.node.remote()) == ray.get_runtime_context().get_node_id()
    key = ray.get(keeper.stash.remote("k", {"model": b"x"}))
    assert ray.get(ray.get(keeper.fetch.remote([key]))[0][0]) == {"model": b"x"}
    ray.kill(keeper, no_restart=False)  # its process dies (as if OOM-killed)
    with pytest.raises(ray.exceptions.RayError):  # KeyError once back, or the actor error while it restarts
        ray.get(keeper.fetch.remote([key]))
    for _ in range(100):  # back, empty, and taking snapshots again
        try:
            assert ray.get(keeper.stash.remote("k2", 1), timeout=30) == "k2"
            break
        except ray.exceptions.RayActorError:
            time.sleep(0.1)
    else:
        pytest.fail("the Keeper did not come back")
    ray.kill(keeper)
