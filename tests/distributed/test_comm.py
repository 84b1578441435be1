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


def every_call_counted(rank: int, world: int) -> dict:
    """all_to_all, all_gather, point-to-point and a sub-group split, each counted."""
    comm = Comm()
    x = torch.arange(4.0 * world) + 100 * rank
    a2a = torch.empty_like(x)
    comm.all_to_all_single(a2a, x)
    gathered = comm.all_gather(torch.tensor([float(rank)]))
    right, left = (rank + 1) % world, (rank - 1) % world
    got = torch.empty(3)
    comm.exchange([(torch.full((3,), float(rank)), right)], [(got, left)])
    pairs = comm.split([[r, r + 1] for r in range(0, world, 2)])
    s = pairs.all_reduce(torch.tensor([float(rank)]))
    if pairs.rank == 0:
        pairs.send(torch.tensor([7.0]), 1)
    else:
        pairs.recv(p := torch.empty(1), 0)
    stats = comm.take_stats()
    return {"a2a": a2a.tolist(), "gathered": gathered.flatten().tolist(), "got": got.tolist(),
            "pair_sum": s.item(), "pair": (pairs.rank, pairs.world), "stats": stats.__dict__}


@pytest.mark.parametrize("world", [2, 4])
def test_all_to_all_gather_p2p_and_subgroups_counted(tmp_path, world):
    from cluster import all_gather_bytes, all_to_all_bytes

    out = run_ranks(every_call_counted, world, tmp_path)
    for rank, r in enumerate(out):
        assert r["a2a"] == [float(4 * rank + i + 100 * j) for j in range(world) for i in range(4)]
        assert r["gathered"] == list(map(float, range(world)))
        assert r["got"] == [float((rank - 1) % world)] * 3
        assert r["pair_sum"] == float(rank - rank % 2) * 2 + 1 and r["pair"] == (rank % 2, 2)
        p2p_sent, p2p_recv = (4, 0) if rank % 2 == 0 else (0, 4)
        sent = all_to_all_bytes(16 * world, world) + all_gather_bytes(4, world) + 12 + ring_allreduce_bytes(4, 2) + p2p_sent
        received = sent - p2p_sent + p2p_recv
        assert (r["stats"]["bytes_sent"], r["stats"]["bytes_received"]) == (sent, received)
        assert r["stats"]["calls"] == 5


def delayed_calls(rank: int, world: int, scenario: str) -> dict:
    """Each kind of call under a simulated network, timed from outside."""
    import time

    from cluster.network import parse_scenario

    net = parse_scenario(scenario)
    comm = Comm()
    comm.set_floor(net.seconds)
    out = {}
    x = torch.ones(250_000)  # 1 MB
    for name, call in {
        "all_reduce": lambda: comm.all_reduce(x),
        "all_gather": lambda: comm.all_gather(x),
        "all_to_all": lambda: comm.all_to_all_single(torch.empty_like(x), x),
        "async_all_reduce": lambda: comm.all_reduce(x, async_op=True).wait(),
        "hook_all_reduce": lambda: comm.all_reduce_async(x).wait(),
        "exchange": lambda: comm.exchange([(x, (rank + 1) % world)], [(torch.empty_like(x), (rank - 1) % world)]),
    }.items():
        comm.take_stats()
        t0 = time.perf_counter()
        call()
        out[name] = (time.perf_counter() - t0, comm.take_stats().__dict__)
    return out


def test_a_scenario_delays_each_call_to_at_least_the_modelled_time(tmp_path):
    from cluster.network import parse_scenario

    scenario = "per_node=1,inter=1gbit,latency=20ms"
    net = parse_scenario(scenario)
    out = run_ranks(delayed_calls, 2, tmp_path, scenario)
    for r in out:
        for name, (elapsed, stats) in r.items():
            op = name.split("_", 1)[1] if name.startswith(("async", "hook")) else name
            want = net.seconds(op, stats["bytes_sent"], stats["bytes_received"], (0, 1))
            assert want > 0.02
            # at least the model (1 ms slack for clock granularity), and not wildly more
            assert want - 1e-3 <= elapsed < want + 2.0, (name, elapsed, want)
            assert stats["comm_s"] >= want - 1e-3, (name, stats)


