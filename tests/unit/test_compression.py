"""Compressors' math, state and wire bytes, with W simulated ranks as threads
around a fake collective layer (no processes): every rank runs the real
per-rank compressor code, and the results are checked against the exact
average of the ranks' gradients or against a closed form."""
from __future__ import annotations

import itertools
import math
import threading

import pytest
import torch
import torch.distributed as dist

from cluster import all_gather_bytes, all_to_all_bytes, ring_allreduce_bytes
from orchestrator.cli import main
from orchestrator.config import ConfigError, JobSpec
from strategies.compression.adaptive import Adaptive, AdaptiveCompressor, choose
from strategies.compression.base import Wire
from strategies.compression.int8 import Int8Compressor, dequantize, quantize
from strategies.compression.powersgd import PowerSGDCompressor, PowerSGDOptions
from strategies.compression.terngrad import TernGradCompressor, pack2, unpack2
from strategies.compression.topk import TopKCompressor, TopKOptions, k_of

GPT = {"name": "gpt-tiny", "n_layers": 2, "d_model": 64, "seq_len": 32}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # fixed gradients: every test here is deterministic


class _Group:
    """Shared slots and a barrier: a collective is 'everyone posts, everyone reads'."""

    def __init__(self, world: int):
        self.world = world
        self.barrier = threading.Barrier(world, timeout=30)
        self.slots: list = [None] * world

    def exchange(self, rank: int, value):
        self.slots[rank] = value
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()
        return out


class FakeComm:
    """The Comm calls compressors make, among threads of one process."""

    def __init__(self, group: _Group, rank: int):
        self.group, self.world, self.rank = group, group.world, rank

    def all_reduce(self, t, op=dist.ReduceOp.SUM):
        vals = self.group.exchange(self.rank, t.clone())
        acc = vals[0].clone()
        for v in vals[1:]:
            acc = torch.maximum(acc, v) if op == dist.ReduceOp.MAX else acc + v
        return t.copy_(acc)

    def all_gather(self, t):
        return torch.stack(self.group.exchange(self.rank, t.clone()))

    def all_to_all_single(self, out, inp):
        vals = self.group.exchange(self.rank, inp.clone())
        for j, v in enumerate(vals):
            out[j] = v[self.rank]


def on_ranks(world: int, fn):
    """fn(rank, wire) on ``world`` threads; results in rank order (errors re-raised)."""
    group, results, errors = _Group(world), [None] * world, []

    def body(rank):
        try:
            results[rank] = fn(rank, Wire(FakeComm(group, rank)))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            group.barrier.abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def _reduce(compressor, grads: dict[str, torch.Tensor], step: int = 0) -> dict[str, torch.Tensor]:
    views = {n: g.clone() for n, g in grads.items()}
    compressor.reduce(list(views.items()), step)
    return views


def _mean(per_rank: list[dict], name: str) -> torch.Tensor:
    return torch.stack([g[name] for g in per_rank]).mean(0)


# -- powersgd ------------------------------------------------------------------------------
@pytest.mark.parametrize("rank, grad_rank", [(1, 1), (4, 2)])
def test_powersgd_reproduces_a_low_rank_gradient_exactly_on_every_rank(rank, grad_rank):
    """Each rank's gradient U V_w^T lies in one rank-<=r column space: the
    average comes back exactly, on every rank alike, and no residual is left."""
    world, steps = 3, 2
    u = torch.randn(32, grad_rank)
    grads = [[{"w": u @ torch.randn(grad_rank, 24), "b": torch.randn(24)} for _ in range(world)] for _ in range(steps)]
    shapes = {"w": torch.Size([32, 24]), "b": torch.Size([24])}

    def run(r, wire):
        c = PowerSGDCompressor(wire, shapes, rank=rank, min_compression_rate=2.0, seed=7)
        outs = [_reduce(c, grads[s][r], s) for s in range(steps)]
        return outs, c.err["w"].clone()

    res = on_ranks(world, run)
    for s in range(steps):
        out = res[0][0][s]
        torch.testing.assert_close(out["w"], _mean(grads[s], "w"), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out["b"], _mean(grads[s], "b"), rtol=1e-6, atol=1e-6)  # 1-D: uncompressed
        assert torch.linalg.matrix_rank(out["w"]) <= rank
        for other, _ in res[1:]:
            assert torch.equal(other[s]["w"], out["w"])  # replicas stay equal
    scale = max(g["w"].abs().max() for step in grads for g in step)
    for _, err in res:  # zero up to fp32 rounding
        assert err.abs().max() < 1e-5 * scale


