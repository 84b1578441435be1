"""Pipeline schedules as data: actions, their string form, and the validator.

An action is (stage, op, micro-batch), written ``2F0`` (stage 2, forward,
micro-batch 0). ``B`` computes the gradient w.r.t. the stage's input only and
``W`` the gradient w.r.t. its weights (the zero-bubble split); ``BW`` is a full
backward (both at once), as GPipe and 1F1B run it. A schedule is, per rank, the
ordered list of actions that rank executes, plus where each stage lives.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple


class Op(str, Enum):
    F = "F"    # forward
    B = "B"    # gradient w.r.t. the stage input (needs a later W)
    W = "W"    # gradient w.r.t. the stage weights
    BW = "BW"  # full backward: B and W in one pass

    def __str__(self) -> str:
        return self.value


class Action(NamedTuple):
    stage: int
    op: Op
    mb: int

    def __str__(self) -> str:
        return f"{self.stage}{self.op.value}{self.mb}"


_ACTION = re.compile(r"^(\d+)(BW|F|B|W)(\d+)$")


def parse_action(text: str) -> Action:
    m = _ACTION.match(text.strip())
    if not m:
        raise ValueError(f"action {text!r}: expected STAGE OP MICROBATCH such as '2F0', '2B0', '2W0' or '2BW0'")
    return Action(int(m.group(1)), Op(m.group(2)), int(m.group(3)))


class ScheduleError(ValueError):
    """A schedule that cannot run; names the first broken rank and step."""

    def __init__(self, rank: int, step: int, why: str):
        super().__init__(f"rank {rank}, step {step}: {why}")
        self.rank, self.step = rank, step


@dataclass(kw_only=True)
class Schedule:
    """``ranks[r]`` is rank r's action order; ``placement[s]`` the rank holding stage s."""

    name: str
    microbatches: int
    placement: tuple[int, ...]
    ranks: list[list[Action]] = field(repr=False)

    @property
    def n_ranks(self) -> int:
        return len(self.ranks)

    @property
    def n_stages(self) -> int:
        return len(self.placement)

    def local_stages(self, rank: int) -> list[int]:
        return [s for s, r in enumerate(self.placement) if r == rank]

    def splits_backward(self) -> bool:
        return any(a.op is Op.W for acts in self.ranks for a in acts)

    def format(self) -> str:
        head = (f"# {self.name}: {self.n_ranks} ranks, {self.n_stages} stages, {self.microbatches} micro-batches; "
                f"placement {' '.join(map(str, self.placement))}")
        return "\n".join([head] + [f"rank {r}: " + " ".join(map(str, acts)) for r, acts in enumerate(self.ranks)])


def parse_schedule(text: str, *, name: str = "custom") -> Schedule:
    """Inverse of ``Schedule.format``. Without the header, placement (each stage on
    the rank whose list holds it) and the micro-batch count come from the actions."""
    ranks: dict[int, list[Action]] = {}
    declared: tuple[int, ...] | None = None
    for line in text.strip().splitlines():
        line = line.strip()
        if line.startswith("#"):
            if ":" in line:
                name = line[1:].split(":", 1)[0].strip()
            if "placement" in line:
                declared = tuple(int(t) for t in line.rsplit("placement", 1)[1].split())
            continue
        if not line:
            continue
        head, sep, body = line.partition(":")
        m = re.match(r"^rank\s+(\d+)$", head.strip())
        if not sep or not m:
            raise ValueError(f"schedule line {line[:40]!r}: expected 'rank N: 0F0 0F1 ...'")
        ranks[int(m.group(1))] = [parse_action(t) for t in body.split()]
    if sorted(ranks) != list(range(len(ranks))):
        raise ValueError(f"schedule ranks {sorted(ranks)}: expected 0..{len(ranks) - 1}")
    m = 1 + max((a.mb for acts in ranks.values() for a in acts), default=-1)
    lists = [ranks[r] for r in range(len(ranks))]
    if declared is not None:
        return Schedule(name=name, microbatches=m, placement=declared, ranks=lists)
    where: dict[int, int] = {}
    for r, acts in enumerate(lists):
        for a in acts:
            if where.setdefault(a.stage, r) != r:
                raise ValueError(f"stage {a.stage} appears on ranks {where[a.stage]} and {r}: "
                                 f"give the placement in a '# ...; placement 0 1 ...' header")
    n_stages = max(where, default=-1) + 1
    if sorted(where) != list(range(n_stages)):
        raise ValueError(f"stages {sorted(where)}: expected 0..{n_stages - 1}")
    return Schedule(name=name, microbatches=m, placement=tuple(where[s] for s in range(n_stages)), ranks=lists)


