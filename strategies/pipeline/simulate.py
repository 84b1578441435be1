"""Discrete-event run of a schedule with per-stage costs.

Each rank executes its list in order; an action starts when the rank is free
and its inputs exist (plus ``comm`` when they come from another rank). A full
backward ``BW`` costs ``b + w``. Memory per rank, in units of one micro-batch's
activations of one rank's share of the model: F adds ``mem``, B releases all but
``mem_w`` (the part W still needs), W releases ``mem_w``, BW releases ``mem``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

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


def simulate(schedule: Schedule, costs: list[StageCost]) -> SimResult:
    """Times of every action; raises ScheduleError on a deadlock (naming the
    first stuck rank, its step and what it waits for)."""
    S = schedule.n_stages
    if len(costs) != S:
        raise ValueError(f"{len(costs)} stage costs for a schedule of {S} stages")
    dur = [{op: c.duration(op) for op in Op} for c in costs]
    place = schedule.placement
    ends: dict[tuple[int, str, int], float] = {}
    waiting: dict[tuple[int, str, int], list[int]] = {}
    free = [0.0] * schedule.n_ranks
    pos = [0] * schedule.n_ranks
    times: list[list[tuple[Action, float, float]]] = [[] for _ in range(schedule.n_ranks)]
    crossings = 0
    work = list(range(schedule.n_ranks))
    while work:
        r = work.pop()
        acts = schedule.ranks[r]
        while pos[r] < len(acts):
            a = acts[pos[r]]
            deps = dependencies(a, S)
            missing = next((d for d in deps if d not in ends), None)
            if missing is not None:
                waiting.setdefault(missing, []).append(r)
                break
            start = free[r]
            for d in deps:
                t = ends[d]
                if place[d[0]] != r:
                    crossings += 1
                    t += costs[min(d[0], a.stage)].comm
                if t > start:
                    start = t
            end = start + dur[a.stage][a.op]
            times[r].append((a, start, end))
            free[r] = end
            key = done_key(a)
            ends[key] = end
            pos[r] += 1
            if key in waiting:
                work.extend(waiting.pop(key))
    stuck = [r for r in range(schedule.n_ranks) if pos[r] < len(schedule.ranks[r])]
    if stuck:
        r = stuck[0]
        a = schedule.ranks[r][pos[r]]
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
