"""The automatic scheduler: least simulated makespan under a memory limit.

Candidates are (1) every handcrafted schedule whose peak fits the limit and
(2) list schedules built with the measured costs: whenever a rank is free it
runs a ready B (the critical path), else a ready F if its activations fit under
a cap, else a pending W if the next B/F is at least ``theta * T_W`` away, else it
waits. The cap (how many micro-batches may be in flight) and theta are searched,
for one stage per rank and for the V placement. The best candidate is then
improved by swapping adjacent actions (hill climbing, bounded). Since the
handcrafted schedules are candidates, ``auto`` is never worse than the best of
them that fits the limit, under the same cost model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from strategies.pipeline.actions import Schedule, ScheduleError
from strategies.pipeline.generators import check_microbatches, generate, placement as placement_of
from strategies.pipeline.listsched import list_schedule
from strategies.pipeline.simulate import SimResult, StageCost, simulate

MIN_MEMORY = 1.0  # units: one micro-batch's activations of one rank's share of the model


@dataclass
class AutoResult:
    schedule: Schedule
    result: SimResult
    origin: str  # which candidate won, e.g. "zb-h2" or "list(v, cap=4, theta=0.5)+12 swaps"
    candidates: list[tuple[str, float | None, str]] = field(default_factory=list)  # (name, makespan, note)


def check_memory_limit(limit: float | None) -> None:
    if limit is not None and limit < MIN_MEMORY:
        raise ValueError(f"memory_limit={limit:g}: below what any schedule needs ({MIN_MEMORY:g} micro-batch of "
                         f"activations per rank: one stage holds its input from F until its backward)")


def auto_schedule(p: int, m: int, costs: list[StageCost], *, v_costs: list[StageCost] | None = None,
                  memory_limit: float | None = None, budget: int | None = None) -> AutoResult:
    """Search for the least-makespan schedule of m micro-batches on p ranks.

    ``costs`` has one entry per stage with one stage per rank; ``v_costs`` (2p
    entries, optional) describe the model cut into 2p stages, used by the V and
    interleaved placements. ``memory_limit`` is per rank, in activation units
    (``StageCost.mem``); None means unlimited. ``budget`` bounds the simulations
    spent on hill climbing (default: about 200k simulated actions' worth, so the
    search stays within seconds at p=32). The result depends on the inputs only,
    so every rank computes the same schedule."""
    check_memory_limit(memory_limit)
    if len(costs) != p or (v_costs is not None and len(v_costs) != 2 * p):
        raise ValueError(f"auto: {len(costs)} stage costs for {p} ranks"
                         + (f" and {len(v_costs)} for the 2p-stage cut" if v_costs is not None else ""))
    limit = math.inf if memory_limit is None else memory_limit
    found: list[tuple[float, str, SimResult, list[StageCost]]] = []
    notes: list[tuple[str, float | None, str]] = []
    for label, schedule, stage_costs in _candidates(p, m, costs, v_costs, limit):
        if isinstance(schedule, str):
            notes.append((label, None, schedule))
            continue
        res = simulate(schedule, stage_costs)
        peak = max(res.peak_memory)
        fits = peak <= limit + 1e-9
        notes.append((label, res.makespan, f"peak {peak:g}" + ("" if fits else f" > memory_limit {limit:g}")))
        if fits:
            found.append((res.makespan, label, res, stage_costs))
    if not found:
        raise ValueError(f"memory_limit={memory_limit:g}: no schedule of {m} micro-batches on {p} ranks fits")
    _, origin, best, stage_costs = min(found, key=lambda f: f[0])  # ties: the earlier (handcrafted first)
    n_actions = sum(len(acts) for acts in best.schedule.ranks)
    improved, swaps = hill_climb(best, stage_costs, limit,
                                 budget=min(300, 200_000 // n_actions) if budget is None else budget)
    schedule = Schedule(name="auto", microbatches=m, placement=improved.schedule.placement,
                        ranks=improved.schedule.ranks)
    return AutoResult(schedule=schedule, result=simulate(schedule, stage_costs),
                      origin=origin + (f"+{swaps} swaps" if swaps else ""), candidates=notes)


def _candidates(p: int, m: int, costs: list[StageCost], v_costs: list[StageCost] | None, limit: float):
    """(label, schedule or why there is none, stage costs) of every candidate."""
    for name in ("gpipe", "1f1b", "zb-h1", "zb-h2", "zb-v", "interleaved-1f1b"):
        stage_costs = v_costs if name in ("zb-v", "interleaved-1f1b") else costs
        if stage_costs is None:
            continue
        try:
            check_microbatches(name, p, m)
        except ValueError as e:
            yield name, str(e).split(": ", 1)[1], stage_costs
            continue
        yield name, generate(name, p, m), stage_costs
    for family, stage_costs in [("flat", costs)] + ([("v", v_costs)] if v_costs is not None else []):
        place = placement_of("zb-v" if family == "v" else "1f1b", p)
        for cap in _caps(place, m, stage_costs, limit):
            for theta in (0.0, 0.5, 1.0):
                sched = list_schedule(place, m, stage_costs, cap=cap, theta=theta)
                yield (f"list({family}, cap={cap:g}, theta={theta:g})",
                       sched if sched is not None else "stalls under the cap", stage_costs)


def _caps(place: tuple[int, ...], m: int, costs: list[StageCost], limit: float) -> list[float]:
    """In-flight caps worth trying: 1F1B's (p), ZB-H2's (2p-1), the limit, and
    between; always at least one micro-batch's full set of local stages."""
    p = max(place) + 1
    per_mb = max(sum(costs[s].mem for s, r in enumerate(place) if r == q) for q in range(p))
    most = per_mb * m
    picks = {per_mb * k for k in (p, 2 * p - 1, (3 * p) // 2)} | ({limit} if math.isfinite(limit) else set())
    return sorted({min(c, most, limit) for c in picks if min(c, limit) >= per_mb - 1e-9})


def hill_climb(start: SimResult, costs: list[StageCost], limit: float, *, budget: int) -> tuple[SimResult, int]:
    """Swap adjacent actions on a rank while the makespan falls; each try costs a
    simulation, at most ``budget`` of them. Invalid orders (deadlock) are skipped."""
    best, swaps, tries = start, 0, 0
    improved = True
    while improved and tries < budget:
        improved = False
        for r, acts in enumerate(best.schedule.ranks):
            for i in range(len(acts) - 1):
                a, b = acts[i], acts[i + 1]
                if a.op is b.op or (a.stage == b.stage and a.mb == b.mb):
                    continue  # same kind: order within a stage is FIFO; same micro-batch: a dependency
                if tries >= budget:
                    return best, swaps
                tries += 1
                trial = [list(x) for x in best.schedule.ranks]
                trial[r][i], trial[r][i + 1] = b, a
                cand = Schedule(name=best.schedule.name, microbatches=best.schedule.microbatches,
                                placement=best.schedule.placement, ranks=trial)
                try:
                    res = simulate(cand, costs)
                except ScheduleError:
                    continue
                if res.makespan < best.makespan - 1e-9 and max(res.peak_memory) <= limit + 1e-9:
                    best, swaps, improved = res, swaps + 1, True
                    break
            if improved:
                break
    return best, swaps
