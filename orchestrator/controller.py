"""The controller: a small state machine that starts the worker group, watches
it, and carries out what the failure and straggler policies decide.

    starting -> running -> finished
                  |  ^
                  v  |
               restarting -> errored

It talks to the workers only through the ``Group`` protocol (start, poll,
control, shutdown), so tests drive it with a fake group, one ``tick()`` at a
time, without Ray or threads. The Ray implementation lives in orchestrator/driver.py.
It reads the ranks' typed messages (orchestrator/messages.py) and imports
neither torch nor any strategy.
"""
from __future__ import annotations

import math
import re
import statistics
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol

from cluster.controls import Flushed
from cluster.faults import Injection
from orchestrator.config import JobSpec
from orchestrator.errors import RunFailed, SnapshotLost, is_echo
from orchestrator.messages import (
    Attempt, Begin, Broken, Committing, Drop, Event, Flush, Injected, Live, Message, Row, Shares, SnapshotPart,
)
from orchestrator.metrics import MetricsLog, samples_mean
from orchestrator.policies import (
    Failure, FailurePolicy, StragglerPolicy, StragglerState, hang_deadline_s, initial_shares,
)
from orchestrator.progress import Progress

# Messages of errors that are the echo of another rank's death, not a cause.
@dataclass
class GroupStatus:
    rows: list[Message] = field(default_factory=list)  # the ranks' messages since the last poll, in order
    finished: set[int] = field(default_factory=set)  # ranks whose function has returned (so far, cumulative)
    errors: dict[int, str] = field(default_factory=dict)  # rank -> why it failed


class Group(Protocol):
    def start(self, attempt: Attempt) -> None: ...

    def poll(self) -> GroupStatus: ...

    def control(self, msg: object) -> None: ...

    def shutdown(self) -> None: ...

    # Optional (a group without it restarts every worker): heal in place for ``attempt``
    # (``Attempt.heal``): replace rank ``lost``'s worker, or drop it when ``attempt.world``
    # is smaller; the others keep theirs. Returns the seconds of its phases by name.
    # def heal(self, attempt: Attempt, lost: int) -> dict[str, float]: ...


@dataclass(frozen=True)
class _Evict:
    rank: int
    reason: str


@dataclass(frozen=True)
class _HealStalled:
    """A heal in place made no step within ``heal_timeout_s``: every worker restarts."""

    seconds: float


@dataclass(frozen=True)
class _Finished:
    """Every rank's function returned."""


@dataclass(frozen=True, kw_only=True)
class ControllerOptions:
    """What the controller acts through besides its group: the driver's callbacks,
    and time (tests pass a fake clock and a sleep that returns at once)."""

    # (before=None | step) -> (step, url) of the newest committed checkpoint older than that, or None
    newest_checkpoint: Callable[..., tuple[int, str] | None] = lambda before=None: None
    forget: Callable[[list], None] = lambda handles: None  # releases stashed snapshot parts no longer needed
    first_step_at: Callable[[int], None] = lambda step: None  # called once, when the first step completes
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    # after a rank's error, at most how long to wait for the others' before naming the cause; not
    # waited when it is known: Ray reported a worker dead, or every rank has failed or waits
    grace_s: float = 3.0
    # a heal in place whose group makes no step in this long falls back to the full restart
    # (the same failure: not counted again), e.g. a survivor still blocked in a collective
    heal_timeout_s: float = 30.0


def died(msg: str) -> bool:
    """Ray reported this rank's worker process dead (driver._failure_message)."""
    return "its worker process died" in msg


def root_cause(errors: dict[int, str]) -> tuple[int, str]:
    """The first error that is not the echo of a peer's death."""
    for rank, msg in sorted(errors.items()):
        if not is_echo(msg):
            return rank, msg
    return min(errors.items())


def shared_error(errors: dict[int, str], world: int) -> str | None:
    """The error every rank of the group raised alike (a corrupt checkpoint, an
    option every rank rejects): no one rank's fault, so none is blamed or dropped."""
    if world < 2 or len(errors) < world:
        return None
    bodies = {m.removeprefix(f"rank {r} failed: ") for r, m in errors.items()}
    return bodies.pop() if len(bodies) == 1 else None


