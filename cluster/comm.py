"""The one door every collective goes through: bytes counted, calls timed.

Byte counts are what a rank puts on (and takes off) the wire for the ring
algorithms gloo and NCCL use, computed from the tensor size and world size, so
they are exact and free of measurement noise. Times are measured.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from cluster.dist import abortable, raise_if_aborted, stops_on_abort


# torch >= 2.10 names them *_single; older releases *_into_tensor / *_tensor.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def nbytes(t: torch.Tensor) -> int:
    """A tensor's size in bytes: the one definition every byte count starts from."""
    return t.numel() * t.element_size()


def ring_allreduce_bytes(nbytes: int, world: int) -> int:
    """Bytes each rank sends (and receives) in a ring all-reduce:
    reduce-scatter then all-gather, each (world-1) chunks of nbytes/world."""
    return 0 if world <= 1 else 2 * (world - 1) * nbytes // world


def all_gather_bytes(shard_nbytes: int, world: int) -> int:
    """Bytes each rank sends (and receives) in a ring all-gather of one shard per rank."""
    return 0 if world <= 1 else (world - 1) * shard_nbytes


def reduce_scatter_bytes(input_nbytes: int, world: int) -> int:
    """Bytes each rank sends (and receives) in a ring reduce-scatter of a full-size input."""
    return 0 if world <= 1 else (world - 1) * input_nbytes // world


def broadcast_bytes(nbytes: int, world: int, *, is_root: bool) -> tuple[int, int]:
    """(sent, received) of a flat broadcast: the root sends one copy per peer."""
    if world <= 1:
        return 0, 0
    return ((world - 1) * nbytes, 0) if is_root else (0, nbytes)


LINKS = ("intra", "inter")  # a call whose ranks share one node, or one that crosses nodes


@dataclass
class CommStats:
    comm_s: float = 0.0  # time at least one collective was in flight (overlap counted once)
    wait_s: float = 0.0  # time the caller was blocked in a collective
    bytes_sent: int = 0
    bytes_received: int = 0
    calls: int = 0
    # the same, split by link class (a call is inter-node if its ranks span nodes)
    bytes_intra: int = 0
    bytes_inter: int = 0
    comm_intra_s: float = 0.0  # time at least one intra-node call was in flight
    comm_inter_s: float = 0.0


