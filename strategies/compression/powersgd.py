"""powersgd: rank-r gradient compression by one warm-started power iteration
(Vogels, Karimireddy, Jaggi 2019, "PowerSGD"; torch's PowerSGD comm hook is the
reference for the schedule and options).

Per weight M (viewed as rows x cols, first dim x the rest), with this rank's
residual e added (error feedback):

    P = M Q                      Q: cols x r, shared by all ranks (warm start: last step's)
    P <- all-reduce(P); P^ = orthonormal basis of P (reduced QR)
    Q_local = M^T P^;  Q <- all-reduce(Q_local) / world
    applied = P^ Q^T            (identical on every rank, rank <= r)
    e <- M - P^ Q_local^T       (this rank's part the projection missed)

so each rank sends (rows + cols) r values per weight instead of rows x cols.
The residual is the paper's local one (what P^ P^T misses of this rank's M),
not torch's (M minus the averaged reconstruction); both sum over ranks to the
same total, and with the local one a rank whose gradient lies in span(P^)
keeps no residual. Tensors that are 1-D (biases, norms) or too small to gain
((rows + cols) r x min_compression_rate >= rows x cols) are all-reduced
uncompressed, packed into the same all-reduce as the P factors: two
collectives per bucket.
"""
from __future__ import annotations

import torch
from pydantic import Field, field_validator

from strategies.compression.base import (
    CompressionOptions, Compressed, Compressor, Wire, matrix_shape, model_shapes,
)
from strategies.registry import register_strategy
from workloads import Workload


def compresses(shape: torch.Size, rank: int, min_rate: float) -> bool:
    """Whether a weight of this shape gains from rank-``rank`` factors."""
    rc = matrix_shape(shape)
    return rc is not None and (rc[0] + rc[1]) * rank * min_rate < rc[0] * rc[1]


def max_rank(shape: torch.Size, min_rate: float) -> int:
    """The largest rank at which this shape still compresses (0: none)."""
    rc = matrix_shape(shape)
    if rc is None:
        return 0
    r = int(rc[0] * rc[1] / ((rc[0] + rc[1]) * min_rate))
    while r > 0 and not compresses(shape, r, min_rate):
        r -= 1
    return r


def orthonormalize(p: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of p's columns (reduced QR; robust to rank deficiency)."""
    return torch.linalg.qr(p, mode="reduced").Q


class LowRank(Compressor):
    """PowerSGD's exchange for a step's gradients, with a rank per weight given by ``rank_of``
    (None: uncompressed). ``powersgd`` fixes it; ``adaptive`` re-chooses it."""

    def __init__(self, wire: Wire, names: list[str], *, seed: int, error_feedback: bool, warm_start: bool):
        super().__init__(wire, names, seed=seed)
        self.error_feedback, self.warm_start = error_feedback, warm_start
        self.err: dict[str, torch.Tensor] = {}
        self.q: dict[str, torch.Tensor] = {}

    def rank_of(self, name: str) -> int | None:
        raise NotImplementedError

    def _q(self, name: str, cols: int, rank: int, step: int, like: torch.Tensor) -> torch.Tensor:
        """Q for this step: last step's (warm start), trimmed or widened with fresh
        random columns if the rank changed; fresh when not warm-starting. Random
        columns are drawn alike on every rank (seeded by job seed, step and name)."""
        q = self.q.get(name) if self.warm_start else None
        have = 0 if q is None else q.shape[1]
        if have < rank:
            new = torch.randn(cols, rank - have, generator=self.generator(name, step)).to(like)
            q = new if q is None else torch.cat([q, new], dim=1)
        return q[:, :rank]

    def reduce(self, grads: list[tuple[str, torch.Tensor]], step: int) -> None:
        w = self.wire.world
        feedback = self.error_feedback and not self.feedback_paused
        dense, low = [], []
        for name, g in grads:
            r = self.rank_of(name)
            if r is None and feedback and name in self.err:  # compressed before (adaptive): flush its residual
                g.add_(self.err.pop(name))
            (dense if r is None else low).append((name, g, r))
        mats, ps = [], []
        for name, g, r in low:
            m = g.view(matrix_shape(g.shape))
            if feedback and name in self.err:
                m.add_(self.err[name])  # in the bucket buffer: overwritten with the result below
            mats.append(m)
            ps.append(m @ self._q(name, m.shape[1], r, step, m))
        flat = torch.cat([g.reshape(-1) for _, g, _ in dense] + [p.reshape(-1) for p in ps])
        self.wire.all_reduce(flat)
        out = flat.split([g.numel() for _, g, _ in dense] + [p.numel() for p in ps])
        for (_, g, _), v in zip(dense, out):
            g.copy_(v.view_as(g)).div_(w)
        if not low:
            return
        bases = [orthonormalize(p.view_as(p0)) for p, p0 in zip(out[len(dense):], ps)]
        q_local = [m.T @ b for m, b in zip(mats, bases)]
        q_sum = torch.cat([q.reshape(-1) for q in q_local])
        if feedback:  # before q_sum is reduced in place: the residual uses this rank's Q
            for (name, _, _), m, b, q in zip(low, mats, bases, q_local):
                self.err[name] = m - b @ q.T
        self.wire.all_reduce(q_sum)
        for (name, _, _), m, b, q in zip(low, mats, bases, q_sum.split([q.numel() for q in q_local])):
            q_mean = q.view(m.shape[1], b.shape[1]).div_(w)
            if self.warm_start:
                self.q[name] = q_mean
            m.copy_(b @ q_mean.T)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**{f"err.{n}": t for n, t in self.err.items()}, **{f"q.{n}": t for n, t in self.q.items()}}

    def load_tensors(self, state: dict[str, torch.Tensor]) -> None:
        self.err = {k[4:]: v for k, v in state.items() if k.startswith("err.")}
        self.q = {k[2:]: v for k, v in state.items() if k.startswith("q.")}