def dependencies(a: Action, n_stages: int) -> list[tuple[int, str, int]]:
    """What must have finished before ``a`` can start, as (stage, 'F' | 'B', mb):
    'B' means the input gradient of that stage exists (a B or a BW)."""
    if a.op is Op.F:
        return [(a.stage - 1, "F", a.mb)] if a.stage > 0 else []
    if a.op is Op.W:
        return [(a.stage, "B", a.mb)]
    deps = [(a.stage, "F", a.mb)]
    if a.stage < n_stages - 1:
        deps.append((a.stage + 1, "B", a.mb))
    return deps


def done_key(a: Action) -> tuple[int, str, int]:
    """The fact an action establishes (what ``dependencies`` refers to)."""
    return (a.stage, "F" if a.op is Op.F else "W" if a.op is Op.W else "B", a.mb)


def validate(schedule: Schedule) -> None:
    """Raise ScheduleError at the first broken rank and step: actions on the wrong
    rank, out of range, missing or repeated; a W before its B; and, across ranks,
    an order in which some rank waits forever (a deadlock)."""
    S, m = schedule.n_stages, schedule.microbatches
    if len(schedule.ranks) != 1 + max(schedule.placement, default=-1):
        raise ScheduleError(0, 0, f"{len(schedule.ranks)} rank lists for placement {schedule.placement}")
    seen: dict[tuple[int, str, int], tuple[int, int]] = {}
    for r, acts in enumerate(schedule.ranks):
        for i, a in enumerate(acts):
            if not (0 <= a.stage < S and 0 <= a.mb < m):
                raise ScheduleError(r, i, f"{a}: stage must be in [0, {S}) and micro-batch in [0, {m})")
            if schedule.placement[a.stage] != r:
                raise ScheduleError(r, i, f"{a}: stage {a.stage} lives on rank {schedule.placement[a.stage]}")
            key = (a.stage, a.op.value, a.mb)
            if key in seen:
                raise ScheduleError(r, i, f"{a} repeated (first at step {seen[key][1]})")
            seen[key] = (r, i)
            if a.op is Op.BW and ((a.stage, "B", a.mb) in seen or (a.stage, "W", a.mb) in seen):
                raise ScheduleError(r, i, f"{a}: this micro-batch already has a split backward (B/W)")
            if a.op in (Op.B, Op.W) and (a.stage, "BW", a.mb) in seen:
                raise ScheduleError(r, i, f"{a}: this micro-batch already has a full backward ({a.stage}BW{a.mb})")
            if a.op is Op.W and (a.stage, "B", a.mb) not in seen:
                raise ScheduleError(r, i, f"{a} before {a.stage}B{a.mb}")
    for s in range(S):
        r = schedule.placement[s]
        for j in range(m):
            has = {op for op in ("F", "B", "W", "BW") if (s, op, j) in seen}
            missing = ({"F"} - has) or ({"B", "W"} - has if "BW" not in has else set())
            if missing:
                want = " and ".join(f"{s}{op}{j}" for op in sorted(missing))
                raise ScheduleError(r, len(schedule.ranks[r]), f"{want} missing (every micro-batch needs F and "
                                    f"either BW or B and W at every stage)")
    _dry_run(schedule)


def _dry_run(schedule: Schedule) -> None:
    """Run the orders with dependencies only (no times): every rank advances while
    its next action's inputs exist; if all stop before the end, that is a deadlock."""
    S = schedule.n_stages
    pos = [0] * schedule.n_ranks
    done: set[tuple[int, str, int]] = set()
    progress = True
    while progress:
        progress = False
        for r, acts in enumerate(schedule.ranks):
            while pos[r] < len(acts) and all(d in done for d in dependencies(acts[pos[r]], S)):
                done.add(done_key(acts[pos[r]]))
                pos[r] += 1
                progress = True
    stuck = [r for r, acts in enumerate(schedule.ranks) if pos[r] < len(acts)]
    if stuck:
        r = stuck[0]
        a = schedule.ranks[r][pos[r]]
        need = [f"{s}{'F' if k == 'F' else 'B'}{j}" for s, k, j in dependencies(a, S) if (s, k, j) not in done]
        others = ", ".join(f"rank {q} at {schedule.ranks[q][pos[q]]}" for q in stuck[1:4])
        raise ScheduleError(r, pos[r], f"deadlock: {a} waits for {' and '.join(need)}, which never runs"
                            + (f" (also stuck: {others})" if others else ""))
