"""Discrete-event run of a schedule with per-stage costs.

Each rank executes its list in order; an action starts when the rank is free
and its inputs exist (plus ``comm`` when they come from another rank). A full
backward ``BW`` costs ``b + w``. Memory per rank, in units of one micro-batch's
activations of one rank's share of the model: F adds ``mem``, B releases all but
``mem_w`` (the part W still needs), W releases ``mem_w``, BW releases ``mem``.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Callable

from strategies.pipeline.actions import Action, Op, Schedule, ScheduleError, dependencies, done_key


@dataclass(frozen=True, kw_only=True)
class StageCost:
    f: float = 1.0     # forward
    b: float = 1.0     # gradient w.r.t. the input
    w: float = 1.0     # gradient w.r.t. the weights
    comm: float = 0.0  # moving the boundary after this stage across ranks (its output, or that output's gradient)
    mem: float = 1.0   # activations one micro-batch's F leaves until its B
    mem_w: float | None = None  # of those, kept after B until W (default: all of them)

    def duration(self, op: Op) -> float:
        return {Op.F: self.f, Op.B: self.b, Op.W: self.w, Op.BW: self.b + self.w}[op]

    @property
    def held_until_w(self) -> float:
        return self.mem if self.mem_w is None else self.mem_w


def uniform_costs(schedule: Schedule, f: float = 1.0, b: float = 1.0, w: float = 1.0, comm: float = 0.0,
                  mem_w: float | None = None) -> list[StageCost]:
    """Every stage alike; with v stages per rank, each costs 1/v of a rank's share
    (time and memory), so schedules with different placements compare fairly."""
    v = schedule.n_stages / schedule.n_ranks
    scale = 1.0 / v
    return [StageCost(f=f * scale, b=b * scale, w=w * scale, comm=comm, mem=scale,
                      mem_w=None if mem_w is None else mem_w * scale)] * schedule.n_stages


@dataclass
class SimResult:
    schedule: Schedule
    times: list[list[tuple[Action, float, float]]]  # per rank: (action, start, end) in order
    makespan: float                # time 0 to the last action anywhere (a flushed iteration)
    span: list[float]              # per rank: first action's start to last action's end
    busy: list[float]              # per rank: time computing
    peak_memory: list[float]       # per rank, in activation units
    comm_waits: int = 0            # dependency edges that crossed ranks
    notes: list[str] = field(default_factory=list)

    @property
    def bubble(self) -> list[float]:
        """Per rank: the fraction of the makespan the rank is idle."""
        return [1 - b / self.makespan if self.makespan else 0.0 for b in self.busy]

    @property
    def max_span(self) -> float:
        return max(self.span)


def simulate(schedule: Schedule, costs: list[StageCost], *, slowdown: Callable[[int], float] | None = None,
             copies: int = 1) -> SimResult:
    """Times of every action; raises ScheduleError on a deadlock (naming the
    first stuck rank, its step and what it waits for).

    ``slowdown(n)``: how many times longer an action takes while ``n`` actions
    run at once on the machine (ranks sharing its cores: processor sharing, so
    a rank waiting in its bubble leaves its share to the busy ones); ``copies``
    of the schedule run alongside in step (a pipeline's data-parallel replicas),
    each running action counting ``copies`` times. None: every rank has a core
    of its own, an action takes its cost."""
    S = schedule.n_stages
    if len(costs) != S:
        raise ValueError(f"{len(costs)} stage costs for a schedule of {S} stages")
    dur = [{op: c.duration(op) for op in Op} for c in costs]
    place, acts = schedule.placement, schedule.ranks
    ends: dict[tuple[int, str, int], float] = {}
    waiting: dict[tuple[int, str, int], list[int]] = {}
    free = [0.0] * schedule.n_ranks
    pos = [0] * schedule.n_ranks
    times: list[list[tuple[Action, float, float]]] = [[] for _ in range(schedule.n_ranks)]
    # processor sharing: every running action advances alike, so each finishes when the
    # work done by any one since time 0 (``work``) reaches its start's plus its cost
    running: list[tuple[float, int, float]] = []  # heap of (work at which it ends, rank, start)
    ready: list[tuple[float, int]] = []  # heap of (when it may start, rank): its inputs all made
    crossings, t, work = 0, 0.0, 0.0
    check = list(range(schedule.n_ranks))
    while True:
        for r in check:  # ranks just freed, or whose missing input was just made
            if pos[r] == len(acts[r]):
                continue
            a = acts[r][pos[r]]
            deps = dependencies(a, S)
            missing = next((d for d in deps if d not in ends), None)
            if missing is not None:
                waiting.setdefault(missing, []).append(r)
                continue
            start = free[r]
            for d in deps:
                at = ends[d]
                if place[d[0]] != r:
                    crossings += 1
                    at += costs[min(d[0], a.stage)].comm
                start = max(start, at)
            heapq.heappush(ready, (start, r))
        check = []
        while ready and ready[0][0] <= t:
            at, r = heapq.heappop(ready)
            a = acts[r][pos[r]]
            heapq.heappush(running, (work + dur[a.stage][a.op], r, at))
        if not running:
            if not ready:
                break
            t = ready[0][0]
            continue
        k = slowdown(copies * len(running)) if slowdown else 1.0
        if ready and ready[0][0] - t < (running[0][0] - work) * k:  # a start comes first
            work += (ready[0][0] - t) / k
            t = ready[0][0]
            continue
        t += (running[0][0] - work) * k
        work = running[0][0]
        while running and running[0][0] <= work + 1e-12 * max(1.0, work):
            _, r, start = heapq.heappop(running)
            a = acts[r][pos[r]]
            times[r].append((a, start, t))
            free[r] = t
            key = done_key(a)
            ends[key] = t
            pos[r] += 1
            check.append(r)
            check.extend(waiting.pop(key, ()))
    stuck = [r for r in range(schedule.n_ranks) if pos[r] < len(acts[r])]
    if stuck:
        r = stuck[0]
        a = acts[r][pos[r]]
        need = [f"{s}{k}{j}" for s, k, j in dependencies(a, S) if (s, k, j) not in ends]
        raise ScheduleError(r, pos[r], f"deadlock: {a} waits for {' and '.join(need)}, which never runs")
    makespan = max((t[-1][2] for t in times if t), default=0.0)
    return SimResult(
        schedule=schedule, times=times, makespan=makespan,
        span=[t[-1][2] - t[0][1] if t else 0.0 for t in times],
        busy=[sum(e - s for _, s, e in t) for t in times],
        peak_memory=[peak_memory(acts, costs) for acts in schedule.ranks],
        comm_waits=crossings,
    )


def peak_memory(actions: list[Action], costs: list[StageCost]) -> float:
    """Most activation memory one rank holds while running ``actions`` in order."""
    held = peak = 0.0
    for a in actions:
        c = costs[a.stage]
        if a.op is Op.F:
            held += c.mem
            peak = max(peak, held)
        elif a.op is Op.B:
            held -= c.mem - c.held_until_w
        elif a.op is Op.W:
            held -= c.held_until_w
        else:
            held -= c.mem
    return peak