class PowerSGDCompressor(LowRank):
    def __init__(self, wire: Wire, shapes: dict[str, torch.Size], *, rank: int, min_compression_rate: float,
                 seed: int, error_feedback: bool = True, warm_start: bool = True):
        super().__init__(wire, shapes, seed=seed, error_feedback=error_feedback, warm_start=warm_start)
        self.ranks = {n: rank for n, s in shapes.items() if compresses(s, rank, min_compression_rate)}

    def rank_of(self, name: str) -> int | None:
        return self.ranks.get(name)


class LowRankOptions(CompressionOptions):
    warmup_steps: int = Field(10, ge=0, description="first steps all-reduced uncompressed (torch: start_powerSGD_iter)")
    error_feedback: bool = Field(True, description="add what compression missed to the next step's gradient")
    warm_start: bool = Field(True, description="start each power iteration from the previous step's Q")
    min_compression_rate: float = Field(
        2.0, gt=1, description="compress a weight only if its dense size is this many times its factors' size")


class PowerSGDOptions(LowRankOptions):
    rank: int = Field(4, description="rank r of each compressed weight's approximation")

    @field_validator("rank")
    @classmethod
    def _rank(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be >= 1 (the rank of each compressed weight)")
        return v


def check_ranks(ranks: list[int], min_rate: float, workload: Workload, field: str) -> None:
    """A rank is too large when no weight of the model compresses at it."""
    shapes = model_shapes(workload)
    best = max(shapes.items(), key=lambda kv: max_rank(kv[1], min_rate))
    limit = max_rank(best[1], min_rate)
    too_big = [r for r in ranks if r > limit]
    if too_big:
        raise ValueError(
            f"strategy.{field}={too_big[0]}: no weight of workload {workload.name!r} compresses at that rank "
            f"(at most {limit}, for {best[0]} {tuple(best[1])} at min_compression_rate={min_rate})")


@register_strategy("powersgd")
class PowerSGD(Compressed):
    """ddp with PowerSGD rank-r gradient compression, warm start and error feedback."""

    Options = PowerSGDOptions
    compressor = PowerSGDCompressor

    @classmethod
    def check_options(cls, options: PowerSGDOptions, *, workers: int, workload: Workload) -> None:
        check_ranks([options.rank], options.min_compression_rate, workload, "rank")