def laggard(began: dict[int, int], live: dict[int, dict], world: int, completed: int) -> tuple[int, str] | None:
    """The one rank behind all the others, that they are waiting for: the only one
    that never began the step the others are in, or, all in one step, the only one
    that entered fewer of its communication calls. None unless that is proven
    (a rank that sent no progress, or a tie for last)."""
    steps = [max(began.get(r, 0), completed) for r in range(world)]  # every rank began the completed steps
    low = min(steps)
    behind = [r for r in range(world) if steps[r] == low]
    if len(behind) == 1 and world > 1:
        return behind[0], f"never started step {low + 1}"
    ops = {r: live[r]["ops"] for r in behind if r in live and live[r].get("step") == low}
    if len(ops) < len(behind) or len(behind) < 2:
        return None
    least = min(ops.values())
    last = [r for r in behind if ops[r] == least]
    if len(last) > 1:
        return None
    rank = last[0]
    waiting = next((live[r]["op"] for r in behind if ops[r] > least), "") or "a collective"
    return rank, f"stopped after {least} communication calls of step {low}; its peers wait in {waiting}"


def one_line(rank: int, msg: str, cause: int, live: dict) -> str:
    """A rank's error for the events: an echo says whom it was waiting on and
    in what, the cause keeps its own first line."""
    if not is_echo(msg) or rank == cause:
        return msg.splitlines()[0] if msg else msg
    op = live.get("op") or "a collective"
    reason = re.sub(r"\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", msg.split(": ", 1)[-1]).splitlines()[0][:120]
    who = f"rank {cause}" if cause >= 0 else "a peer"
    return f"peer lost: waiting on {who} in {op} ({reason})"


def renumber(injections: list[Injection], removed: int) -> list[Injection]:
    """Faults follow the workers they were aimed at when rank ``removed`` leaves
    the group: its own go, higher ranks move down by one."""
    out = []
    for inj in injections:
        if inj.rank == removed:
            continue
        if inj.rank is not None and inj.rank > removed:
            inj = replace(inj, rank=inj.rank - 1)
        out.append(inj)
    return out


def presumed_fired(injections: list[Injection], failure: Failure, completed: int, began: int = 0) -> set[Injection]:
    """The one-shot faults that must have fired for this failure to be seen,
    whether or not their report left the worker (a killed worker's last reports
    may die with it): those of steps every rank has finished, and a kill or hang
    of the failing rank at a step it can have reached. ``began``: the furthest
    step any rank reported starting; lockstep ranks are at most one step apart."""
    out = set()
    reached = max(completed, began)
    for inj in injections:
        if not inj.once:
            continue
        here = inj.rank == failure.rank and inj.kind in ("kill", "hang")
        if (inj.step < completed or inj.step == completed and inj.at == "start"
                or here and inj.step <= (reached + 1 if inj.at == "start" else reached)):
            out.add(inj)
    return out


