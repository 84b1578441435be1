"""Distributed attention (Ulysses, ring, USP) against torch's scaled_dot_product_attention
on the full tensors: output and dQ, dK, dV for every (ulysses, ring) split of 2 and 4
ranks, both layouts, causal and not; bytes against the issue's formulas.

One 4-process run holds every case (a process start costs more than the cases):
groups of 4 ranks, and two independent groups of 2 ranks side by side."""
import pytest
import torch
import torch.nn.functional as F

from cluster import Comm
from strategies.sequence import SequenceLayout, SequenceParallelAttention, Traffic, block_plan
from strategies.sequence.kernels import pick_kernel
from strategies.sequence.strategy import split_groups
from tests.ranks import run_ranks

# fp32; the only differences from SDPA are the order of floating-point sums (blocks
# merged by log-sum-exp, dK/dV accumulated over ranks): ~1e-6 on O(1) values.
ATOL = 1e-5
B, H, N, D = 2, 4, 32, 8  # N divisible by 2 x 4 (zig-zag on 4 ranks)


def full_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(B, H, N, D, generator=g) for name in ("q", "k", "v", "dout")}


def reference(causal: bool) -> dict[str, torch.Tensor]:
    t = full_tensors()
    q, k, v = (t[n].clone().requires_grad_() for n in ("q", "k", "v"))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    out.backward(t["dout"])
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def splits(world: int) -> list[tuple[int, int]]:
    return [(u, world // u) for u in range(1, world + 1) if world % u == 0]


def configs() -> list[tuple[int, int, str, bool, str]]:
    """(ulysses, ring, layout, causal, kernel): every split of 2 and 4, layout and mask
    with the fused kernel; the math kernel on every split, zig-zag."""
    out = [(u, r, kind, causal, "flash") for sp in (2, 4) for u, r in splits(sp)
           for kind in ("contiguous", "zigzag") for causal in (True, False)]
    return out + [(u, r, "zigzag", causal, "math") for sp in (2, 4) for u, r in splits(sp) for causal in (True, False)]


def run_configs(rank: int, world: int) -> list[dict]:
    comm, t, results = Comm(), full_tensors(), []
    groups = {}
    for u, r, kind, causal, kernel in configs():
        layout = SequenceLayout(N, u, r, kind)
        if (u, r) not in groups:  # world / (u r) groups side by side
            groups[(u, r)] = split_groups(comm, layout, dp=world // layout.size)[1:]
        ulysses, ring = groups[(u, r)]
        sp_rank = rank % layout.size
        pos = layout.positions(sp_rank)
        q, k, v = (t[n][:, :, pos].clone().requires_grad_() for n in ("q", "k", "v"))
        traffic = Traffic()
        attn = SequenceParallelAttention(layout, sp_rank, ulysses=ulysses, ring=ring, causal=causal,
                                         kernel=pick_kernel(kernel, torch.device("cpu")), traffic=traffic)
        comm.take_stats()
        out = attn(q, k, v)
        fwd = comm.take_stats()
        out.backward(t["dout"][:, :, pos])
        bwd = comm.take_stats()
        results.append({
            "config": (u, r, kind, causal, kernel), "pos": pos, "out": out.detach(),
            "dq": q.grad, "dk": k.grad, "dv": v.grad,
            "fwd": (fwd.bytes_sent, fwd.bytes_received), "bwd": (bwd.bytes_sent, bwd.bytes_received),
            "traffic": (traffic.forward, traffic.backward),
        })
    return results


def expected_bytes(u: int, r: int) -> tuple[int, int]:
    """Bytes one rank sends (and receives) per attention layer, forward and backward.
    Ulysses: 4 all-to-alls (Q, K, V, out) of b·N'·h·(u-1)/u² elements each, N' = N/r
    the sequence one Ulysses group holds, h = heads x head_dim. Ring: forward (r-1)
    rotations of this rank's K and V blocks (b·(N/r)·h/u elements each); backward the
    same K/V rotations plus r hops of the fp32 dK/dV accumulators (none when r = 1)."""
    hidden, n_group, elt = H * D, N // r, 4
    a2a = 4 * B * n_group * hidden * (u - 1) // u**2 * elt
    kv_block = 2 * B * n_group * hidden // u * elt
    acc_hops = r if r > 1 else 0
    return a2a + (r - 1) * kv_block, a2a + (r - 1) * kv_block + acc_hops * kv_block


@pytest.mark.slow  # one 4-process run: ~20 s on an idle 2-core machine, mostly process start-up
def test_matches_sdpa_and_counts_the_formula_bytes(tmp_path):
    per_rank = run_ranks(run_configs, 4, tmp_path)
    refs = {causal: reference(causal) for causal in (True, False)}
    for rank, results in enumerate(per_rank):
        for res in results:
            u, r, kind, causal, kernel = res["config"]
            where = f"rank {rank}, ulysses={u}, ring={r}, {kind}, causal={causal}, {kernel}"
            for name in ("out", "dq", "dk", "dv"):
                torch.testing.assert_close(res[name], refs[causal][name][:, :, res["pos"]], rtol=0, atol=ATOL,
                                           msg=lambda m: f"{where}: {name}: {m}")
            fwd, bwd = expected_bytes(u, r)
            assert res["fwd"] == (fwd, fwd) and res["bwd"] == (bwd, bwd), where
            assert res["traffic"] == (fwd, bwd), where
    assert len(per_rank[0]) == 5 * 2 * 2 + 5 * 2  # splits (2 of 2 ranks, 3 of 4) x layouts x masks, + math


def test_single_rank_is_plain_attention():
    """u = r = 1 (no process group): one block per layer, no bytes."""
    t = full_tensors()
    for causal in (True, False):
        q, k, v = (t[n].clone().requires_grad_() for n in ("q", "k", "v"))
        comm = Comm()
        attn = SequenceParallelAttention(SequenceLayout(N), 0, ulysses=comm, ring=comm, causal=causal,
                                         kernel=pick_kernel("math", torch.device("cpu")))
        out = attn(q, k, v)
        out.backward(t["dout"])
        ref = reference(causal)
        for name, got in (("out", out.detach()), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
            torch.testing.assert_close(got, ref[name], rtol=0, atol=ATOL, msg=lambda m: f"{name}: {m}")
        assert (attn.traffic.forward, attn.traffic.backward) == (0, 0)


# -- layouts and block plans (no processes) ------------------------------------------------


@pytest.mark.parametrize("u,r", [(1, 4), (2, 2), (4, 1), (2, 4)])
@pytest.mark.parametrize("kind", ["contiguous", "zigzag"])
def test_positions_partition_the_sequence(u, r, kind):
    layout = SequenceLayout(64, u, r, kind)
    held = torch.cat([layout.positions(p) for p in range(u * r)])
    assert sorted(held.tolist()) == list(range(64))
    assert all(len(layout.positions(p)) == 64 // (u * r) for p in range(u * r))


def test_zigzag_balances_causal_work_and_contiguous_skips_masked_blocks():
    r = 4

    def work(kind):  # query-key pairs each ring rank evaluates at each step
        layout = SequenceLayout(64, 1, r, kind)
        return [[sum(b.scores() for b in step) for step in layout.ring_plan(i, causal=True)] for i in range(r)]

    contiguous, zigzag = work("contiguous"), work("zigzag")
    # contiguous: rank i attends to blocks 0..i only; later blocks are skipped outright
    assert [sum(1 for w in steps if w) for steps in contiguous] == [1, 2, 3, 4]
    assert contiguous[0][1:] == [0, 0, 0]
    # zig-zag: every rank does the same work at every step, and half the full matrix in total
    assert all(steps == zigzag[0] for steps in zigzag)
    assert all(w == zigzag[0][1] for w in zigzag[0][1:])
    assert sum(map(sum, zigzag)) == sum(map(sum, contiguous)) == 64 * 65 // 2


def test_block_plan_rejects_partially_overlapping_segments():
    with pytest.raises(ValueError, match="overlap partially"):
        block_plan([(0, 8)], [(4, 8)], causal=True)
    assert block_plan([(0, 8)], [(4, 8)], causal=False)  # no mask: any layout is fine


@pytest.mark.parametrize("n,u,r,kind,msg", [
    (30, 2, 2, "contiguous", r"workload.seq_len=30: must be divisible by ulysses\(2\) x ring\(2\) = 4"),
    (36, 2, 2, "zigzag", r"workload.seq_len=36: must be divisible by 2 x ulysses\(2\) x ring\(2\) = 8"),
])
def test_layout_rejects_indivisible_lengths(n, u, r, kind, msg):
    with pytest.raises(ValueError, match=msg):
        SequenceLayout(n, u, r, kind)