def test_powersgd_error_feedback_telescopes():
    """Over T steps: sum of applied updates + mean residual = sum of mean gradients."""
    world, steps = 2, 6
    grads = [[{"w": torch.randn(16, 20)} for _ in range(world)] for _ in range(steps)]

    def run(r, wire):
        c = PowerSGDCompressor(wire, {"w": torch.Size([16, 20])}, rank=1, min_compression_rate=2.0, seed=1)
        applied = sum(_reduce(c, grads[s][r], s)["w"] for s in range(steps))
        return applied, c.err["w"]

    res = on_ranks(world, run)
    total = sum(_mean(grads[s], "w") for s in range(steps))
    residual = torch.stack([e for _, e in res]).mean(0)
    assert residual.norm() > 0.1 * total.norm()  # rank 1 of 16x20 noise is lossy: the identity is not trivial
    torch.testing.assert_close(res[0][0] + residual, total, rtol=1e-5, atol=1e-5)


def test_powersgd_bytes_and_which_tensors_it_compresses():
    """(64, 48) compresses at rank 4; (6, 5) would not gain and (48,) is 1-D:
    both go uncompressed in the P all-reduce."""
    shapes = {"big": torch.Size([64, 48]), "small": torch.Size([6, 5]), "bias": torch.Size([48])}
    world, r = 3, 4
    grads = [{n: torch.randn(s) for n, s in shapes.items()} for _ in range(world)]

    def run(rank, wire):
        c = PowerSGDCompressor(wire, shapes, rank=r, min_compression_rate=2.0, seed=0)
        return _reduce(c, grads[rank]), wire.sent, sorted(c.ranks)

    res = on_ranks(world, run)
    p_values = 30 + 48 + 64 * r  # dense values + P
    expected = ring_allreduce_bytes(4 * p_values, world) + ring_allreduce_bytes(4 * 48 * r, world)
    for out, sent, compressed in res:
        assert compressed == ["big"] and sent == expected
        torch.testing.assert_close(out["small"], _mean(grads, "small"), rtol=1e-6, atol=1e-6)


def test_powersgd_options_and_rank_limits():
    with pytest.raises(ValueError, match="must be >= 1"):
        PowerSGDOptions(rank=0)
    with pytest.raises(ConfigError, match=r"strategy\.rank=0: must be >= 1"):
        JobSpec(workload=GPT, strategy={"name": "powersgd", "rank": 0}, workers=2)
    JobSpec(workload=GPT, strategy={"name": "powersgd", "rank": 25}, workers=2)
    # 0.tok.weight (256, 64) is the largest: (256 + 64) r 2 < 256 x 64 up to r = 25; checked
    # by the config (the driver), before any worker starts
    with pytest.raises(ConfigError) as e:
        JobSpec(workload=GPT, strategy={"name": "powersgd", "rank": 26}, workers=2)
    msg = str(e.value)
    assert "\n" not in msg and "strategy.rank=26" in msg and "at most 25, for 0.tok.weight (256, 64)" in msg


def _cli(capsys, *args) -> tuple[int, str]:
    rc = main(["run", "--workload", "gpt-tiny", "--workers", "2", "--steps", "2", *args])
    return rc, capsys.readouterr().err.strip()


@pytest.mark.parametrize("strategy, sets, expected", [
    ("powersgd", ["strategy.rank=0"], "strategy.rank=0: must be >= 1"),
    ("powersgd", ["strategy.rank=1000"], "strategy.rank=1000: no weight of workload 'gpt-tiny' compresses at that "
                                         "rank (at most"),
    ("adaptive", ["strategy.ranks=[0, 2]"], "strategy.ranks=[0, 2]: must be a non-empty list of ranks >= 1"),
    ("adaptive", ["strategy.ranks=[900]"], "strategy.ranks=900: no weight of workload 'gpt-tiny'"),
    ("topk", ["strategy.ratio=0"], "strategy.ratio=0: must lie in (0, 1]"),
    ("topk", ["strategy.ratio=1.01"], "strategy.ratio=1.01: must lie in (0, 1]"),
    ("int8", ["strategy.block_size=-1"], "strategy.block_size=-1: Input should be greater than or equal to 0"),
    ("terngrad", ["strategy.clip_sigma=-1"], "strategy.clip_sigma=-1: Input should be greater than or equal to 0"),
])
def test_bad_options_are_one_line_exit_2_through_the_cli(capsys, tmp_path, monkeypatch, strategy, sets, expected):
    started = []
    monkeypatch.setattr("orchestrator.driver.run", lambda *a, **k: started.append(1))  # nothing may start
    rc, err = _cli(capsys, "--strategy", strategy, "--storage", str(tmp_path),
                   *[x for s in sets for x in ("--set", s)])
    assert rc == 2 and not started
    assert expected in err and len(err.splitlines()) == 1, err


