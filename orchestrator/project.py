"""`polytrain project`: the predicted cost of each strategy on N workers of a
target cluster, from a short profiling run on this machine.

``profile`` measures the workload on one rank (one thread): every block's F, B
and W on a real micro-batch (``strategies.pipeline.stages.measure_blocks``), the
tensors' sizes, one AdamW step and the per-step compute of DeMo and PowerSGD on
the real model; ``project`` turns it into ``strategies.projection`` predictions
by the stated layout rules; ``time_to_target`` reads measured loss curves;
``write`` stores projection.parquet and the step-time-against-N picture.
``report_section`` is the comparison report's part.
"""
from __future__ import annotations

import base64
import io
import math
import time
from contextlib import contextmanager
from dataclasses import asdict

import numpy as np
import torch

from strategies.projection import Prediction, Profile, Skip, Target, job_for, predict
from workloads import Workload

SWEEP = tuple(2 ** i for i in range(11))  # the picture's N: 1 .. 1024
COLUMNS = ("strategy", "workers", "scenario", "layout", "predicted_step_s", "predicted_compute_s", "predicted_comm_s",
           "predicted_bubble_s", "bytes_intra", "bytes_inter", "param_bytes_per_rank", "state_bytes_per_rank",
           "steps_to_target", "time_to_target_s")


@contextmanager
def _one_thread():
    """A worker alone on one core: what the projection's speed factor is relative to."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def profile(workload: Workload, *, seed: int = 0, repeats: int = 3) -> Profile:
    """Measure ``workload`` on this rank (seconds and steps of the run are in the result)."""
    from torch import nn

    from strategies.pipeline.stages import boundary_shapes, measure_blocks

    t0 = time.perf_counter()
    with _one_thread(), torch.random.fork_rng():
        torch.manual_seed(seed)
        blocks = workload.blocks()
        source = workload.train_source()
        k = min(workload.micro_batch, len(source))
        probe = tuple(source.gather(np.arange(k)))
        shapes = boundary_shapes(blocks, probe)
        measured = measure_blocks(blocks, workload, probe, repeats=repeats)
        model = nn.Sequential(*blocks)
        attention = {id(m) for m in (workload.attention_layers(blocks) or [])}
        outer = _outer_seconds(model, seed)
        prof = Profile(
            workload=workload.name, micro_batch=k, blocks=tuple(measured),
            shapes=tuple(tuple(tuple(p.shape) for p in b.parameters()) for b in blocks),
            param_bytes=tuple(sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks),
            act_bytes=tuple(k * math.prod(s) * torch.empty((), dtype=d).element_size() for s, d in shapes),
            attention=tuple(i for i, b in enumerate(blocks) if any(id(m) in attention for m in b.modules())),
            optim_s=outer.pop("adamw"), outer_s=outer, steps=repeats + 1)
    return Profile(**{**prof.__dict__, "seconds": time.perf_counter() - t0})


def _best_of(fn, repeats: int = 3) -> float:
    fn()  # warm-up: state allocation
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _outer_seconds(model, seed: int) -> dict[str, float]:
    """One step's own compute of AdamW, DeMo and PowerSGD on the whole model, one rank
    (their collectives at world 1 cost nothing)."""
    from cluster import Comm
    from strategies.base import OptimConfig
    from strategies.compression.base import Wire
    from strategies.compression.powersgd import PowerSGDCompressor
    from strategies.decentralized.demo import DeMo
    from strategies.optim import build_optimizer

    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    opt, _ = build_optimizer(model, OptimConfig(), 100)
    demo = DeMo(params, Comm(), topk=32, chunk=64, decay=0.999, value_dtype=torch.bfloat16,
                decays=[p.dim() > 1 for p in params])
    names = [f"p{i}" for i in range(len(params))]
    psgd = PowerSGDCompressor(Wire(Comm()), {n: p.shape for n, p in zip(names, params)}, rank=4,
                              min_compression_rate=2.0, seed=seed)
    grads = lambda: [(n, p.grad.clone()) for n, p in zip(names, params)]  # noqa: E731
    with torch.no_grad():
        out = {"adamw": _best_of(opt.step), "demo": _best_of(lambda: demo.step(1e-3, 0.0)),
               "powersgd": _best_of(lambda: psgd.reduce(grads(), 100))}
    for p in params:
        p.grad = None
    return out


def parse_strategies(text: str) -> list[tuple[str, dict]]:
    """``ddp,pipeline:schedule=zb-h1`` -> [(name, options)] (compare's spelling)."""
    from orchestrator.compare import parse_strategies as parse

    return [(s["name"], s.get("options", {})) for s in
            ({"name": s} if isinstance(s, str) else s for s in parse(text))]


def project(prof: Profile, workload: Workload, strategies: list[tuple[str, dict]], workers: list[int],
            target: Target, *, microbatches: int = 4) -> tuple[list[Prediction], list[str]]:
    """Every (strategy, N) row the layout rules allow, and a note for each that they do not."""
    rows, notes = [], []
    for name, options in strategies:
        for n in workers:
            try:
                job = job_for(name, options, n, workload, microbatches=microbatches, n_blocks=len(prof.blocks))
            except Skip as e:
                notes.append(str(e))
                continue
            rows.append(predict(prof, job, target))
    return rows, notes
