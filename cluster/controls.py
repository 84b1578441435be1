"""What the driver tells a worker's actor itself, apart from what it passes on to
the rank's function: small frozen types, no heavy imports (the controller's
unit tests and the driver use them without Ray or torch)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Abort:
    """A peer was lost: whatever collective the job's thread waits in fails now
    (the first half of a heal, ``WorkerGroup.abort``)."""


@dataclass(frozen=True, kw_only=True)
class Flushed:
    """The driver stored every rank's rows up to ``mark``: the answer to a rank's
    flush with a mark (``_Worker._flush``), which then commits its checkpoint."""

    mark: int