# -- topk ----------------------------------------------------------------------------------
def test_topk_sends_exactly_k_values_and_feeds_back_the_rest():
    shapes = {"a": torch.Size([50, 7]), "b": torch.Size([33])}
    world, ratio, steps = 2, 0.1, 4
    grads = [[{n: torch.randn(s) for n, s in shapes.items()} for _ in range(world)] for _ in range(steps)]
    ks = {n: k_of(s.numel(), ratio) for n, s in shapes.items()}
    assert ks == {"a": 35, "b": 4}

    def run(rank, wire):
        c = TopKCompressor(wire, list(shapes), seed=0, ratio=ratio)
        applied, sent = {n: 0 for n in shapes}, []
        for s in range(steps):
            before = {n: grads[s][rank][n] + c.err.get(n, 0) for n in shapes}
            wire.sent = 0
            out = _reduce(c, grads[s][rank], s)
            sent.append(wire.sent)
            for n in shapes:
                applied[n] = applied[n] + out[n]
                kept = (before[n] - c.err[n]).flatten()  # what this rank sent
                assert int((kept != 0).sum()) == ks[n]
                # the k sent are the k largest in magnitude
                threshold = before[n].abs().flatten().topk(ks[n]).values.min()
                assert torch.equal(kept != 0, before[n].abs().flatten() >= threshold)
        return applied, dict(c.err), sent

    res = on_ranks(world, run)
    for _, _, sent in res:
        assert sent == [all_gather_bytes(8 * sum(ks.values()), world)] * steps  # int32 index + fp32 value each
    for n in shapes:
        total = sum(_mean(grads[s], n) for s in range(steps))
        residual = torch.stack([err[n] for _, err, _ in res]).mean(0)
        torch.testing.assert_close(res[0][0][n] + residual, total, rtol=1e-5, atol=1e-5)
        assert torch.equal(res[0][0][n], res[1][0][n])


def test_a_left_out_rank_sends_zeros_and_keeps_its_residual():
    """Weight 0 (a backup worker's straggler): its zero gradient is compressed as is,
    its residual is neither sent nor changed."""
    shapes = {"w": torch.Size([12, 10])}
    grads = [{"w": torch.randn(12, 10)} for _ in range(2)]

    def run(rank, wire):
        c = PowerSGDCompressor(wire, shapes, rank=2, min_compression_rate=1.5, seed=0)
        _reduce(c, grads[rank], 0)
        kept, q = c.err["w"].clone(), c.q["w"].clone()
        c.feedback_paused = rank == 1
        out = _reduce(c, {"w": torch.zeros(12, 10)} if rank == 1 else grads[rank], 1)
        return out["w"], kept, c.err["w"], q

    (out0, kept0, _, q), (out1, kept, err, _) = on_ranks(2, run)
    assert torch.equal(err, kept) and torch.equal(out0, out1)
    m0 = grads[0]["w"] + kept0  # only rank 0's gradient (and residual) is in the exchange
    basis = torch.linalg.qr(m0 @ q).Q
    torch.testing.assert_close(out0, basis @ (m0.T @ basis).T / 2, rtol=1e-5, atol=1e-6)


def test_topk_ratio_must_lie_in_0_1():
    for bad in (0, -0.5, 1.5):
        with pytest.raises(ConfigError, match=rf"strategy\.ratio={bad}: must lie in \(0, 1\]"):
            JobSpec(workload=GPT, strategy={"name": "topk", "ratio": bad}, workers=2)
    assert TopKOptions(ratio=1).ratio == 1