class _Ledger:
    """Counters shared by a Comm and every sub-group Comm split from it: a rank's
    traffic is one account whatever group it went through. Async completions
    arrive on the backend's thread, hence the lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.stats = CommStats()
        self.in_flight = 0
        self.busy_since = 0.0
        self.link_in_flight = dict.fromkeys(LINKS, 0)
        self.link_busy_since = dict.fromkeys(LINKS, 0.0)
        self.nodes: tuple[int, ...] = ()  # node of each global rank; (): one node
        self.last_op = ""  # the latest call entered: what a hung rank (or its waiting peers) is in
        # (op, bytes sent, bytes received, global ranks taking part) -> the least seconds
        # the call may take on the simulated network (cluster.network); None: no simulation
        self.floor: Callable[[str, int, int, tuple[int, ...]], float] | None = None


class Comm:
    """Collectives and point-to-point calls over a torch.distributed process
    group, with accounting.

    ``rank``/``world`` are this rank's place in ``group``; peers are named by
    their rank in the group. Counters accumulate until ``take_stats()``; the
    training loop takes them once a step.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, *, _ledger: _Ledger | None = None):
        self.group = group
        self.world = dist.get_world_size(group) if dist.is_initialized() else 1
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0
        self._ledger = _ledger or _Ledger()
        self.ranks = tuple(self.global_rank(r) for r in range(self.world))  # global ranks of this group
        self._last_launch = 0.0  # perf_counter of the latest async launch not yet closed
        self.backend = dist.get_backend(group) if dist.is_initialized() else ""

    def split(self, groups: list[list[int]]) -> "Comm":
        """Sub-groups (lists of ranks of this group, disjoint, covering it); every
        rank calls this with the same list and gets the Comm of its own group,
        charged to the same counters."""
        flat = sorted(r for g in groups for r in g)
        if flat != list(range(self.world)):
            raise ValueError(f"groups={groups}: must partition ranks 0..{self.world - 1}")
        mine = None
        for g in groups:  # new_group is collective over the parent: create every group everywhere
            to_global = [self.global_rank(r) for r in g]
            pg = dist.new_group(to_global) if self.world > 1 else None
            if self.rank in g:
                mine = pg
        return Comm(mine, _ledger=self._ledger)

    def global_rank(self, rank: int) -> int:
        """The default group's rank of this group's ``rank``."""
        if self.group is None or not dist.is_initialized():
            return rank
        return dist.get_global_rank(self.group, rank)

    # -- accounting ------------------------------------------------------------------------
    def _ranks(self, peers: tuple[int, ...] | None = None, ranks: tuple[int, ...] | None = None) -> tuple[int, ...]:
        """Global ranks taking part in a call: given, this rank and ``peers``, or the group."""
        if ranks is not None:
            return ranks
        return self.ranks if peers is None else (self.global_rank(self.rank), *map(self.global_rank, peers))

    def _link(self, ranks: tuple[int, ...]) -> str:
        nodes = self._ledger.nodes
        return "inter" if nodes and len({nodes[r] for r in ranks}) > 1 else "intra"

    @property
    def nodes(self) -> tuple[int, ...]:
        return self._ledger.nodes

    def set_nodes(self, nodes: tuple[int, ...]) -> None:
        """The node of each global rank (from the cluster or a scenario's ``per_node``),
        so each call's bytes and time are charged to its link class. Shared by sub-groups."""
        self._ledger.nodes = tuple(nodes)

    def _begin(self, sent: int, received: int, link: str, op: str = "call") -> float:
        now = time.perf_counter()
        led = self._ledger
        with led.lock:
            led.last_op = op
            s = led.stats
            s.bytes_sent += sent
            s.bytes_received += received
            s.calls += 1
            setattr(s, f"bytes_{link}", getattr(s, f"bytes_{link}") + sent)
            if led.in_flight == 0:
                led.busy_since = now
            led.in_flight += 1
            if led.link_in_flight[link] == 0:
                led.link_busy_since[link] = now
            led.link_in_flight[link] += 1
        return now

    def _end(self, link: str, at: float = 0.0) -> float:
        """The call is over (at ``at``, if the simulated network says later than now)."""
        now = max(time.perf_counter(), at)
        led = self._ledger
        with led.lock:
            led.in_flight -= 1
            if led.in_flight == 0:
                led.stats.comm_s += now - led.busy_since
            led.link_in_flight[link] -= 1
            if led.link_in_flight[link] == 0:
                _add(led.stats, f"comm_{link}_s", now - led.link_busy_since[link])
        return now

    def take_stats(self) -> CommStats:
        led = self._ledger
        with led.lock:
            stats, led.stats = led.stats, CommStats()
            now = time.perf_counter()
            if led.in_flight:  # a call spans the boundary: split its time
                stats.comm_s += now - led.busy_since
                led.busy_since = now
            for link in LINKS:
                if led.link_in_flight[link]:
                    _add(stats, f"comm_{link}_s", now - led.link_busy_since[link])
                    led.link_busy_since[link] = now
        return stats

    def progress(self) -> dict:
        """Calls entered since the last ``take_stats`` (the step's, in the training
        loop), the latest one's name and how many are unfinished: read from another
        thread while this rank may be stuck in one."""
        led = self._ledger
        with led.lock:
            return {"ops": led.stats.calls, "op": led.last_op, "in_flight": led.in_flight}

    def add_wait(self, seconds: float) -> None:
        with self._ledger.lock:
            self._ledger.stats.wait_s += seconds

    def close_launched(self, t_end: float) -> None:
        """A caller that returns only once every async call it launched is done (DDP's
        backward, whatever hook it runs) ended at ``t_end``: the time since the last
        launch is communication no compute hid. Launches before this are closed."""
        if self._last_launch:
            self.add_wait(max(0.0, t_end - self._last_launch))
        self._last_launch = 0.0

    def set_floor(self, floor: Callable[[str, int, int, tuple[int, ...]], float] | None) -> None:
        """Simulate a network: every call takes at least ``floor(op, sent, received,
        ranks)`` seconds (it is delayed by the difference); ``ranks`` are the global
        ranks taking part. Shared by sub-groups."""
        self._ledger.floor = floor

    def _floor(self, op: str, sent: int, received: int, ranks: tuple[int, ...]) -> float:
        f = self._ledger.floor
        return 0.0 if f is None else f(op, sent, received, ranks)

    def _hold(self, until: float) -> None:
        """Sleep until ``until`` (perf_counter): the simulated network's extra time."""
        left = until - time.perf_counter()
        if left > 0:
            time.sleep(left)

    def charge(self, call, sent: int, received: int, *, async_op: bool = False, op: str = "call",
               peers: tuple[int, ...] | None = None, ranks: tuple[int, ...] | None = None):
        """Run ``call(async_op)`` accounted: the one path every call takes. Blocking:
        the time counts as waiting and the call's result is returned. Async: returns a
        Work whose wait() is timed and whose completion ends the in-flight interval (a
        handle without a completion future is waited at once, as a blocking call). Under
        a simulated network the call lasts at least the modelled time. Strategies that
        call a library's own collectives (DeepSpeed) charge them through this, naming the
        call's global ``ranks`` where its group is not this Comm's."""
        raise_if_aborted()  # a heal's abort came first: this call would never run
        ranks = self._ranks(peers, ranks)
        link = self._link(ranks)
        start = self._begin(sent, received, link, op)
        done_by = start + self._floor(op, sent, received, ranks)
        if not async_op:
            try:
                if not (stops_on_abort() and self.backend == "gloo"):
                    return call(False)
                # launched async and waited through an abortable future: a blocking gloo call
                # in progress when a heal's abort comes would wait for its peers until the
                # collective timeout (FSDP's all-gather in a survivor's forward); it fails now.
                # A call that ignores the flag (point to point, DeepSpeed's) ran blocking.
                result = call(True)
                if not hasattr(result, "get_future"):
                    return result
                try:
                    future = result.get_future()
                except RuntimeError:  # a gloo Work without one ("Work::getFuture not implemented")
                    result.wait()
                    return None
                abortable(future).wait()
                return None
            finally:
                self._hold(done_by)
                self.add_wait(self._end(link) - start)
        work = call(True)
        if work is None or not hasattr(work, "get_future"):
            try:
                if work is not None:
                    work.wait()
                return work
            finally:
                self._hold(done_by)
                self.add_wait(self._end(link) - start)
        self._last_launch = start
        work.get_future().then(lambda _: self._end(link, at=done_by))
        return _TimedWork(work, self, done_by)

    # -- collectives -----------------------------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM, *, async_op: bool = False):
        """In place; blocking returns ``tensor``, async a Work."""
        if self.world == 1:
            return _Done(tensor) if async_op else tensor
        n = ring_allreduce_bytes(nbytes(tensor), self.world)
        work = self.charge(lambda a: dist.all_reduce(tensor, op=op, group=self.group, async_op=a),
                           n, n, async_op=async_op, op="all_reduce")
        return work if async_op else tensor

    def all_reduce_async(self, tensor: torch.Tensor) -> torch.futures.Future:
        """Sum-all-reduce without blocking; the future yields the reduced tensor (the
        shape a DDP comm hook returns) once the simulated network's time has passed,
        on the backend's thread, so DDP waits for it."""
        work = self.all_reduce(tensor, async_op=True)

        def done(fut: torch.futures.Future) -> torch.Tensor:
            fut.value()  # raises if the all-reduce failed (a peer lost): DDP must not step on an unreduced gradient
            if isinstance(work, _TimedWork):
                self._hold(work._done_by)
            return tensor

        return abortable(work.get_future().then(done))  # an aborted group fails it: DDP's backward waits on it

    def all_gather_single(self, output: torch.Tensor, input: torch.Tensor, *, async_op: bool = False):
        """Every rank's ``input`` concatenated into ``output`` (FSDP's parameter all-gather)."""
        n = all_gather_bytes(nbytes(input), self.world)
        call = lambda a: _all_gather_single(output, input, group=self.group, async_op=a)  # noqa: E731
        return self.charge(call, n, n, async_op=async_op, op="all_gather")

    def all_gather(self, input: torch.Tensor) -> torch.Tensor:
        """Every rank's ``input`` (same shape everywhere) stacked on a new first dim."""
        out = input.new_empty((self.world, *input.shape))
        if self.world == 1:
            out[0] = input
            return out
        self.all_gather_single(out.view(-1), input.contiguous().view(-1))
        return out

    def reduce_scatter_single(self, output: torch.Tensor, input: torch.Tensor, *, op=dist.ReduceOp.SUM,
                              async_op: bool = False):
        """``input`` reduced over ranks; this rank keeps its slice in ``output`` (FSDP's gradients)."""
        n = reduce_scatter_bytes(nbytes(input), self.world)
        call = lambda a: _reduce_scatter_single(output, input, op=op, group=self.group, async_op=a)  # noqa: E731
        return self.charge(call, n, n, async_op=async_op, op="reduce_scatter")

    def all_to_all_single(self, output: torch.Tensor, input: torch.Tensor, *, async_op: bool = False):
        """Equal splits along dim 0: chunk j of ``input`` goes to rank j; chunk j
        of ``output`` comes from rank j (Ulysses' head/sequence exchange)."""
        if self.world == 1:
            output.copy_(input)
            return _Done(output) if async_op else None
        n = all_to_all_bytes(nbytes(input), self.world)
        call = lambda a: dist.all_to_all_single(output, input, group=self.group, async_op=a)  # noqa: E731
        return self.charge(call, n, n, async_op=async_op, op="all_to_all")

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.world == 1:
            return tensor
        sent, received = broadcast_bytes(nbytes(tensor), self.world, is_root=self.rank == src)
        self.charge(lambda a: dist.broadcast(tensor, src=self.global_rank(src), group=self.group, async_op=a),
                    sent, received, op="broadcast")
        return tensor

    # -- point to point --------------------------------------------------------------------
    def send(self, tensor: torch.Tensor, peer: int) -> None:
        self.charge(lambda a: dist.send(tensor, self.global_rank(peer), group=self.group), nbytes(tensor), 0,
                    op="send", peers=(peer,))

    def recv(self, tensor: torch.Tensor, peer: int) -> torch.Tensor:
        self.charge(lambda a: dist.recv(tensor, self.global_rank(peer), group=self.group), 0, nbytes(tensor),
                    op="recv", peers=(peer,))
        return tensor

    def isend(self, tensor: torch.Tensor, peer: int) -> dist.Work:
        """Post a send and return at once; ``wait()`` on the returned Work (timed)
        before reusing ``tensor``. In flight from posting until that wait returns:
        gloo's point-to-point Works have no completion future to end it sooner.
        Under a simulated network the send's time travels with it (``irecv``)."""
        return self._p2p(tensor, peer, send=True)

    def irecv(self, tensor: torch.Tensor, peer: int) -> dist.Work:
        """Post a receive into ``tensor`` and return at once; its ``wait()`` is
        counted as time blocked (a pipeline's idle time waiting for its input).
        Under a simulated network it lasts until the network's time has passed
        since the message was *sent*: a receive posted ahead of the send (a
        pipeline's next input) does not absorb the delay while the sender computes."""
        return self._p2p(tensor, peer, send=False)

    def _p2p(self, tensor: torch.Tensor, peer: int, *, send: bool) -> dist.Work:
        """``isend``/``irecv``. With a floor, a one-number message follows each one: the
        sender's clock (``time.time()``; a simulated cluster's ranks share one
        machine's) when it posted, which the receiver's floor counts from. isend
        pairs with irecv."""
        n, to = nbytes(tensor), self.global_rank(peer)
        sent, received, op = (n, 0, "send") if send else (0, n, "recv")
        post = dist.isend if send else dist.irecv
        if self._ledger.floor is None:
            return self._posted(lambda: post(tensor, to, group=self.group), sent, received, op, (peer,))
        stamp = (torch.tensor([time.time()], dtype=torch.float64, device=tensor.device) if send
                 else torch.empty(1, dtype=torch.float64, device=tensor.device))
        both = lambda: _AllWork([post(tensor, to, group=self.group), post(stamp, to, group=self.group)],  # noqa: E731
                                keep=stamp)
        return self._posted(both, sent, received, op, (peer,), sent_at=None if send else stamp.item)

    def _posted(self, post, sent: int, received: int, op: str, peers: tuple[int, ...], *,
                sent_at: Callable[[], float] | None = None) -> dist.Work:
        """Post point-to-point work; in flight until its wait (gloo's p2p Works have no
        future). The floor counts from the posting, or from ``sent_at()`` (the sender's
        clock, known once the work is done)."""
        ranks = self._ranks(peers)
        link = self._link(ranks)
        self._last_launch = start = self._begin(sent, received, link, op)
        floor = self._floor(op, sent, received, ranks)
        if sent_at is None:
            return _EndsOnWait(post(), self, start + floor, link)
        return _EndsOnWait(post(), self, link=link, arrives=lambda: sent_at() + floor)

    def exchange(self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]],
                 *, async_op: bool = False):
        """Post every send and receive of ``(tensor, peer)`` at once (no ordering
        deadlock between neighbours); blocking unless ``async_op``, which returns
        one Work that completes when all of them have."""
        ops = [dist.P2POp(dist.isend, t, self.global_rank(p), self.group) for t, p in sends]
        ops += [dist.P2POp(dist.irecv, t, self.global_rank(p), self.group) for t, p in recvs]
        if not ops:
            return _Done(None) if async_op else None
        sent = sum(nbytes(t) for t, _ in sends)
        received = sum(nbytes(t) for t, _ in recvs)

        peers = tuple(sorted({p for _, p in sends} | {p for _, p in recvs}))
        if async_op:  # both sides post at once: the floor counts from the posting
            return self._posted(lambda: _AllWork(dist.batch_isend_irecv(ops)), sent, received, "exchange", peers)

        def call(_async: bool):
            for w in dist.batch_isend_irecv(ops):
                w.wait()

        return self.charge(call, sent, received, op="exchange", peers=peers)


