"""A rank whose DDP backward waits on a peer that never answers leaves it when its
process groups are aborted (a heal's abort), at once, not at the collective timeout:
an aborted gloo group drops queued work without completing the futures DDP waits on."""
import threading
import time

import torch
from torch import nn

from tests.ranks import run_ranks


def stuck_backward(rank: int, world: int) -> dict:
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
    job.start()
    time.sleep(1.0)  # the all-reduces are launched and wait on rank 1
    t = time.perf_counter()
    abort_process_group(destroy=False)
    job.join(timeout=5)
    out["left_s"] = time.perf_counter() - t if not job.is_alive() else None
    out["echo"] = out.get("error") is not None and is_echo(out["error"])
    return out


def test_abort_releases_a_backward_waiting_on_a_lost_peer(tmp_path):
    got = run_ranks(stuck_backward, 2, tmp_path, timeout_s=60)[0]
    assert got["left_s"] is not None and got["left_s"] < 5, got
    assert got["error"] and got["echo"], got  # read as the echo of a lost peer: the rank waits for a re-form