# -- terngrad ------------------------------------------------------------------------------
def test_pack2_round_trips_four_values_a_byte():
    codes = torch.randint(0, 4, (4 * 9 + 3,), dtype=torch.uint8)
    packed = pack2(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == 10
    assert torch.equal(unpack2(packed, codes.numel()), codes)


def test_terngrad_values_are_ternary_with_a_shared_scale_and_bytes_match():
    world = 3
    shapes = {"w": torch.Size([10, 9]), "b": torch.Size([7])}
    grads = [{n: torch.randn(s) * (r + 1) for n, s in shapes.items()} for r in range(world)]

    def run(rank, wire):
        c = TernGradCompressor(wire, list(shapes), seed=5, clip_sigma=0.0)
        return _reduce(c, grads[rank]), wire.sent

    res = on_ranks(world, run)
    for n, shape in shapes.items():
        s = max(g[n].abs().max() for g in grads)  # the largest |g| of any rank
        out = res[0][0][n]
        levels = out * world / s  # a sum of `world` values in {-1, 0, 1}
        torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-5)
        assert levels.abs().max() <= world
        for other, _ in res[1:]:
            assert torch.equal(other[n], out)
    n_values = 90 + 7
    expected = ring_allreduce_bytes(4 * 2, world) + all_gather_bytes(math.ceil(n_values / 4), world)
    assert [sent for _, sent in res] == [expected] * world

    def alone(rank, wire):
        return _reduce(TernGradCompressor(wire, list(shapes), seed=5, clip_sigma=0.0), grads[0])

    one = on_ranks(1, alone)[0]
    for n in shapes:  # one rank: exactly {-s, 0, s}
        s = grads[0][n].abs().max()
        assert set(torch.unique(one[n] / s).tolist()) <= {-1.0, 0.0, 1.0}


def test_terngrad_is_unbiased():
    """Monte Carlo, fixed seed: the mean of many ternarizations of g is g, within
    5 standard errors (per value the error's sd is <= s / (2 sqrt(N)))."""
    g = torch.randn(64)
    draws = 4000

    def run(rank, wire):
        c = TernGradCompressor(wire, ["g"], seed=11, clip_sigma=0.0)
        return sum(_reduce(c, {"g": g}, s)["g"].double() for s in range(draws)) / draws

    mean = on_ranks(1, run)[0]
    s = g.abs().max()
    sd = torch.sqrt((g.abs() / s) * (1 - g.abs() / s)) * s / math.sqrt(draws)
    assert ((mean - g).abs() <= 5 * sd + 1e-6 * s).all()  # the max |g| is sent exactly (sd 0)
    assert (mean - g).abs().max() > 0  # it is random


# -- int8 ----------------------------------------------------------------------------------
def test_int8_reconstruction_error_is_at_most_half_a_step():
    gen = torch.Generator().manual_seed(0)
    rows = torch.stack([
        torch.randn(200, generator=gen) * 1e-3,
        torch.rand(200, generator=gen) + 5.0,  # all positive, far from 0
        -torch.rand(200, generator=gen) * 1e4,  # all negative, large
        torch.full((200,), 0.25),  # constant
        torch.zeros(200),
    ])
    rows[0, :17] = 0
    codes, scale, zero = quantize(rows)
    err = (dequantize(codes, scale, zero) - rows).abs()
    ulp = rows.abs().amax(1) * 1e-6  # fp32 rounding of the arithmetic itself
    assert (err <= (scale / 2 + ulp)[:, None]).all()
    assert (dequantize(codes, scale, zero)[0, :17] == 0).all()  # zero is exact


@pytest.mark.parametrize("block", [0, 64])
def test_int8_two_phase_all_reduce_bound_and_bytes(block):
    world, n = 3, 1001  # not a multiple of world (nor, per chunk, of 64): padded
    shapes = {"w": torch.Size([40, 25]), "b": torch.Size([1])}
    grads = [{k: torch.randn(s) for k, s in shapes.items()} for _ in range(world)]

    def run(rank, wire):
        return _reduce(Int8Compressor(wire, list(shapes), seed=0, block_size=block), grads[rank]), wire.sent

    res = on_ranks(world, run)
    flat = [torch.cat([g["w"].flatten(), g["b"]]) for g in grads]
    exact = torch.stack(flat).mean(0)
    got = torch.cat([res[0][0]["w"].flatten(), res[0][0]["b"]])
    # phase 1: each rank's value off by <= its chunk's scale / 2 (scale <= the rank's span / 254),
    # averaged; phase 2: <= the averaged chunk's scale / 2, a span no wider than the widest rank's
    span = max(f.clamp(min=0).max() - f.clamp(max=0).min() for f in flat)
    assert (got - exact).abs().max() <= 1.01 * span / 254
    assert (got - exact).abs().max() > 0
    chunk = math.ceil(n / world)  # 334 values: one block, or 6 blocks of 64 (384 with padding)
    wire_row = chunk + 8 if block == 0 else 6 * (64 + 8)
    expected = all_to_all_bytes(world * wire_row, world) + all_gather_bytes(wire_row, world)
    for out, sent in res:
        assert sent == expected == 2 * (world - 1) * wire_row
        assert torch.equal(out["w"], res[0][0]["w"])


