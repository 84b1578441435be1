"""Cutting a workload's blocks into pipeline stages, balanced by measured cost.

Every rank measures every block's F, B and W times on one probe micro-batch
(the B/W split of ``backward.py``); the pipeline part averages them over ranks so
all ranks cut alike, and the blocks are cut into contiguous stages minimising
the slowest stage. With ``balance="params"`` parameter counts stand in for time.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from strategies.pipeline.backward import SplitBackward
from strategies.pipeline.simulate import StageCost
from workloads import Batch, Workload


@dataclass(frozen=True)
class BlockProfile:
    f: float  # seconds, forward
    b: float  # seconds, gradient w.r.t. the block input (and its owners' outputs)
    w: float  # seconds, weight gradients
    params: int

    @property
    def total(self) -> float:
        return self.f + self.b + self.w


def partition(costs: list[float], n: int) -> list[tuple[int, int]]:
    """``n`` contiguous, non-empty ranges [start, end) of the blocks minimising the
    largest summed cost (exact, dynamic programming; ties go to the earliest cut)."""
    k = len(costs)
    if n > k:
        raise ValueError(f"stages: {n} pipeline stages need at least {n} blocks; the workload has {k}")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][i]: least max-stage cost of cutting blocks[:i] into s stages; cut[s][i]: the last cut
    best = [[inf] * (k + 1) for _ in range(n + 1)]
    cut = [[0] * (k + 1) for _ in range(n + 1)]
    best[0][0] = 0.0
    for s in range(1, n + 1):
        for i in range(s, k - (n - s) + 1):
            for j in range(s - 1, i):
                v = max(best[s - 1][j], prefix[i] - prefix[j])
                if v < best[s][i]:
                    best[s][i], cut[s][i] = v, j
    bounds, i = [], k
    for s in range(n, 0, -1):
        bounds.append((cut[s][i], i))
        i = cut[s][i]
    return bounds[::-1]


def boundary_shapes(blocks: list[nn.Module], probe: Batch) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """Each block's output shape without the batch dimension, and dtype (a no-grad
    forward of the probe); pipeline messages are allocated from these."""
    out, x = [], probe[0]
    with torch.no_grad():
        for i, block in enumerate(blocks):
            x = block(x)
            if not isinstance(x, torch.Tensor) or x.shape[:1] != probe[0].shape[:1]:
                raise ValueError(f"block {i} ({type(block).__name__}) returns {type(x).__name__} "
                                 f"{tuple(getattr(x, 'shape', ()))}: pipeline stages pass one tensor whose "
                                 f"first dimension is the batch ({probe[0].shape[0]})")
            out.append((tuple(x.shape[1:]), x.dtype))
    for i, (_, dtype) in enumerate(out[:-1]):
        if not dtype.is_floating_point:
            raise ValueError(f"block {i} returns {dtype}: a stage boundary must carry a floating-point "
                             f"tensor so that its gradient can flow back")
    return out


def measure_blocks(blocks: list[nn.Module], workload: Workload, probe: Batch, *,
                   repeats: int = 3) -> list[BlockProfile]:
    """F/B/W seconds of every block on ``probe``, the best of ``repeats`` after a
    warm-up; rounds go over all blocks in turn, so a machine's load drifting
    during the measurement touches every block alike. The last block includes
    the loss. Gradients are discarded."""
    inputs, x = [], probe[0]
    with torch.no_grad():
        for block in blocks:
            inputs.append(x)
            x = block(x)
    best = [[float("inf")] * 3 for _ in blocks]
    splits = [SplitBackward(block) for block in blocks]
    try:
        for rep in range(repeats + 1):
            for i, (block, split) in enumerate(zip(blocks, splits)):
                times = _time_block(block, split, inputs[i], workload, probe, last=i == len(blocks) - 1)
                if rep:
                    best[i] = [min(a, b) for a, b in zip(best[i], times)]
    finally:
        for block, split in zip(blocks, splits):
            split.remove()
            for p in block.parameters():
                p.grad = None
    return [BlockProfile(*t, sum(p.numel() for p in block.parameters())) for t, block in zip(best, blocks)]


def _time_block(block: nn.Module, split: SplitBackward, x: torch.Tensor, workload: Workload, probe: Batch, *,
                last: bool) -> tuple[float, float, float]:
    xin = x.detach().requires_grad_(x.is_floating_point())
    t0 = time.perf_counter()
    with split.capturing() as captured:
        out = block(xin)
    root = workload.loss(out, probe) if last else out
    t1 = time.perf_counter()
    _, pending = split.backward_input(root, None if last else torch.ones_like(root), xin, captured)
    t2 = time.perf_counter()
    split.backward_weight(pending)
    return t1 - t0, t2 - t1, time.perf_counter() - t2


def stage_costs(profiles: list[BlockProfile], bounds: list[tuple[int, int]], *, per_rank: int) -> list[StageCost]:
    """Per-stage simulator costs from block profiles; each stage holds 1/per_rank
    of a rank's activation unit (no communication cost: not measured)."""
    return [StageCost(f=sum(p.f for p in profiles[a:b]), b=sum(p.b for p in profiles[a:b]),
                      w=sum(p.w for p in profiles[a:b]), mem=1.0 / per_rank) for a, b in bounds]
