"""One step's point-to-point traffic between pipeline ranks.

Messages between two ranks are received in the order the *sender* sends them
(which NCCL requires, and which keeps gloo free of tags): from the schedule
every rank knows each peer's send order, keeps one receive posted per peer,
and parks messages that arrive before they are needed. That cannot deadlock: a
message the receiver waits for was preceded, on the sender, only by messages
the sender had already produced. Sends never block; they are waited for once
the step's actions are done. Every byte goes through ``Comm`` (isend/irecv), so
blocked receives count as waiting, i.e. idle time.
"""
from __future__ import annotations

from typing import Callable

import torch

from cluster import Comm
from strategies.pipeline.actions import Op, Schedule

# ("act", b, j): output of stage b for micro-batch j, going to stage b+1;
# ("grad", b, j): gradient of that output, coming back from stage b+1.
Key = tuple[str, int, int]


def send_order(schedule: Schedule, sender: int, receiver: int) -> list[Key]:
    """The messages ``sender`` sends ``receiver`` in one step, in order."""
    place, last = schedule.placement, schedule.n_stages - 1
    out = []
    for a in schedule.ranks[sender]:
        if a.op is Op.F and a.stage < last and place[a.stage + 1] == receiver:
            out.append(("act", a.stage, a.mb))
        elif a.op in (Op.B, Op.BW) and a.stage > 0 and place[a.stage - 1] == receiver:
            out.append(("grad", a.stage - 1, a.mb))
    return out


class Mailbox:
    """Receives and sends of one rank for one step (``comm`` is the pipeline group)."""

    def __init__(self, comm: Comm, schedule: Schedule, rank: int,
                 buffer: Callable[[Key], torch.Tensor]):
        self.comm, self.rank, self.buffer = comm, rank, buffer
        peers = sorted({r for r in range(schedule.n_ranks) if r != rank})
        self.expected = {q: send_order(schedule, q, rank) for q in peers}
        self.expected = {q: keys for q, keys in self.expected.items() if keys}
        self.source = {k: q for q, keys in self.expected.items() for k in keys}
        self.next = {q: 0 for q in self.expected}
        self.posted: dict[int, tuple[Key, torch.Tensor, object]] = {}
        self.parked: dict[Key, torch.Tensor] = {}
        self.sends: list[tuple[object, torch.Tensor]] = []

    def start(self) -> None:
        """Post the first receive from every peer that sends this rank anything."""
        for q in self.expected:
            self._post(q)

    def _post(self, q: int) -> None:
        i = self.next[q]
        if i < len(self.expected[q]):
            key = self.expected[q][i]
            buf = self.buffer(key)
            self.posted[q] = (key, buf, self.comm.irecv(buf, q))
            self.next[q] = i + 1

    def get(self, key: Key) -> torch.Tensor:
        """The message ``key``, waiting (counted as idle) for it and anything the
        sender sent before it."""
        if key in self.parked:
            return self.parked.pop(key)
        q = self.source.get(key)
        if q is None:
            raise RuntimeError(f"rank {self.rank}: no peer sends {key} in this schedule")
        while True:
            got, buf, work = self.posted.pop(q)
            work.wait()
            self._post(q)
            if got == key:
                return buf
            self.parked[got] = buf

    def send(self, tensor: torch.Tensor, peer: int) -> None:
        tensor = tensor.detach().contiguous()
        self.sends.append((self.comm.isend(tensor, peer), tensor))  # keep the tensor alive until sent

    def finish(self) -> None:
        """Wait for this step's sends; check nothing was left unreceived."""
        for work, _ in self.sends:
            work.wait()
        self.sends.clear()
        if self.posted or self.parked:
            left = [k for k, _, _ in self.posted.values()] + list(self.parked)
            raise RuntimeError(f"rank {self.rank}: step ended with messages not consumed: {left[:4]}")