# -- adaptive ------------------------------------------------------------------------------
def test_choose_is_the_least_size_within_the_budget():
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        layers = []
        for _ in range(4):
            opts = [(float(s), float(e)) for s, e in zip(torch.randint(1, 50, (3,), generator=gen),
                                                         torch.rand(3, generator=gen))]
            layers.append(sorted(opts) + [(100.0, 0.0)])
        budget, bins = float(torch.rand(1, generator=gen) * 2), 50
        picked = choose(layers, budget, bins)
        unit, size = budget / bins, sum(layers[i][p][0] for i, p in enumerate(picked))
        assert sum(layers[i][p][1] for i, p in enumerate(picked)) <= budget * (1 + len(layers) / bins)
        combos = list(itertools.product(*(range(len(o)) for o in layers)))
        feasible = [sum(layers[i][p][0] for i, p in enumerate(c)) for c in combos
                    if sum(math.ceil(layers[i][p][1] / unit) for i, p in enumerate(c)) <= bins + len(layers)]
        assert size == min(feasible)  # the optimum of the discretised problem, found by brute force
        within = [sum(layers[i][p][0] for i, p in enumerate(c)) for c in combos
                  if sum(layers[i][p][1] for i, p in enumerate(c)) <= budget]
        assert size <= min(within)  # never worse than any set that meets the budget exactly


def test_adaptive_gives_low_rank_layers_low_ranks_and_noise_more():
    """A layer whose gradient is rank 1 costs nothing at rank 1; a noise layer
    must keep most of its energy, so it gets a high rank or none; every rank
    agrees, and the choice is re-made every `every` steps."""
    world = 2
    shapes = {"lowrank": torch.Size([64, 64]), "noise": torch.Size([64, 64])}
    u = torch.randn(64, 1)

    def grads(step, rank):
        gen = torch.Generator().manual_seed(100 * step + rank)
        return {"lowrank": u @ torch.randn(1, 64, generator=gen), "noise": torch.randn(64, 64, generator=gen)}

    def run(rank, wire):
        c = AdaptiveCompressor(wire, shapes, ranks=[1, 2, 4, 8, 16], error_budget=0.5, every=3,
                               min_compression_rate=2.0, seed=0)
        picks, sent = [], []
        for step in range(5):
            wire.sent = 0
            _reduce(c, grads(step, rank), step)
            picks.append(dict(c.rank))
            sent.append(wire.sent)
        return picks, sent, dict(c.chosen_at)

    res = on_ranks(world, run)
    picks, sent, chosen_at = res[0]
    assert picks == res[1][0]
    assert picks[0]["lowrank"] == 1
    assert picks[0]["noise"] is None or picks[0]["noise"] >= 8
    assert chosen_at == {"lowrank": 3, "noise": 3}  # chosen at step 0, again at step 3
    # per layer: energy, a tail per candidate that compresses 64x64 (1, 2, 4, 8; not 16) and
    # the reference rank's tail, in float64
    profile = ring_allreduce_bytes(8 * 2 * (1 + 4 + 1), world)
    assert sent[1] < sent[0] and sent[0] - sent[1] == profile  # steps 0 and 3 pay for the profile
    # default budget (L-GreCo): the error uniform rank 4 would leave, on these gradients
    def default_budget(rank, wire):
        c = AdaptiveCompressor(wire, shapes, ranks=[1, 2, 4, 8, 16], error_budget=None, every=3,
                               min_compression_rate=2.0, seed=0, rank=4)
        p = PowerSGDCompressor(Wire(wire.comm), shapes, rank=4, min_compression_rate=2.0, seed=0)
        _reduce(c, grads(0, rank))
        _reduce(p, grads(0, rank))
        return dict(c.rank), wire.sent - profile, p.wire.sent

    chosen, adaptive_sent, powersgd_sent = on_ranks(world, default_budget)[0]
    assert chosen["lowrank"] == 1 and adaptive_sent < powersgd_sent
    with pytest.raises(ConfigError, match=r"strategy\.error_budget=1\.5: must lie in \(0, 1\)"):
        JobSpec(workload=GPT, strategy={"name": "adaptive", "error_budget": 1.5}, workers=2)
    wl = JobSpec(workload=GPT, strategy="ddp", workers=2).build_workload()
    with pytest.raises(ValueError, match=r"strategy\.ranks=30: no weight"):
        Adaptive.check_options(Adaptive.Options(ranks=[30, 40]), workers=2, workload=wl)
