"""Faults injected on purpose: a worker killed, hung or slowed, a NaN loss, a slow link.

An injection is written ``KIND:key=value,...`` (``kill:rank=1,step=30``,
``hang:rank=0,step=20``, ``slow:rank=2,factor=3,from=10,to=50``,
``nan:step=40``, ``netdelay:rank=1,ms=500``). It is part of the job spec, fires
on the worker, reports itself as an event, and fires once per run: a fault at
step 30 does not fire again when the run is restored to step 25.
"""
from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass

KINDS: dict[str, tuple[set[str], set[str]]] = {  # kind -> (required keys, optional keys)
    "kill": ({"rank", "step"}, {"at"}),
    "hang": ({"rank", "step"}, set()),
    "slow": ({"rank", "factor"}, {"from", "to"}),
    "nan": ({"step"}, {"rank"}),
    "netdelay": ({"rank", "ms"}, {"from", "to"}),
}
_FLOATS = {"factor", "ms"}
_WORDS = {"at": ("start", "checkpoint")}  # kill at the step's start, or half-way through its checkpoint write


@dataclass(frozen=True, kw_only=True)
class Injection:
    kind: str
    rank: int | None = None  # None: every rank (nan only)
    step: int | None = None  # the step it fires at (kill, hang, nan)
    factor: float = 1.0  # slow: compute takes factor x as long
    ms: float = 0.0  # netdelay: added to every communication call
    start: int = 1  # slow/netdelay: first step affected
    end: int | None = None  # slow/netdelay: last step affected (None: to the end)
    at: str = "start"  # kill: as the step starts, or during the step's checkpoint write

    def __str__(self) -> str:
        keys = {"rank": self.rank, "step": self.step, "factor": self.factor if self.kind == "slow" else None,
                "ms": self.ms if self.kind == "netdelay" else None,
                "from": self.start if self.kind in ("slow", "netdelay") and self.start != 1 else None,
                "to": self.end, "at": self.at if self.at != "start" else None}
        return f"{self.kind}:" + ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in keys.items() if v is not None)

    @property
    def once(self) -> bool:
        """Fires at one step (and then never again in this run)."""
        return self.kind in ("kill", "hang", "nan")

    def active(self, step: int) -> bool:
        if self.once:
            return step == self.step
        return step >= self.start and (self.end is None or step <= self.end)

    def hits(self, rank: int) -> bool:
        return self.rank is None or self.rank == rank


def parse_injection(text: str) -> Injection:
    """``kill:rank=1,step=30`` -> Injection; ValueError naming what is wrong."""
    kind, sep, rest = text.strip().partition(":")
    if kind not in KINDS:
        raise ValueError(f"{text!r}: unknown kind {kind!r} (allowed: {', '.join(KINDS)})")
    required, optional = KINDS[kind]
    values: dict[str, float] = {}
    for item in filter(None, rest.split(",")) if sep else ():
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or key not in required | optional:
            raise ValueError(f"{text!r}: {item!r} is not KEY=VALUE with KEY in "
                             f"{', '.join(sorted(required | optional))}")
        if key in values:  # the last would win silently
            raise ValueError(f"{text!r}: {key} given twice")
        if key in _WORDS:
            if raw not in _WORDS[key]:
                raise ValueError(f"{text!r}: {key}={raw!r} (allowed: {', '.join(_WORDS[key])})")
            values[key] = raw
            continue
        try:
            values[key] = float(raw) if key in _FLOATS else int(raw)
        except ValueError:
            raise ValueError(f"{text!r}: {key}={raw!r} is not a{' number' if key in _FLOATS else 'n integer'}") from None
        if not math.isfinite(values[key]):  # ms=inf would sleep forever, factor=nan never compares
            raise ValueError(f"{text!r}: {key}={raw!r} must be a finite number")
    missing = sorted(required - set(values))
    if missing:
        raise ValueError(f"{text!r}: {kind} needs {', '.join(missing)} (e.g. {_EXAMPLES[kind]})")
    inj = Injection(kind=kind, rank=values.get("rank"), step=values.get("step"),
                    factor=values.get("factor", 1.0), ms=values.get("ms", 0.0),
                    start=int(values.get("from", 1)), end=values.get("to"), at=values.get("at", "start"))
    if inj.step is not None and inj.step < 1:
        raise ValueError(f"{text!r}: step={inj.step} must be >= 1")
    if inj.rank is not None and inj.rank < 0:
        raise ValueError(f"{text!r}: rank={inj.rank} must be >= 0")
    if kind == "slow" and inj.factor < 1:
        raise ValueError(f"{text!r}: factor={inj.factor:g} must be >= 1 (a slowdown)")
    if kind == "netdelay" and inj.ms < 0:
        raise ValueError(f"{text!r}: ms={inj.ms:g} must be >= 0")
    if inj.end is not None and inj.end < inj.start:
        raise ValueError(f"{text!r}: to={inj.end} is before from={inj.start}")
    return inj


_EXAMPLES = {"kill": "kill:rank=1,step=30", "hang": "hang:rank=0,step=20", "slow": "slow:rank=2,factor=3",
             "nan": "nan:step=40", "netdelay": "netdelay:rank=1,ms=500"}


class FaultInjector:
    """The injections that concern one rank, fired from its training loop.
    ``report(kind, step, detail)`` records that one fired."""

    def __init__(self, injections: list[Injection], rank: int, report=lambda *a: None, flush=None):
        self.mine = [i for i in injections if i.hits(rank)]
        self.rank, self.report, self.flush = rank, report, flush
        self._announced: set[Injection] = set()

    def _fire(self, inj: Injection, step: int) -> None:
        if inj not in self._announced:
            self._announced.add(inj)
            self.report(inj, step)

    def before_step(self, step: int) -> None:
        """kill and hang fire as the step starts."""
        for inj in self.mine:
            if inj.kind in ("kill", "hang") and inj.at == "start" and inj.active(step):
                self._fire(inj, step)
                if inj.kind == "kill":
                    self._die()
                while True:  # hang: alive, silent, holding up every collective
                    time.sleep(3600)

    def during_checkpoint(self, step: int) -> None:
        """Called once this rank's shards of step's checkpoint are written, before
        the commit marker: ``kill:...,at=checkpoint`` dies here."""
        for inj in self.mine:
            if inj.kind == "kill" and inj.at == "checkpoint" and inj.active(step):
                self._fire(inj, step)
                self._die()

    def _die(self) -> None:
        if self.flush:  # let the report (and the steps before it) reach the driver first
            self.flush()
        else:
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGKILL)

    def poisons(self, step: int) -> bool:
        """Should this step's loss be made NaN?"""
        hit = [i for i in self.mine if i.kind == "nan" and i.active(step)]
        for inj in hit:
            self._fire(inj, step)
        return bool(hit)

    def slowdown(self, step: int, compute_s: float) -> float:
        """Seconds to sleep after computing so the step's compute took factor x."""
        extra = 0.0
        for inj in self.mine:
            if inj.kind == "slow" and inj.active(step):
                self._fire(inj, step)
                extra += (inj.factor - 1.0) * compute_s
        return extra

    def comm_delay_s(self, step: int) -> float:
        """Seconds added to each communication call of this step (netdelay)."""
        delay = 0.0
        for inj in self.mine:
            if inj.kind == "netdelay" and inj.active(step):
                self._fire(inj, step)
                delay += inj.ms / 1000
        return delay
