"""Compression strategies on 2 gloo ranks through real DDP comm hooks.

Lossless configurations are checked against `single`; lossy ones step by step
against a reference computed here from both ranks' recorded inputs (gradients,
residuals, warm-start factors, the seeds of random draws); resumes against the
run that never stopped. One run_ranks call (a module fixture) trains every
configuration in turn, so the process start is paid once.
"""
import math

import pytest
import torch

from cluster import Comm, ring_allreduce_bytes
from orchestrator import checkpoint
from orchestrator.checkpoint import Checkpointer
from orchestrator.config import JobSpec
from orchestrator.trainer import RankTrainer
from strategies.compression.int8 import dequantize, quantize
from strategies.compression.powersgd import matrix_shape, orthonormalize
from strategies.compression.base import Wire, draw_seed
from strategies.compression.int8 import Int8Compressor
from strategies.compression.powersgd import PowerSGDCompressor
from strategies.compression.terngrad import TernGradCompressor
from strategies.compression.topk import TopKCompressor
from strategies.compression.topk import k_of
from tests.distributed.test_ddp import _assert_same, full_state, train_state
from tests.ranks import run_ranks

GPT = {"name": "gpt-tiny", "n_layers": 2, "d_model": 64, "seq_len": 32}
WORLD = 2


def _trainer(rank, world, strategy: dict, steps: int) -> RankTrainer:
    spec = JobSpec(workload=GPT, strategy=strategy, workers=world, steps=steps, batch_size=8, seed=3)
    return RankTrainer(spec, rank=rank, world=world, device=torch.device("cpu"))


# every strategy while still in its uncompressed warm-up, and topk sending every value
LOSSLESS = [{"name": "topk", "ratio": 1.0}] + [{"name": n, "warmup_steps": 5}
                                                for n in ("powersgd", "adaptive", "terngrad", "int8")]
LOSSY = [
    {"name": "powersgd", "rank": 2, "warmup_steps": 1},
    {"name": "adaptive", "warmup_steps": 1, "every": 2, "error_budget": 0.5},
    {"name": "topk", "ratio": 0.05},
    {"name": "terngrad"},
    {"name": "int8", "bucket_mb": 0.1, "block_size": 0},  # several buckets, exchanged together at the last
]
# the papers' optimizer: momentum SGD at the method's own lr (weight decay defaults to the papers' 1e-4)
SGD = {"name": "int8", "warmup_steps": 5, "optimizer": "sgd", "lr": 0.05}
RESUMED = [{"name": "powersgd", "warmup_steps": 1, "rank": 2},
           {"name": "adaptive", "warmup_steps": 1, "every": 3}, {"name": "terngrad"}]
STEPS = 3


def _everything(rank, world, root):
    return {"lossless": _train_each(rank, world, LOSSLESS), "sgd": _train_each(rank, world, [SGD]), "lossy": _train_recorded(rank, world, LOSSY),
            "full": _train_and_save(rank, world, RESUMED, root), "resumed": _resume(rank, world, RESUMED, root)}


@pytest.fixture(scope="module")  # one shared 2-rank run of every configuration: ~25 s on a quiet 2-core machine
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compression")
    return run_ranks(_everything, WORLD, tmp, str(tmp / "runs"))


