"""Failure and straggler policies: pure functions of what the controller saw.

They return decisions and never act; the controller (orchestrator/controller.py)
carries them out. That keeps every decision testable without processes.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Literal

from orchestrator.config import FailureSpec, StragglerSpec


# -- failures -------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Failure:
    kind: Literal["died", "error", "hang", "nan"]
    rank: int  # -1: not one rank's fault (a NaN loss of the whole step)
    step: int  # the last step every rank completed
    message: str


@dataclass(frozen=True, kw_only=True)
class FailureDecision:
    action: Literal["restart", "heal", "raise"]  # heal: only the lost rank's worker is new (Attempt.heal)
    world: int  # workers of the next attempt
    backoff_s: float = 0.0
    reason: str = ""


class FailurePolicy:
    def __init__(self, spec: FailureSpec):
        self.spec = spec

    def make_decision(self, failure: Failure, *, failures: int, world: int, heal: str = "restart") -> FailureDecision:
        """``failures``: how many have happened in this run, this one included;
        ``heal``: how the strategy heals in place (``Strategy.heal``), "restart"
        where it cannot (or the group cannot, or ``failure.heal`` is off)."""
        s = self.spec
        if failure.kind == "nan" and s.nan == "fail":
            return FailureDecision(action="raise", world=world, reason="failure.nan='fail'")
        if failure.kind == "nan" and s.nan == "skip":  # only the controller's run of skipped steps ends here
            return FailureDecision(action="raise", world=world,
                                   reason=f"failure.nan='skip' allows failure.max_nan_steps={s.max_nan_steps} in a row")
        if failures > s.max_failures:
            return FailureDecision(action="raise", world=world,
                                   reason=f"{failures} failures, more than failure.max_failures={s.max_failures}")
        backoff = s.backoff_s * 2 ** (failures - 1)
        lost_one = failure.kind in ("died", "error", "hang") and failure.rank >= 0
        if lost_one and world > 1 and heal != "restart":  # the survivors wait, their state in memory: no backoff
            shrink = s.elastic and world - 1 >= s.min_workers
            return FailureDecision(action="heal", world=world - 1 if shrink else world, reason=(
                f"heal in place ({heal}): " + (f"continue on {world - 1} workers without rank {failure.rank}" if shrink
                                               else f"replace rank {failure.rank}, the others keep their state")
                + f" (failure {failures} of {s.max_failures})"))
        if s.elastic and lost_one and world - 1 >= s.min_workers:
            return FailureDecision(action="restart", world=world - 1, backoff_s=backoff,
                                   reason=f"elastic: continue on {world - 1} workers without rank {failure.rank}")
        if failure.kind == "nan":
            return FailureDecision(action="restart", world=world, backoff_s=0.0,
                                   reason="failure.nan='rollback': restore the last snapshot")
        return FailureDecision(action="restart", world=world, backoff_s=backoff,
                               reason=f"replace the lost worker (restart {failures} of {s.max_failures})")


# The controller's hang deadline stays this fraction of the backend's collective
# timeout, so it fires first and names the hung rank from progress, before every
# waiting peer's collective times out with an error that only echoes the hang.
HANG_BEFORE_COLLECTIVE_TIMEOUT = 0.8


def hang_deadline_s(spec: FailureSpec, recent_step_s: list[float], *, startup_s: float,
                    collective_timeout_s: float) -> float:
    """Seconds without a completed step after which the group is declared hung:
    a multiple of the recent median step time, never below the floor; before
    the attempt's first step, the start-up allowance. Always at most
    HANG_BEFORE_COLLECTIVE_TIMEOUT x ``collective_timeout_s``: a step that long
    has timed out in the backend anyway."""
    if not recent_step_s:
        wanted = max(spec.hang_floor_s, startup_s)
    else:
        wanted = max(spec.hang_floor_s, spec.hang_factor * statistics.median(recent_step_s))
    return min(wanted, HANG_BEFORE_COLLECTIVE_TIMEOUT * collective_timeout_s)


# -- stragglers -----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class StragglerDecision:
    action: Literal["none", "rebalance", "backup", "evict", "keep"]  # keep: evict would go below min_workers
    stragglers: tuple[int, ...] = ()
    shares: tuple[int, ...] = ()  # rebalance: samples per data-parallel replica
    drop: tuple[int, ...] = ()  # backup: ranks whose gradient is left out
    reason: str = ""


@dataclass(kw_only=True)
class StragglerState:
    """What the policy needs from earlier decisions (kept by the controller)."""

    shares: tuple[int, ...]  # samples per data-parallel replica
    ranks_per_replica: int = 1  # replica i is ranks i*g .. i*g+g-1 (pipeline stages, sequence shards)
    drop: tuple[int, ...] = ()
    kept: tuple[int, ...] = ()  # stragglers already reported as kept (evict at failure.min_workers)
    decided_at: int = 0  # step of the last mitigation decision
    history: list[dict[int, float]] = field(default_factory=list)  # per step: rank -> compute seconds per sample


class StragglerPolicy:
    """A rank is a straggler when its compute time per sample exceeds ``factor``
    x the median of the other ranks for ``patience`` consecutive steps. Per-sample, so a rank given fewer samples is not
    mistaken for a recovered one."""

    def __init__(self, spec: StragglerSpec, *, global_batch: int, quantum: int = 1, min_workers: int = 1):
        self.spec, self.global_batch, self.quantum = spec, global_batch, quantum
        self.min_workers = min_workers  # failure.min_workers: evict never shrinks below it

    def stragglers(self, history: list[dict[int, float]]) -> list[int]:
        p = self.spec.patience
        if len(history) < p:
            return []
        slow_in_every: set[int] | None = None
        for per_rank in history[-p:]:
            if len(per_rank) < 2:
                return []
            # against the median of the *other* ranks: with two ranks, the median of
            # all would include the straggler itself
            slow = {r for r, t in per_rank.items()
                    if t > self.spec.factor * statistics.median(v for q, v in per_rank.items() if q != r)}
            slow_in_every = slow if slow_in_every is None else slow_in_every & slow
        return sorted(slow_in_every or ())

    def make_decision(self, state: StragglerState, step: int) -> StragglerDecision:
        s = self.spec
        if s.mitigation == "none" or step - state.decided_at < s.window:
            return StragglerDecision(action="none")  # let the last decision show its effect first
        world = len(state.shares)  # replicas
        if s.mitigation == "backup":
            # Re-decide every window: a dropped rank is measured again the step after.
            found = self.stragglers([h for h in state.history if not set(h) & set(state.drop)] or state.history)
            drop = tuple(found[: world - 1])
            if drop == state.drop:
                return StragglerDecision(action="none")
            return StragglerDecision(action="backup", stragglers=tuple(found), drop=drop,
                                     reason=f"leave out the gradient of rank(s) {list(drop)} (b={len(drop)})"
                                     if drop else "no straggler left: use every gradient again")
        found = self.stragglers(state.history)
        if not found:
            return StragglerDecision(action="none")
        if s.mitigation == "evict":
            worst = max(found, key=lambda r: state.history[-1].get(r, 0.0))
            ranks = world * state.ranks_per_replica
            if ranks - 1 < self.min_workers:
                return StragglerDecision(action="keep", stragglers=tuple(found),
                                         reason=f"rank {worst} stays: evicting it would leave {ranks - 1} workers, "
                                         f"fewer than failure.min_workers={self.min_workers}")
            return StragglerDecision(action="evict", stragglers=tuple(found),
                                     reason=f"rank {worst} is slower than {s.factor:g}x the median; restart without it")
        shares = self.rebalanced(per_replica(state.history[-s.window:], state.ranks_per_replica), world)
        # hysteresis: measurement noise must not reshuffle shares every window
        if max(abs(a - b) for a, b in zip(shares, state.shares)) <= max(self.quantum, self.global_batch // (20 * world)):
            return StragglerDecision(action="none")
        return StragglerDecision(action="rebalance", stragglers=tuple(found), shares=shares,
                                 reason=f"batch shares {list(state.shares)} -> {list(shares)} (by measured speed)")

    def rebalanced(self, history: list[dict[int, float]], world: int) -> tuple[int, ...]:
        """Shares proportional to each rank's measured speed (samples per compute
        second, median over the window), in multiples of the quantum, every rank
        keeping at least one quantum."""
        per_sample = {r: statistics.median([h[r] for h in history if r in h]) for r in range(world)}
        speed = {r: 1.0 / max(t, 1e-9) for r, t in per_sample.items()}
        units = self.global_batch // self.quantum
        raw = [units * speed[r] / sum(speed.values()) for r in range(world)]
        alloc = [max(1, math.floor(x)) for x in raw]
        while sum(alloc) > units:  # shave the largest
            alloc[alloc.index(max(alloc))] -= 1
        order = sorted(range(world), key=lambda r: raw[r] - math.floor(raw[r]), reverse=True)
        for r in order[: units - sum(alloc)]:  # hand out the remainder by largest fraction
            alloc[r] += 1
        i = 0
        while sum(alloc) < units:
            alloc[order[i % world]] += 1
            i += 1
        return tuple(a * self.quantum for a in alloc)


def per_replica(history: list[dict[int, float]], ranks_per_replica: int) -> list[dict[int, float]]:
    """Per-rank compute seconds per sample -> per replica: a replica is as slow as its slowest rank."""
    out = []
    for per_rank in history:
        step: dict[int, float] = {}
        for r, t in per_rank.items():
            step[r // ranks_per_replica] = max(t, step.get(r // ranks_per_replica, t))
        out.append(step)
    return out


def initial_shares(global_batch: int, world: int, quantum: int) -> tuple[int, ...]:
    from workloads import even_shares  # imports torch: not when the controller is only imported

    return tuple(even_shares(global_batch, world, quantum))
