"""What a heal in place does on the ranks' process groups: the survivors' abort
releases a rank waiting in a collective, and the state goes to every rank as tensors."""
import threading
import time

import pytest
import torch
from torch import nn

from tests.ranks import run_ranks


def stuck_backward(rank: int, world: int, abort_first: bool) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    from cluster import Comm
    from cluster.dist import abort_process_group
    from orchestrator.controller import is_echo
    from strategies.ddp import sum_then_divide_hook

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(6)])
    ddp = DistributedDataParallel(model, bucket_cap_mb=0.01)  # several buckets: some queue behind the first
    ddp.register_comm_hook((Comm(), world), sum_then_divide_hook)
    if rank == 1:  # the peer that stops answering (alive, its group open): rank 0's all-reduces wait
        time.sleep(6)
        return {}
    out: dict = {}

    def backward() -> None:
        try:
            ddp(torch.randn(4, 64)).sum().backward()
            out["error"] = None
        except RuntimeError as e:
            out["error"] = str(e)

    job = threading.Thread(target=backward, daemon=True)
    t = time.perf_counter()
    if abort_first:  # the abort came while this rank was still behind, before its backward
        abort_process_group(destroy=False)
        job.start()
    else:
        job.start()
        time.sleep(1.0)  # the all-reduces are launched and wait on rank 1
        t = time.perf_counter()
        abort_process_group(destroy=False)
    job.join(timeout=5)
    out["left_s"] = time.perf_counter() - t if not job.is_alive() else None
    out["echo"] = out.get("error") is not None and is_echo(out["error"])
    return out


@pytest.mark.parametrize("abort_first", [False, True])
def test_abort_releases_a_backward_waiting_on_a_lost_peer(tmp_path, abort_first):
    """A rank whose DDP backward waits on a peer that never answers leaves it when its
    groups are aborted, at once, not at the collective timeout: an aborted gloo group
    drops queued work (and work launched after it) without completing the futures DDP waits on."""
    got = run_ranks(stuck_backward, 2, tmp_path, abort_first, timeout_s=60)[0]
    assert got["left_s"] is not None and got["left_s"] < 5, got
    assert got["error"] and got["echo"], got  # read as the echo of a lost peer: the rank waits for a re-form


def _tree(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(3, 4, generator=g).t(),  # not contiguous
                      "b": torch.randn(5, dtype=torch.float64, generator=g)},
            "optim": {"state": {0: {"step": torch.tensor(7.0), "mask": torch.rand(6, generator=g) > 0.5}},
                      "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "params": [0]}]},
            "rng": torch.randint(0, 255, (16,), dtype=torch.uint8, generator=g), "step": 12, "name": "x"}


def broadcast_from_1(rank: int, world: int, to: list[int] | None = None) -> dict:
    from cluster.dist import broadcast_tree

    return broadcast_tree(_tree(seed=0) if rank == 1 else None, src=1, device=torch.device("cpu"), to=to)


@pytest.mark.parametrize("to", [None, [3, 0]], ids=["all", "point-to-point"])
def test_broadcast_tree_gives_every_rank_the_source_state(tmp_path, to):
    """To every rank, or (``to``) to some: a heal sends the state to the newcomers only."""
    want = _tree(seed=0)
    results = run_ranks(broadcast_from_1, 4, tmp_path, to)
    if to is not None:
        assert results[2] is None, results[2]  # neither source nor receiver
        results = [results[r] for r in (0, 1, 3)]
    for got in results:
        assert got["step"] == 12 and got["name"] == "x"
        assert got["optim"]["param_groups"] == want["optim"]["param_groups"]
        for a, b in [(got["model"]["w"], want["model"]["w"]), (got["model"]["b"], want["model"]["b"]),
                     (got["optim"]["state"][0]["step"], want["optim"]["state"][0]["step"]),
                     (got["optim"]["state"][0]["mask"], want["optim"]["state"][0]["mask"]), (got["rng"], want["rng"])]:
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def stuck_wait(rank: int, world: int, blocking: bool) -> dict:
    from cluster import Comm
    from cluster.dist import abort_process_group

    comm = Comm()
    if rank == 1:  # never joins: rank 0's all-gather waits
        time.sleep(6)
        return {}
    abort_process_group(destroy=False)  # the abort came while this rank was behind, before its call
    out: dict = {}

    def wait() -> None:
        try:  # FSDP's kind of call: launched async and waited on, or blocking
            work = comm.all_gather_single(torch.empty(8), torch.ones(4), async_op=not blocking)
            if not blocking:
                work.wait()
            out["error"] = None
        except RuntimeError as e:
            out["error"] = str(e)

    job = threading.Thread(target=wait, daemon=True)
    job.start()
    job.join(timeout=5)
    return {"left": not job.is_alive(), "error": out.get("error")}


@pytest.mark.parametrize("blocking", [False, True])
def test_a_collective_launched_after_the_abort_fails_at_once(tmp_path, blocking):
    got = run_ranks(stuck_wait, 2, tmp_path, blocking, timeout_s=60)[0]
    assert got["left"] and got["error"], got


def blocked_when_aborted(rank: int, world: int, heals: bool) -> dict:
    from cluster import Comm
    from cluster.dist import abort_process_group, stop_compute_on_abort

    if heals:
        stop_compute_on_abort()
    comm = Comm()
    if rank == 1:  # never joins: rank 0's blocking all-gather waits
        time.sleep(8)
        return {}
    out: dict = {}

    def wait() -> None:
        try:  # FSDP's blocking all-gather, in progress when the abort comes
            comm.all_gather_single(torch.empty(8), torch.ones(4))
            out["error"] = None
        except RuntimeError as e:
            out["error"] = str(e)

    job = threading.Thread(target=wait, daemon=True)
    job.start()
    time.sleep(0.5)
    abort_process_group(destroy=False)  # the driver's abort, from the actor's control thread
    job.join(timeout=3)
    return {"left": not job.is_alive(), "error": out.get("error")}


def test_a_blocking_collective_in_progress_fails_at_the_abort_in_a_rank_that_heals(tmp_path):
    """A survivor of an FSDP heal was found (py-spy) in a blocking all-gather begun before
    the abort, waiting for its peers until the collective timeout: in a process that heals
    in place, Comm's blocking gloo calls wait where the abort reaches them."""
    got = run_ranks(blocked_when_aborted, 2, tmp_path, True, timeout_s=60)[0]
    assert got["left"] and got["error"] and "aborted" in got["error"], got
