"""adaptive: PowerSGD with a rank per layer, re-chosen every K steps to send the
fewest bytes within a relative-error budget (after Markov et al. 2024,
"L-GreCo: Layerwise-Adaptive Gradient Compression").

Every ``every`` steps each rank measures, for every weight M (its gradient
plus residual) and each candidate rank r, the squared error a rank-r
approximation leaves: the tail of M's squared singular values, the error of
the best rank-r approximation, which PowerSGD's warm-started power iteration
converges to. The ranks all-reduce these profiles (one small collective), so
every rank solves the same problem over the whole model:

    minimise   sum_l size_l(choice_l)                 (values on the wire)
    subject to sum_l err_l(choice_l) <= B

over choice_l in the candidate ranks that compress layer l, or uncompressed
(size rows x cols, error 0). B is ``error_budget``^2 x sum_l ||M_l||^2 (a
relative error) or, by default and as in L-GreCo, sum_l err_l(rank): the
error uniform rank-``rank`` PowerSGD would leave, spent where it saves the
most bytes. L-GreCo's dynamic program solves it with errors discretised into
steps of B / 4000 (see ``choose`` for the rounding). Between choices the
exchange is ``powersgd``'s, with these ranks.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from pydantic import Field, field_validator

from strategies.compression.base import Compressed, Wire, matrix_shape
from strategies.compression.powersgd import LowRank, LowRankOptions, check_ranks, compresses
from strategies.registry import register_strategy
from workloads import Workload


def choose(options: list[list[tuple[float, float]]], budget: float, bins: int = 4000) -> list[int]:
    """For each layer, the index of one (size, error) option: least total size with
    total error within ``budget``. Errors are rounded up to steps of budget / bins
    and the budget is widened by one step per layer, so any set whose exact error
    is <= budget is allowed, and the result's error is <= budget (1 + layers / bins).
    Each layer needs an option of error 0 (uncompressed)."""
    unit = budget / bins if budget > 0 else math.inf
    cap = bins + len(options)

    def steps(err: float) -> int:
        return 0 if err <= 0 else math.ceil(err / unit) if unit < math.inf else cap + 1

    best = np.zeros(cap + 1)  # best[b]: least size of the layers so far within b steps of error
    picks = []
    for opts in options:
        cand = np.full((len(opts), cap + 1), np.inf)
        for i, (size, err) in enumerate(opts):
            e = steps(err)
            if e <= cap:
                cand[i, e:] = best[: cap + 1 - e] + size
        picks.append(cand.argmin(axis=0))
        best = cand.min(axis=0)
    choice, b = [], cap
    for opts, pick in zip(reversed(options), reversed(picks)):
        i = int(pick[b])
        choice.append(i)
        b -= steps(opts[i][1])
    return choice[::-1]


class AdaptiveCompressor(LowRank):
    def __init__(self, wire: Wire, shapes: dict[str, torch.Size], *, ranks: list[int], error_budget: float | None,
                 every: int, min_compression_rate: float, seed: int, rank: int = 4,
                 error_feedback: bool = True, warm_start: bool = True):
        super().__init__(wire, shapes, seed=seed, error_feedback=error_feedback, warm_start=warm_start)
        reference_rank = rank  # uniform powersgd's rank: sets the default budget
        self.shapes, self.budget, self.every = shapes, error_budget, every
        if error_budget is None:  # the reference set of ranks is always a candidate
            ranks = [*ranks, reference_rank]
        self.candidates = {n: [r for r in sorted(set(ranks)) if compresses(s, r, min_compression_rate)]
                           for n, s in shapes.items()}
        # without a budget: the error uniform rank-`reference_rank` PowerSGD leaves (0 where it would not compress)
        self.reference = {n: reference_rank if compresses(s, reference_rank, min_compression_rate) else None
                          for n, s in shapes.items()}
        self.rank: dict[str, int | None] = {}  # the current choice (None: uncompressed)
        self.chosen_at: dict[str, int] = {}

    def rank_of(self, name: str) -> int | None:
        return self.rank.get(name)

    def reduce(self, grads: list[tuple[str, torch.Tensor]], step: int) -> None:
        if any(n not in self.chosen_at or step - self.chosen_at[n] >= self.every for n, _ in grads):
            self._rechoose(grads, step)
        super().reduce(grads, step)

    def _rechoose(self, grads: list[tuple[str, torch.Tensor]], step: int) -> None:
        layers = [(n, g) for n, g in grads if self.candidates[n]]
        for n, _ in grads:
            self.rank[n], self.chosen_at[n] = None, step
        if not layers:
            return
        profile = []
        for n, g in layers:  # energy, the error left at each candidate rank, and at the reference rank
            m = g.view(matrix_shape(g.shape))
            if n in self.err:
                m = m + self.err[n]
            sq = torch.linalg.svdvals(m.double()).square()
            tail = sq.sum() - torch.cat([sq.new_zeros(1), sq.cumsum(0)])
            ref = tail[self.reference[n]] if self.reference[n] else sq.new_zeros(())
            profile.append(torch.stack([sq.sum()] + [tail[r] for r in self.candidates[n]] + [ref]))
        flat = torch.cat(profile)
        self.wire.all_reduce(flat)  # sums over ranks: every rank now solves the same problem
        options, energy, reference, at = [], 0.0, 0.0, 0
        for n, _ in layers:
            rows, cols = matrix_shape(self.shapes[n])
            cands = self.candidates[n]
            vals = flat[at: at + 2 + len(cands)].tolist()
            at += 2 + len(cands)
            energy, reference = energy + vals[0], reference + vals[-1]
            options.append([((rows + cols) * r, e) for r, e in zip(cands, vals[1:-1])] + [(rows * cols, 0.0)])
        # by default the reference ranks are a candidate set within budget: never more bytes than they send
        picks = choose(options, reference if self.budget is None else self.budget ** 2 * energy)
        for (n, _), i in zip(layers, picks):
            cands = self.candidates[n]
            self.rank[n] = cands[i] if i < len(cands) else None

    def step_metrics(self) -> dict[str, float]:
        chosen = [r for n, r in self.rank.items() if self.candidates.get(n)]
        low = [r for r in chosen if r is not None]
        return {"mean_rank": float(np.mean(low)) if low else 0.0, "dense_layers": float(len(chosen) - len(low))}

    def tensors(self) -> dict[str, torch.Tensor]:
        state = super().tensors()
        names = sorted(self.rank)
        if not names:  # nothing chosen yet (warm-up)
            return state
        # the current choice, so a resumed run keeps it until its next re-choice
        state["choice.names"] = torch.tensor([self.index[n] for n in names], dtype=torch.int64)
        state["choice.rank"] = torch.tensor([self.rank[n] or 0 for n in names], dtype=torch.int64)
        state["choice.at"] = torch.tensor([self.chosen_at[n] for n in names], dtype=torch.int64)
        return state

    def load_tensors(self, state: dict[str, torch.Tensor]) -> None:
        super().load_tensors(state)
        if "choice.names" not in state:
            return
        name_of = {i: n for n, i in self.index.items()}
        for i, r, at in zip(*(state[f"choice.{k}"].tolist() for k in ("names", "rank", "at"))):
            self.rank[name_of[i]], self.chosen_at[name_of[i]] = r or None, at


class AdaptiveOptions(LowRankOptions):
    ranks: list[int] = Field([1, 2, 4, 8, 16, 32], description="candidate ranks per layer (or uncompressed)")
    error_budget: float | None = Field(
        None, description="largest relative error ||M - approx|| / ||M|| over the model, in (0, 1); "
        "default: the error powersgd at `rank` would leave (L-GreCo's constraint)")
    rank: int = Field(4, ge=1, description="the reference uniform rank that sets the default error budget")
    every: int = Field(50, ge=1, description="re-choose the ranks every this many steps")

    @field_validator("ranks")
    @classmethod
    def _ranks(cls, v: list[int]) -> list[int]:
        if not v or min(v) < 1:
            raise ValueError("must be a non-empty list of ranks >= 1")
        return sorted(set(v))

    @field_validator("error_budget")
    @classmethod
    def _budget(cls, v: float | None) -> float | None:
        if v is not None and not 0 < v < 1:
            raise ValueError("must lie in (0, 1) (relative error of the compressed gradient)")
        return v


@register_strategy("adaptive")
class Adaptive(Compressed):
    """ddp with a PowerSGD rank per layer, re-chosen every K steps: fewest bytes within an error budget (L-GreCo)."""

    Options = AdaptiveOptions
    compressor = AdaptiveCompressor

    @classmethod
    def check_options(cls, options: AdaptiveOptions, *, workers: int, workload: Workload) -> None:
        # a candidate too large for some (or all) layers is skipped there; the smallest must fit one
        check_ranks(options.ranks[:1], options.min_compression_rate, workload, "ranks")
        if options.error_budget is None:
            check_ranks([options.rank], options.min_compression_rate, workload, "rank")
