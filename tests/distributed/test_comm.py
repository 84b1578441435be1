"""Comm's counters against the ring formulas, with real gloo collectives."""
import pytest
import torch

from cluster import Comm, ring_allreduce_bytes
from tests.ranks import run_ranks


def allreduce_and_count(rank: int, world: int) -> dict:
    comm = Comm()
    t = torch.full((1000,), float(rank + 1))
    comm.all_reduce(t)
    fut = comm.all_reduce_async(torch.ones(250))
    async_out = fut.wait()
    b = torch.arange(10.0) if rank == 0 else torch.zeros(10)
    comm.broadcast(b, src=0)
    stats = comm.take_stats()
    return {"sum": t[0].item(), "async": async_out[0].item(), "bcast": b.tolist(), "stats": stats.__dict__}


@pytest.mark.parametrize("world", [2, 3])
def test_counted_bytes_equal_the_ring_formula(tmp_path, world):
    out = run_ranks(allreduce_and_count, world, tmp_path)
    for rank, r in enumerate(out):
        assert r["sum"] == sum(range(1, world + 1))
        assert r["async"] == world
        assert r["bcast"] == list(map(float, range(10)))
        ar = ring_allreduce_bytes(4000, world) + ring_allreduce_bytes(1000, world)
        bsent, brecv = ((world - 1) * 40, 0) if rank == 0 else (0, 40)
        s = r["stats"]
        assert (s["bytes_sent"], s["bytes_received"]) == (ar + bsent, ar + brecv)
        assert s["calls"] == 3 and s["comm_s"] > 0 and s["wait_s"] > 0
