"""What a rank's trainer tells the driver, and the driver's plan for one start
of the worker group (``Attempt``): small frozen types that the controller
dispatches on. This module imports nothing heavy (no torch, no strategy), so
the controller that reads these messages does not either.

Every message travels through the worker's report buffer (``ctx.report``) and
reaches the controller in ``GroupStatus.rows``, in the order the rank sent it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from cluster.faults import Injection


@dataclass(kw_only=True)
class Attempt:
    """One start of the worker group: the controller's plan for it."""

    number: int = 0
    world: int
    resume_url: str | None = None  # a checked, committed checkpoint to restore ...
    snapshot: list | None = None  # ... or the per-rank handles of one in-memory snapshot (preferred)
    shares: list[int] | None = None  # samples per data-parallel replica; None: an even split
    injections: list[Injection] = field(default_factory=list)  # those that have not fired yet
    # A heal in place: the surviving ranks keep their actors and state and only the lost
    # ranks' actors are new; under a strategy that heals from a peer, every rank then
    # takes the state of the survivor furthest on (``resume_url``/``snapshot`` unused).
    heal: bool = False


@dataclass(frozen=True, kw_only=True)
class Begin:
    """A rank began ``step``: lets the driver tell a hung rank from its waiting peers."""

    rank: int
    step: int


@dataclass(frozen=True, kw_only=True)
class Live:
    """Where a rank is now (read on its polling thread, so it answers while the
    training thread is stuck): the step it is in and its communication calls in it
    (``step``, ``ops``, ``op``, ...: ``RankTrainer.progress``)."""

    rank: int
    progress: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class Row:
    """One rank's metrics for one step: ``values`` becomes a row of metrics.parquet;
    a pipeline's measured actions (``timeline``) go to timeline.parquet."""

    values: dict[str, Any]
    timeline: list | None = None

    @classmethod
    def of(cls, values: dict[str, Any]) -> "Row":
        """From a trainer's row dict, its ``timeline`` taken out."""
        values = dict(values)
        return cls(values=values, timeline=values.pop("timeline", None))

    @property
    def step(self) -> int:
        return self.values["step"]

    @property
    def rank(self) -> int:
        return self.values["rank"]


@dataclass(frozen=True, kw_only=True)
class Event:
    """Something that happened on a rank, for events.parquet (``phase:worker_setup``, ...)."""

    rank: int
    kind: str
    step: int = -1
    seconds: float = math.nan
    detail: str = ""


@dataclass(frozen=True, kw_only=True)
class Injected:
    """A fault injection fired on this rank: never again in this run."""

    rank: int
    step: int
    injection: Injection


@dataclass(frozen=True, kw_only=True)
class Committing:
    """Rank 0 wrote the checkpoint of ``step`` at ``url`` and is about to commit it."""

    rank: int
    step: int
    seconds: float
    url: str


@dataclass(frozen=True, kw_only=True)
class Flush:
    """Rank 0 waits to commit the checkpoint of step ``mark`` until the driver has
    stored every rank's rows up to it, and answers with the control ``cluster.controls.Flushed``
    (its mark >= this one)."""

    mark: int


@dataclass(frozen=True, kw_only=True)
class SnapshotPart:
    """One rank's share of the in-memory snapshot of ``step``, stashed under ``handle``."""

    rank: int
    step: int
    seconds: float
    handle: Any


@dataclass(frozen=True, kw_only=True)
class Broken:
    """A collective of this rank lost a peer: the rank rolled back to its last whole
    step (``step``), left its process group and waits for the driver's re-form
    instruction (``WorkerGroup.heal``) instead of exiting, so it keeps its state."""

    rank: int
    step: int
    error: str
    attempt: int  # the attempt it broke in: a report read after the driver moved on is stale


Message = Begin | Live | Row | Event | Injected | Committing | Flush | SnapshotPart | Broken


# -- from the driver to every rank's trainer (``Group.control``), applied at ``step`` on each --

@dataclass(frozen=True, kw_only=True)
class Shares:
    """From ``step`` on, each data-parallel replica takes ``shares[r]`` samples of the
    global batch (straggler ``rebalance``)."""

    step: int
    shares: tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class Drop:
    """At ``step``, the gradients of ``ranks`` are left out of the update (straggler ``backup``)."""

    step: int
    ranks: tuple[int, ...]


Control = Shares | Drop