def _add(stats: CommStats, name: str, value: float) -> None:
    setattr(stats, name, getattr(stats, name) + value)


def all_to_all_bytes(input_nbytes: int, world: int) -> int:
    """Bytes each rank sends (and receives) in an all-to-all with equal splits:
    every chunk but its own."""
    return 0 if world <= 1 else (world - 1) * input_nbytes // world


class _TimedWork(dist.Work):
    """A backend Work whose wait() is counted as time blocked on communication
    and lasts until the simulated network's ``done_by`` (perf_counter)."""

    def __init__(self, work: dist.Work, comm: Comm, done_by: float = 0.0):
        super().__init__()
        self._work, self._comm, self._done_by = work, comm, done_by

    def wait(self, timeout=None) -> bool:
        t0 = time.perf_counter()
        if timeout is None:  # through an abortable future: an aborted group fails it (FSDP's waits), not hangs
            abortable(self._work.get_future()).wait()
            done = True
        else:
            done = self._work.wait(timeout)
        self._comm._hold(self._done_by)
        self._comm.add_wait(time.perf_counter() - t0)
        return done

    def is_completed(self) -> bool:
        return self._work.is_completed()

    def get_future(self) -> torch.futures.Future:
        return self._work.get_future()


class _EndsOnWait(dist.Work):
    """A point-to-point Work whose wait() is timed as blocked, lasts until the
    simulated network's ``done_by``, and ends the call's in-flight interval. Only
    the first wait() reaches gloo, whose point-to-point Works must be waited once."""

    def __init__(self, work: dist.Work, comm: Comm, done_by: float = 0.0, link: str = "intra",
                 arrives: Callable[[], float] | None = None):
        super().__init__()
        self._work, self._comm, self._done_by, self._open, self._link = work, comm, done_by, True, link
        self._arrives = arrives  # a receive under a floor: when the message may arrive (time.time())

    def wait(self, timeout=None) -> bool:
        if not self._open:
            return True
        t0 = time.perf_counter()
        done = self._work.wait() if timeout is None else self._work.wait(timeout)
        if self._arrives is not None:
            self._done_by = time.perf_counter() + self._arrives() - time.time()
        self._comm._hold(self._done_by)
        self._comm.add_wait(time.perf_counter() - t0)
        self._open = False
        self._comm._end(self._link)
        return done

    def is_completed(self) -> bool:
        return not self._open or self._work.is_completed()


class _AllWork(dist.Work):
    """Several Works as one: done when all are (``keep``: a tensor they send or fill)."""

    def __init__(self, works: list, keep: torch.Tensor | None = None):
        super().__init__()
        self._works, self._keep = works, keep

    def wait(self, timeout=None) -> bool:
        for w in self._works:
            w.wait()
        return True

    def is_completed(self) -> bool:
        return all(w.is_completed() for w in self._works)


class _Done(dist.Work):
    """An already finished Work (world size 1)."""

    def __init__(self, value):
        super().__init__()
        self._future = torch.futures.Future()
        self._future.set_result(value)

    def wait(self, timeout=None) -> bool:
        return True

    def is_completed(self) -> bool:
        return True

    def get_future(self) -> torch.futures.Future:
        return self._future