class Controller:
    def __init__(self, spec: JobSpec, make_group: Callable[[], Group], log: MetricsLog, out: Progress, *,
                 first: Attempt, start_step: int = 0, options: ControllerOptions = ControllerOptions()):
        self.spec, self.make_group, self.log, self.out = spec, make_group, log, out
        self.attempt = first
        self.newest_checkpoint = options.newest_checkpoint
        self.clock, self.sleep, self.grace_s = options.clock, options.sleep, options.grace_s
        self.heal_timeout_s = options.heal_timeout_s
        self.first_step_at = options.first_step_at
        self.forget = options.forget
        self.group: Group | None = None  # the running attempt's
        self.failure_policy = FailurePolicy(spec.failure)
        self.straggler_policy = StragglerPolicy(spec.straggler, global_batch=spec.global_batch, quantum=1,
                                                min_workers=spec.failure.min_workers)
        self.state = "starting"
        self.completed = start_step  # the last step every rank finished
        self._first_done = False
        self._announced: tuple[int, ...] = ()
        self.failures = 0
        self.final_loss = float("nan")
        self.last_checkpoint: str | None = None
        self.fired: set[Injection] = set()  # injections that fired: never again in this run
        self._began: dict[int, int] = {}  # rank -> the last step it reported starting, this attempt
        self._live: dict[int, dict] = {}  # rank -> its latest progress (step, communication calls), this attempt
        self.snapshot: tuple[int, list] | None = None  # (step, per-rank handles) of the newest whole one
        self._partial: dict[tuple[int, int], dict[int, object]] = {}  # (attempt, step) -> rank -> handle
        self._recovering: tuple[float, int, int] | None = None  # (detected at, lost from step, restored step)
        self._healing: float | None = None  # when the group was told to heal, until its first step
        self._nan_run: tuple[int, int] | None = None  # (first step, rank) of the non-finite steps in a row, if any

    # -- the state machine ------------------------------------------------------------------------
    def run(self) -> tuple[float, str | None]:
        """Run attempts until the job finishes; raises RunFailed when a policy gives up."""
        try:
            while self.tick() != "finished":
                pass
        finally:
            self._stop_group()
        return self.final_loss, self.last_checkpoint

    def tick(self) -> str:
        """One step of the state machine, and the state it leaves: start an attempt
        (starting, restarting), or poll the running group once, absorb its messages
        and decide (go on, finish, or recover, which may raise RunFailed)."""
        if self.state in ("starting", "restarting"):
            self._start()
            return self.state
        outcome = self._poll()
        if outcome is None:
            return self.state
        if isinstance(outcome, _Finished):
            self._stop_group()
            self.state = "finished"
        else:
            self._recover(outcome)  # stops the group, unless it heals in place
        return self.state

    def _start(self) -> None:
        self.state = "starting"
        self.log.sync()  # what led here (failures, decisions) is on storage before a start that may take long
        self.group = self.make_group()
        self.group.start(self.attempt)
        self._begin_attempt()
        self.state = "running"

    def _stop_group(self) -> None:
        if self.group is not None:
            group, self.group = self.group, None
            group.shutdown()

    def _heal_mode(self, outcome: Failure) -> str:
        """How this failure can heal in place (``Strategy.heal``), "restart" where it
        cannot: healing switched off, a group without ``heal``, or a rank other than
        the lost one whose function ended (it waits for no re-form)."""
        if not hasattr(self.group, "heal") or set(self._errors) - {outcome.rank}:
            return "restart"
        return self.spec.failure.heal_mode(self.spec.strategy_cls().heal)

    def _recover(self, outcome: Failure | _Evict | _HealStalled) -> None:
        world = self._world_before = self.attempt.world
        removed, snapshot_lost, heal = None, False, "restart"
        if not isinstance(outcome, Failure) or SnapshotLost.__name__ in outcome.message and self.attempt.snapshot:
            self._stop_group()
        if isinstance(outcome, _HealStalled):
            # the failure it healed was counted; its recovery goes on as a restart
            detected, new_world, backoff = self.clock(), world, 0.0
            self._healing = None
            self.log.event("heal_stalled", step=self.completed, seconds=outcome.seconds, detail=(
                f"no step {outcome.seconds:.1f} s after the heal began (heal_timeout_s={self.heal_timeout_s:g}): "
                f"every worker restarts"))
        elif isinstance(outcome, _Evict):
            self.log.event("evict", rank=outcome.rank, step=self.completed, detail=outcome.reason)
            new_world, backoff, removed = world - 1, 0.0, outcome.rank
            self.out.note(f"evicting rank {outcome.rank}: {outcome.reason}")
            detected = self.clock()
        elif SnapshotLost.__name__ in outcome.message and self.attempt.snapshot:
            # Not a worker's fault and not counted: every retry would pick the lost snapshot again
            detected, new_world, backoff = self.clock(), world, 0.0
            self.forget(self.attempt.snapshot)
            lost, self.snapshot, snapshot_lost = self.snapshot, None, True
            self.log.event("snapshot_lost", rank=outcome.rank, step=lost[0] if lost else -1, detail=outcome.message)
        else:
            self.failures += 1
            detected = self.clock()
            self.log.event(f"failure:{outcome.kind}", rank=outcome.rank, step=outcome.step, detail=outcome.message)
            mode = self._heal_mode(outcome)
            decision = self.failure_policy.make_decision(outcome, failures=self.failures, world=world, heal=mode)
            self.log.event("decision:" + decision.action, rank=outcome.rank, step=outcome.step, detail=decision.reason)
            if decision.action == "heal":
                heal = mode
            else:
                self._stop_group()
                if self.spec.failure.heal and decision.action == "restart" and self.spec.strategy_cls().heal == "restart":
                    self.log.event("no_heal", rank=outcome.rank, step=outcome.step, detail=(
                        f"strategy {self.spec.strategy.name!r} cannot heal in place (Strategy.heal='restart'): "
                        f"every worker restarts"))
            if decision.action == "raise":
                self.state = "errored"
                self.out.note(f"failed: {outcome.message} ({decision.reason})")
                raise RunFailed(f"{outcome.message} ({decision.reason})")
            new_world, backoff = decision.world, decision.backoff_s
            if new_world < world:
                removed = outcome.rank
            self.out.note(f"{outcome.message}; {decision.reason}")
        self.state = "restarting"
        if backoff:
            self.log.sync()
            self.sleep(backoff)
        if isinstance(outcome, Failure) and not snapshot_lost:  # it failed before any step: nothing fired
            began = max(self._began.values(), default=0)
            self.fired |= presumed_fired(self.attempt.injections, outcome, self.completed, began)
        injections = [i for i in self.attempt.injections if i not in self.fired]
        shares = self.attempt.shares
        if removed is not None:  # fewer workers: even shares again, uneven where the batch does not divide
            injections = renumber(injections, removed)
            even = initial_shares(self.spec.global_batch, self._replicas(new_world), 1)
            shares = list(even) if len(set(even)) > 1 else None
        source = None if heal == "peer" else self._restore_source()  # peer: the survivors hold the state
        lost_from = self.completed
        if (snapshot_lost or isinstance(outcome, _HealStalled)) and self._recovering is not None:
            detected, lost_from = self._recovering[:2]  # the same loss, still being recovered from
        restored = source[0] if source else (self.completed if heal == "peer" else 0)
        self._recovering = (detected, lost_from, restored)
        self.completed = restored
        self.attempt = Attempt(number=self.attempt.number + 1, world=new_world, shares=shares, injections=injections,
                               snapshot=source[1] if source and source[2] == "snapshot" else None,
                               resume_url=source[1] if source and source[2] == "checkpoint" else None,
                               heal=heal != "restart")
        where = {None: "the start (no snapshot or checkpoint yet)", "snapshot": f"the in-memory snapshot of step {restored}",
                 "checkpoint": f"checkpoint {source[1] if source else ''}"}[source[2] if source else None]
        if snapshot_lost:
            self.out.note(f"the in-memory snapshot cannot be fetched; falling back to {where}")
        if heal != "restart":
            self._heal(outcome, heal, where)
            return
        self.log.event("restart", step=restored, detail=f"attempt {self.attempt.number}: {new_world} workers from {where}")
        self.out.note(f"restarting: {new_world} workers from {where}")

    def _heal(self, outcome: Failure, mode: str, where: str) -> None:
        """The group heals in place: the lost rank's worker is replaced (or dropped),
        the others keep their processes and state, and the same group runs the new attempt."""
        a = self.attempt
        source = f"the survivors' state (step >= {self.completed})" if mode == "peer" else where
        self.log.event("heal:detect", rank=outcome.rank, step=outcome.step, seconds=self._recovering[0] - self._last_progress,
                       detail="from the last completed step to the decision")
        self.log.event("heal", rank=outcome.rank, step=self._recovering[2], detail=(
            f"attempt {a.number}: {a.world} workers, rank {outcome.rank} "
            f"{'replaced' if a.world == self._world_before else 'dropped'}, the others keep their processes; from {source}"))
        self.out.note(f"healing in place: rank {outcome.rank} {'replaced' if a.world == self._world_before else 'dropped'}, "
                      f"{a.world} workers from {source}")
        phases = self.group.heal(a, outcome.rank)
        for name, seconds in phases.items():
            self.log.event(f"heal:{name.removesuffix('_s')}", rank=outcome.rank, step=outcome.step, seconds=seconds)
        self._healing = self.clock()
        self._begin_attempt()
        self.state = "running"

    def _rollback_before(self) -> int | None:
        """The first non-finite step while a NaN rollback is pending: restored state must be older."""
        p = self._pending_outcome
        return p.step if isinstance(p, Failure) and p.kind == "nan" else None

    def _restore_source(self) -> tuple[int, object, str] | None:
        """The newest state to restart from: a whole in-memory snapshot, unless a
        committed checkpoint is newer."""
        ckpt = self.newest_checkpoint(before=self._rollback_before())
        snap = self.snapshot
        if snap and (ckpt is None or snap[0] >= ckpt[0]):
            return snap[0], snap[1], "snapshot"
        if ckpt:
            return ckpt[0], ckpt[1], "checkpoint"
        return None

    # -- one attempt ------------------------------------------------------------------------------
    def _begin_attempt(self) -> None:
        a = self.attempt
        self._steps: dict[int, dict[int, dict]] = {}
        self._began = {}
        self._live: dict[int, dict] = {}
        self._nan_run = None
        self._recent = deque(maxlen=20)
        self._pending_outcome: Failure | _Evict | None = None
        self._flush_marks: list[int] = []  # steps whose checkpoint commit waits for their rows to be stored
        replicas = self._replicas(a.world)
        shares = tuple(a.shares) if a.shares else initial_shares(self.spec.global_batch, replicas, 1)
        self._straggle = StragglerState(shares=shares, decided_at=self.completed, ranks_per_replica=a.world // replicas)
        self._last_progress = self.clock()
        self._errors: dict[int, str] = {}
        self._broken: dict[int, str] = {}  # rank -> why: ranks waiting for a re-form (Broken)
        self._first_error: float | None = None

    def _poll(self) -> Failure | _Evict | _HealStalled | _Finished | None:
        """Poll the group once and decide; None: the attempt goes on."""
        group, a = self.group, self.attempt
        status = group.poll()
        before = self.completed
        for msg in status.rows:
            self._absorb(msg, group)
        if self.completed > before:
            self._last_progress = self.clock()
        self._acknowledge(group)
        self.log.maybe_flush()
        self._errors.update(status.errors)
        if self._errors or self._broken:
            self._first_error = self._first_error if self._first_error is not None else self.clock()
            known = any(died(m) for m in self._errors.values())  # the others' errors echo a death Ray reported
            everyone = len(self._errors.keys() | self._broken.keys() | status.finished) >= a.world
            if known or everyone or self.clock() - self._first_error >= self.grace_s:
                return self._failed({**self._broken, **self._errors})
            return None
        if self._pending_outcome is not None:
            return self._pending_outcome
        if self._healing is not None and self.clock() - self._healing > self.heal_timeout_s:
            return _HealStalled(seconds=self.clock() - self._healing)
        if len(status.finished) >= a.world:
            return _Finished()
        deadline = hang_deadline_s(self.spec.failure, list(self._recent),
                                   startup_s=self.spec.cluster.collective_timeout_s,
                                   collective_timeout_s=self.spec.cluster.collective_timeout_s)
        if self.clock() - self._last_progress > deadline:
            return self._hang(deadline)
        return None

    def _replicas(self, world: int) -> int:
        """Data-parallel replicas of ``world`` ranks: batch shares are per replica
        (replica i: ranks i*g .. i*g+g-1, as pipeline and sequence lay them out)."""
        # the strategy's class is imported here, at run time: importing the controller imports no strategy
        return self.spec.strategy_cls().replicas(workers=world, options=self.spec.strategy_options())

    def _failed(self, errors: dict[int, str]) -> Failure:
        """The failure the errors add up to. Errors that are all echoes (every
        peer's collective timed out) blame the rank progress shows they waited
        for, or no rank (-1: restart at the same size) when none is proven."""
        rank, msg = root_cause(errors)
        kind = "died" if "died" in msg else "error"
        if kind == "died":  # one of ours? then say so, not what Ray guesses
            fired = presumed_fired(self.attempt.injections, Failure(kind=kind, rank=rank, step=self.completed,
                                   message=msg), self.completed, max(self._began.values(), default=0)) | self.fired
            kill = next((i for i in self.attempt.injections if i in fired and i.kind == "kill" and i.rank == rank),
                        None)
            if kill:
                msg = f"rank {rank} failed: its worker process died (injected {kill})"
                errors = {**errors, rank: msg}
        common = shared_error(errors, self.attempt.world)
        if common is not None and not is_echo(common):
            rank, msg = -1, f"every rank failed alike: {common}"
        elif is_echo(msg):
            lag = laggard(self._began, self._live, self.attempt.world, self.completed)
            rank, kind = (lag[0], "hang") if lag else (-1, kind)
            msg = f"hang: rank {lag[0]} {lag[1]} (and their collectives failed)" if lag else \
                f"every rank lost a peer, none shown to be the cause: {one_line(-1, msg, -2, {})}"
        for r, m in sorted(errors.items()):
            self.log.event("worker_error", rank=r, step=self.completed,
                           detail=one_line(r, m, rank, self._live.get(r, {})))
        return Failure(kind=kind, rank=rank, step=self.completed, message=msg)

    def _hang(self, deadline: float) -> Failure:
        lag = laggard(self._began, self._live, self.attempt.world, self.completed)
        who = f"rank {lag[0]} {lag[1]}" if lag else f"no rank finished step {self.completed + 1}, none shown to hold up the others"
        return Failure(kind="hang", rank=lag[0] if lag else -1, step=self.completed,
                       message=f"hang: no step completed for {deadline:.1f} s ({who})")

    def _acknowledge(self, group: Group) -> None:
        """Answer a rank waiting to commit the checkpoint of step N (``flush`` with a
        mark): once every rank's rows up to N are here, store them, then say so."""
        due = [m for m in self._flush_marks if m <= self.completed]
        if due:
            self._flush_marks = [m for m in self._flush_marks if m > self.completed]
            self.log.sync()
            group.control(Flushed(mark=max(due)))

    def _absorb(self, msg: Message, group: Group) -> None:
        match msg:
            case Row():
                self._row(msg, group)
            case Begin(rank=rank, step=step):
                self._began[rank] = step
            case Live(rank=rank, progress=progress):  # where the rank is now (RankTrainer.progress)
                self._live[rank] = progress
            case Flush(mark=mark):
                self._flush_marks.append(mark)
            case SnapshotPart():
                self._snapshot_part(msg)
            case Broken(rank=rank, error=error, attempt=number):  # an echo: it lost a peer, waits for a re-form
                if number == self.attempt.number:  # else the echo of the loss this group already heals
                    self._broken[rank] = f"rank {rank} failed: {error}"
            case Injected(rank=rank, step=step, injection=inj):
                self.fired.add(inj)
                self.out.note(f"injected {inj} on rank {rank} at step {step}")
                self.log.event("inject", rank=rank, step=step, detail=str(inj))
            case Committing(rank=rank, step=step, seconds=seconds, url=url):
                self.last_checkpoint = url
                self.log.event("checkpoint", rank=rank, step=step, seconds=seconds, detail=url)
            case Event(kind=kind, rank=rank, step=step, seconds=seconds, detail=detail):
                self.log.event(kind, rank=rank, step=step, seconds=seconds, detail=detail)
            case _:
                raise TypeError(f"a rank sent {type(msg).__name__}, not a message of orchestrator.messages")

    def _row(self, msg: Row, group: Group) -> None:
        a, row = self.attempt, msg.values
        if msg.timeline:
            self.log.add_timeline(msg.step, msg.rank, msg.timeline)
        self.log.add_row({**row, "attempt": float(a.number)})
        got = self._steps.setdefault(msg.step, {})
        got[msg.rank] = row
        if len(got) == a.world:
            self._step_done(msg.step, list(self._steps.pop(msg.step).values()), group)

    def _step_done(self, step: int, rows: list[dict], group: Group) -> None:
        self.completed = max(self.completed, step)
        self._recent.append(max(r["step_time_s"] for r in rows))
        loss = samples_mean([r["loss"] for r in rows], [r["samples"] for r in rows])
        self.final_loss = loss
        if not self._first_done:
            self._first_done = True
            self.first_step_at(step)
        if self._healing is not None:
            self.log.event("heal:first_step", step=step, seconds=self.clock() - self._healing,
                           detail="from the re-form instruction to the first step of the healed group")
            self._healing = None
        if self._recovering is not None:
            detected, lost_from, restored = self._recovering
            self.log.event("recovered", step=step, seconds=self.clock() - detected,
                           detail=f"restored step {restored}; {max(0, lost_from - restored)} completed steps redone")
            self._recovering = None
        self.out.update(step, loss, tokens=sum(r["tokens"] for r in rows), samples=sum(r["samples"] for r in rows),
                        ended=max(r["wall_time"] for r in rows))
        if not math.isfinite(loss) and any(r["samples"] for r in rows):
            self._nan(step, rows)
        else:
            self._nan_run = None
        self._stragglers(step, rows, group)

    def _nan(self, step: int, rows: list[dict]) -> None:
        f = self.spec.failure
        bad = sorted(r["rank"] for r in rows if r["samples"] and not math.isfinite(r["loss"]))
        first = self._nan_run[0] if self._nan_run else step
        self._nan_run = (first, bad[0] if bad else -1)
        self.log.event("nan_loss", rank=self._nan_run[1], step=step, detail=f"non-finite loss; failure.nan={f.nan!r}"
                       + (" (the update was skipped)" if f.nan == "skip" else ""))
        if self._pending_outcome is not None:
            return
        where = f"at step {step} (rank {self._nan_run[1]})"
        if f.nan != "skip":
            self._pending_outcome = Failure(kind="nan", rank=-1, step=step, message=f"non-finite loss {where}")
        elif step - first + 1 >= f.max_nan_steps:  # skipping forever would train nothing and exit 0
            self._pending_outcome = Failure(kind="nan", rank=-1, step=step, message=(
                f"non-finite loss {where}, {step - first + 1} steps in a row since step {first}"))

    def _snapshot_part(self, part: SnapshotPart) -> None:
        step = part.step
        key = (self.attempt.number, step)
        parts = self._partial.setdefault(key, {})
        parts[part.rank] = (part.handle, part.seconds)
        if len(parts) == self.attempt.world:
            del self._partial[key]
            if self._rollback_before() is not None and step >= self._rollback_before():
                self.forget([h for h, _ in parts.values()])  # holds the non-finite step: never restored
                return
            if self.snapshot:
                self.forget(self.snapshot[1])
            self.snapshot = (step, [parts[r][0] for r in range(self.attempt.world)])
            for old in [k for k in self._partial if k[1] < step]:  # one some rank never finished
                self.forget([h for h, _ in self._partial.pop(old).values()])
            self.log.event("snapshot", step=step, seconds=max(s for _, s in parts.values()),
                           detail=f"{self.attempt.world} parts in the object store")

    def _stragglers(self, step: int, rows: list[dict], group: Group) -> None:
        st = self._straggle
        st.history.append({r["rank"]: r["compute_s"] / r["samples"] for r in rows
                           if r["samples"] > 0 and not r.get("dropped")})
        del st.history[: -2 * self.spec.straggler.window]
        found = self.straggler_policy.stragglers(st.history)
        if found and self._announced != tuple(found):
            self._announced = tuple(found)
            self.log.event("straggler", step=step, detail=f"rank(s) {found} slower than "
                           f"{self.spec.straggler.factor:g}x the median for {self.spec.straggler.patience} steps")
            self.out.note(f"straggler: rank(s) {found} at step {step}")
        d = self.straggler_policy.make_decision(st, step)
        if d.action == "none" or d.action == "keep" and st.kept == d.stragglers:
            return
        st.decided_at = step
        self.log.event(f"decision:{d.action}", step=step, detail=d.reason)
        self.out.note(f"{d.action}: {d.reason}")
        if d.action == "keep":  # said once per set of stragglers
            st.kept = d.stragglers
            return
        if d.action == "evict":
            worst = max(d.stragglers, key=lambda r: st.history[-1].get(r, 0.0))
            self._pending_outcome = self._pending_outcome or _Evict(rank=worst, reason=d.reason)
            return
        # every rank must switch at the same step: far enough ahead that the
        # message (an actor call) arrives first, about a second of steps
        median = statistics.median(self._recent) if self._recent else 1.0
        at = step + 2 + math.ceil(1.0 / max(median, 1e-3))
        if d.action == "rebalance":
            st.shares = d.shares
            self.attempt = replace(self.attempt, shares=list(d.shares))
            group.control(Shares(step=at, shares=tuple(d.shares)))
        else:
            st.drop = d.drop
            group.control(Drop(step=at, ranks=tuple(d.drop)))