def posted_p2p(rank: int, world: int) -> dict:
    """isend/irecv: posted at once, bytes counted, the receiver's wait is blocked time."""
    import time

    comm = Comm()
    comm.take_stats()
    if rank == 0:
        time.sleep(0.3)  # the receiver has posted by now and waits in wait()
        work = comm.isend(torch.arange(100.0), 1)
        work.wait()
        got = None
    else:
        buf = torch.empty(100)
        work = comm.irecv(buf, 0)
        posted = comm.take_stats()  # in flight, not yet waited for: bytes counted, no wait time
        work.wait()
        work.wait()  # a second wait ends nothing twice
        got = (buf.tolist(), posted.__dict__)
    return {"got": got, "stats": comm.take_stats().__dict__}


def test_isend_irecv_counted_and_the_wait_is_idle(tmp_path):
    sender, receiver = run_ranks(posted_p2p, 2, tmp_path)
    assert (sender["stats"]["bytes_sent"], sender["stats"]["bytes_received"]) == (400, 0)
    values, posted = receiver["got"]
    assert values == list(map(float, range(100)))
    assert (posted["bytes_received"], posted["calls"], posted["wait_s"]) == (400, 1, 0.0)
    assert receiver["stats"]["wait_s"] > 0.2 and receiver["stats"]["bytes_received"] == 0  # counted at posting
    assert receiver["stats"]["comm_s"] > 0.2  # in flight from posting to the wait's return


def posted_ahead(rank: int, world: int) -> dict:
    """Under a simulated network (0.3 s a message), rank 1 posts its receive at once and
    rank 0 sends 0.5 s later, twice (a pipeline's Mailbox keeps its next receive posted)."""
    import time

    comm = Comm()
    comm.set_floor(lambda op, sent, received, ranks: 0.3)
    t0 = time.perf_counter()
    took = []
    for i in range(2):
        if rank == 0:
            time.sleep(0.5)
            comm.isend(torch.full((10,), float(i)), 1).wait()
        else:
            buf = torch.empty(10)
            work = comm.irecv(buf, 0)
            work.wait()
            assert buf.tolist() == [float(i)] * 10
        took.append(time.perf_counter() - t0)
    stats = comm.take_stats()
    return {"took": took, "bytes": (stats.bytes_sent, stats.bytes_received), "calls": stats.calls}


def test_a_receive_posted_ahead_pays_the_network_from_the_send(tmp_path):
    """The floor of a message counts from its send, not from the receive's posting: a
    receive posted ahead used to absorb it while the sender was still computing (the
    message sent at 0.5 s arrived at 0.5 s, not 0.8 s). The send's time is not counted
    as bytes or calls."""
    sender, receiver = run_ranks(posted_ahead, 2, tmp_path)
    first, second = receiver["took"]
    assert 0.78 < first < 1.2 and 0.78 < second - sender["took"][0] < 1.2, (receiver, sender)
    assert sender["bytes"] == (80, 0) and receiver["bytes"] == (0, 80)
    assert sender["calls"] == receiver["calls"] == 2


def async_ring_exchange(rank: int, world: int) -> dict:
    """exchange(async_op=True) on gloo (whose point-to-point Works have no future)."""
    comm = Comm()
    comm.take_stats()
    right, left = (rank + 1) % world, (rank - 1) % world
    got = torch.empty(4)
    work = comm.exchange([(torch.full((4,), float(rank)), right)], [(got, left)], async_op=True)
    work.wait()
    return {"got": got.tolist(), "stats": comm.take_stats().__dict__}


def test_async_exchange_on_gloo(tmp_path):
    for rank, out in enumerate(run_ranks(async_ring_exchange, 3, tmp_path)):
        assert out["got"] == [float((rank - 1) % 3)] * 4
        assert (out["stats"]["bytes_sent"], out["stats"]["bytes_received"]) == (16, 16)