@pytest.mark.slow
def test_lossless_configurations_match_single(runs):
    """Every strategy still in its uncompressed warm-up, and topk sending every
    value: the same parameters as `single` after 5 steps (rtol = atol = 1e-5, as ddp)."""
    ref = train_state(0, 1, GPT, "single")
    for per_rank in (r["lossless"] for r in runs):
        for s in LOSSLESS:
            _assert_same(per_rank[s["name"]]["state"], ref["state"])
        assert per_rank["topk"]["ratios"] == [pytest.approx(0.5)] * 5  # (index, value) per value: half of dense
        for name in ("powersgd", "adaptive", "terngrad", "int8"):
            assert per_rank[name]["ratios"] == [1.0] * 5, name
    spec = JobSpec(workload=GPT, strategy="single", workers=1, steps=5, batch_size=8, seed=3,
                   optim={"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4})
    single = RankTrainer(spec, rank=0, world=1, device=torch.device("cpu"))
    for _ in range(5):
        single.train_step()
    assert type(single.strategy.opt) is torch.optim.SGD
    for r in runs:
        _assert_same(r["sgd"]["int8"]["state"], full_state(single.strategy.module))


def _train_each(rank, world, strategies):
    out = {}
    for s in strategies:
        t = RankTrainer(JobSpec(workload=GPT, strategy=s, workers=world, steps=5, batch_size=8, seed=3),
                        rank=rank, world=world, device=torch.device("cpu"))
        rows = [t.train_step() for _ in range(5)]
        out[s["name"]] = {"state": full_state(t.strategy.module), "ratios": [r["compression_ratio"] for r in rows]}
    return out


# -- lossy: each step against a reference from both ranks' recorded inputs -----------------------


def _record(compressor) -> list[dict]:
    """Wrap ``compressor.reduce`` to log what each call saw and produced."""
    log, inner = [], compressor.reduce

    def reduce(grads, step):
        names = [n for n, _ in grads]
        entry = {"step": step, "names": names, "in": {n: g.clone() for n, g in grads},
                 "err": {n: e.clone() for n, e in getattr(compressor, "err", {}).items() if n in names},
                 "q": {n: q.clone() for n, q in getattr(compressor, "q", {}).items()}}
        inner(grads, step)
        entry["out"] = {n: g.clone() for n, g in grads}
        entry["err_after"] = {n: e.clone() for n, e in getattr(compressor, "err", {}).items() if n in names}
        entry["rank"] = {n: compressor.rank_of(n) for n in names} if hasattr(compressor, "rank_of") else {}
        log.append(entry)

    compressor.reduce = reduce
    return log


def _train_recorded(rank, world, strategies):
    out = {}
    for s in strategies:
        t = _trainer(rank, world, s, STEPS)
        log = _record(t.strategy.compressor)
        rows = [t.train_step() for _ in range(STEPS)]
        params = {n: p.detach().clone() for n, p in t.strategy.module.named_parameters()}
        out[s["name"]] = {"log": log, "rows": rows, "params": params,
                          "n_params": sum(p.numel() for p in params.values())}
    return out


def _low_rank_reference(calls, rank_of, names, seed):
    """PowerSGD on both ranks' inputs: P = sum M_r Q; P^ = orth(P); out = P^ mean(M_r^T P^)^T;
    residual_r = M_r - P^ (M_r^T P^)^T. Q: last step's, or drawn from (job seed, step, tensor)."""
    out, err = {}, [{} for _ in calls]
    for n in calls[0]["names"]:
        ms = [c["in"][n] + c["err"].get(n, 0) for c in calls]
        r = rank_of(n)
        if r is None:
            out[n] = sum(ms) / len(ms)
            continue
        ms = [m.view(matrix_shape(m.shape)) for m in ms]
        q = calls[0]["q"].get(n)
        have = 0 if q is None else q.shape[1]
        if have < r:
            gen = torch.Generator().manual_seed(draw_seed(seed, 0, calls[0]["step"], sorted(names).index(n)))
            new = torch.randn(ms[0].shape[1], r - have, generator=gen)
            q = new if q is None else torch.cat([q, new], 1)
        basis = orthonormalize(sum(m @ q[:, :r] for m in ms))
        q_local = [m.T @ basis for m in ms]
        out[n] = (basis @ (sum(q_local) / len(ms)).T).view_as(calls[0]["in"][n])
        for e, m, ql in zip(err, ms, q_local):
            e[n] = m - basis @ ql.T
    return out, err


def _topk_reference(calls, ratio):
    out, err = {}, [{} for _ in calls]
    for n in calls[0]["names"]:
        total = 0
        for c, e in zip(calls, err):
            acc = (c["in"][n] + c["err"].get(n, 0)).flatten()
            mask = torch.zeros_like(acc, dtype=torch.bool)
            mask[acc.abs().topk(k_of(acc.numel(), ratio)).indices] = True
            total = total + acc * mask
            e[n] = (acc * ~mask).view_as(c["in"][n])
        out[n] = (total / len(calls)).view_as(calls[0]["in"][n])
    return out, err


def _terngrad_reference(calls, names, seed, sigmas=2.5):
    """Each rank's draws come from a generator seeded by (job seed, rank, step, tensor)."""
    out = {}
    for n in calls[0]["names"]:
        gens = [torch.Generator().manual_seed(draw_seed(seed, r, c["step"], sorted(names).index(n)))
                for r, c in enumerate(calls)]
        clipped = []
        for c in calls:
            g = c["in"][n].flatten()
            bound = sigmas * g.std().item()
            clipped.append(g.clamp(-bound, bound))
        s = max(c.abs().max() for c in clipped)
        total = sum(torch.sign(c) * (torch.rand(c.shape, generator=gen) < c.abs() / s) for c, gen in zip(clipped, gens))
        out[n] = (s * total / len(calls)).view_as(calls[0]["in"][n])
    return out, None


def _int8_reference(calls):
    flats = [torch.cat([c["in"][n].flatten() for n in c["names"]]) for c in calls]
    n, w = flats[0].numel(), len(calls)
    chunk = math.ceil(n / w)
    mean_chunks = []
    for j in range(w):  # rank j's chunk: each rank's quantized copy, averaged, quantized again
        rows = torch.stack([torch.cat([f, f[-1:].expand(w * chunk - n)])[j * chunk:(j + 1) * chunk] for f in flats])
        mean = dequantize(*quantize(rows)).sum(0) / w
        mean_chunks.append(dequantize(*quantize(mean[None]))[0])
    result = torch.cat(mean_chunks)[:n].split([calls[0]["in"][k].numel() for k in calls[0]["names"]])
    return {k: v.view_as(calls[0]["in"][k]) for k, v in zip(calls[0]["names"], result)}, None


def _expected_bytes(name, calls_of_step, world):
    """What each rank sends in one step, from the bucket contents and the formulas."""
    total = 0
    for calls in calls_of_step:
        grads = calls[0]["in"]
        if name == "topk":
            total += (world - 1) * 8 * sum(k_of(g.numel(), 0.05) for g in grads.values())
        elif name == "terngrad":
            total += ring_allreduce_bytes(4 * len(grads), world) + (world - 1) * math.ceil(
                sum(g.numel() for g in grads.values()) / 4)
        elif name == "int8":
            total += 2 * (world - 1) * (math.ceil(sum(g.numel() for g in grads.values()) / world) + 8)
        elif name == "powersgd":
            ranks = calls[0]["rank"]
            p = sum(g.numel() if ranks[n] is None else g.shape[0] * ranks[n] for n, g in grads.items())
            q = sum(matrix_shape(g.shape)[1] * ranks[n] for n, g in grads.items() if ranks[n] is not None)
            total += ring_allreduce_bytes(4 * p, world) + (ring_allreduce_bytes(4 * q, world) if q else 0)
        else:
            return None  # adaptive: its profile exchange is checked in the unit tests
    return total


@pytest.mark.slow
def test_compressed_update_matches_reference(runs):
    out = [r["lossy"] for r in runs]
    for s in LOSSY:
        name = s["name"]
        r0, r1 = out[0][name], out[1][name]
        for k in r0["params"]:  # replicas stay identical
            assert torch.equal(r0["params"][k], r1["params"][k]), f"{name}: {k} differs between ranks"
        dense = ring_allreduce_bytes(4 * r0["n_params"], WORLD)
        compressed_steps = 0
        for step in range(STEPS):
            calls = [(a, b) for a, b in zip(r0["log"], r1["log"]) if a["step"] == step]
            row = r0["rows"][step]
            # Comm's count and the strategy's own tally agree
            assert row["compression_ratio"] == pytest.approx(dense / row["bytes_sent"], rel=1e-12), name
            if not calls:  # warm-up: plain all-reduce
                assert row["bytes_sent"] == dense, name
                continue
            compressed_steps += 1
            assert row["compression_ratio"] > 3, name
            expected = _expected_bytes(name, calls, WORLD)
            if expected is not None:
                assert row["bytes_sent"] == row["bytes_received"] == expected, name
            for pair in calls:
                assert pair[0]["names"] == pair[1]["names"]
                if name in ("powersgd", "adaptive"):
                    ref, err = _low_rank_reference(pair, lambda n: pair[0]["rank"][n], r0["params"], seed=3)
                elif name == "topk":
                    ref, err = _topk_reference(pair, 0.05)
                elif name == "terngrad":
                    ref, err = _terngrad_reference(pair, r0["params"], seed=3)
                else:
                    ref, err = _int8_reference(pair)
                for rank, call in enumerate(pair):
                    for n, v in ref.items():
                        torch.testing.assert_close(call["out"][n], v, rtol=1e-5, atol=1e-6,
                                                   msg=lambda m: f"{name} step {step} rank {rank} {n}: {m}")
                        if err is not None and n in err[rank]:
                            torch.testing.assert_close(call["err_after"][n].view_as(err[rank][n]), err[rank][n],
                                                       rtol=1e-5, atol=1e-6)
        assert compressed_steps >= 2, name


def _train_and_save(rank, world, strategies, root):
    out = {}
    for s in strategies:
        t = _trainer(rank, world, s, 4)
        meta = {"workload": "gpt-tiny", "strategy": s["name"], "format": t.strategy.checkpoint_format,
                "shapes": checkpoint.model_shapes(t.workload)}
        ck = Checkpointer(f"{root}/{s['name']}", every=2, keep=2, rank=rank, world=world, meta=meta)
        losses = []
        while t.step < 4:
            losses.append(t.train_step()["loss"])
            if ck.due(t.step):
                ck.save(t)
        out[s["name"]] = {"losses": losses, "state": full_state(t.strategy.module)}
    return out


def _resume(rank, world, strategies, root):
    out = {}
    for s in strategies:
        t = _trainer(rank, world, s, 4)
        checkpoint.restore(t, checkpoint.step_url(f"{root}/{s['name']}", 2))
        out[s["name"]] = {"losses": [t.train_step()["loss"] for _ in range(2)], "state": full_state(t.strategy.module)}
    return out


@pytest.mark.slow
def test_resume_restores_residuals_factors_and_seeds(runs):
    """Saved at step 2 (compressing from step 2 on), restored into a fresh trainer:
    steps 3-4 bit-identical to the run that never stopped, which needs every
    rank's residuals, warm-start Q and adaptive's choice back, and draws that do
    not depend on DDP's bucket order (topk's residuals are powersgd's kind)."""
    for r in runs:
        for s in RESUMED:
            name = s["name"]
            assert r["resumed"][name]["losses"] == r["full"][name]["losses"][2:], name
            for k, v in r["full"][name]["state"].items():
                assert torch.equal(r["resumed"][name]["state"][k], v), f"{name}: {k}"


# -- bytes at another world size, through the real Comm ------------------------------------------
SHAPES = {"w": torch.Size([40, 25]), "b": torch.Size([7])}  # 1007 values


def _count_each(rank, world):
    """One reduce of each compressor on real gloo collectives; Comm's counters per compressor."""
    comm, out = Comm(), {}
    makers = {
        "powersgd": lambda w: PowerSGDCompressor(w, SHAPES, rank=2, min_compression_rate=2.0, seed=0),
        "terngrad": lambda w: TernGradCompressor(w, SHAPES, seed=0, clip_sigma=2.5),
        "int8": lambda w: Int8Compressor(w, SHAPES, seed=0, block_size=0),
        "topk": lambda w: TopKCompressor(w, SHAPES, seed=0, ratio=0.1),
    }
    gen = torch.Generator().manual_seed(rank)
    for name, make in makers.items():
        wire = Wire(comm)
        make(wire).reduce([(n, torch.randn(s, generator=gen)) for n, s in SHAPES.items()], 0)
        stats = comm.take_stats()
        out[name] = (stats.bytes_sent, stats.bytes_received, wire.sent)
    return out


def test_bytes_counted_at_world_3_equal_the_formulas(tmp_path):
    """Comm's own counters (not the compressors' tallies) against the closed forms
    of docs/compression.md, at a world size that divides nothing evenly."""
    world = 3
    ring = lambda nbytes: ring_allreduce_bytes(nbytes, world)  # noqa: E731 (tested against gloo in test_comm)
    expected = {
        "powersgd": ring(4 * (7 + 40 * 2)) + ring(4 * 25 * 2),  # bias + P, then Q
        "terngrad": ring(4 * 2) + (world - 1) * math.ceil(1007 / 4),  # scales (MAX), codes (all-gather)
        "int8": 2 * (world - 1) * (math.ceil(1007 / world) + 8),  # all-to-all + all-gather of a chunk + header
        "topk": (world - 1) * 8 * (k_of(1000, 0.1) + k_of(7, 0.1)),  # all-gather of (index, value) pairs
    }
    for per_rank in run_ranks(_count_each, world, tmp_path):
        for name, want in expected.items():
            assert per_rank[name] == (want, want, want), name
