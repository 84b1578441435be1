"""The one door every collective goes through: bytes counted, calls timed.

Byte counts are what a rank puts on (and takes off) the wire for the ring
algorithms gloo and NCCL use, computed from the tensor size and world size, so
they are exact and free of measurement noise. Times are measured.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


# torch >= 2.10 names them *_single; older releases *_into_tensor / *_tensor.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


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


@dataclass
class CommStats:
    comm_s: float = 0.0  # time at least one collective was in flight (overlap counted once)
    wait_s: float = 0.0  # time the caller was blocked in a collective
    bytes_sent: int = 0
    bytes_received: int = 0
    calls: int = 0


class Comm:
    """Collectives over a torch.distributed process group, with accounting.

    Counters accumulate until ``take_stats()``; the training loop takes them
    once a step. Async completions arrive on the backend's thread, hence the lock.
    """

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.world = dist.get_world_size(group) if dist.is_initialized() else 1
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0
        self._lock = threading.Lock()
        self._stats = CommStats()
        self._in_flight = 0
        self._busy_since = 0.0
        self.last_launch = 0.0  # perf_counter of the latest async launch

    # -- accounting ------------------------------------------------------------------------
    def _begin(self, sent: int, received: int) -> float:
        now = time.perf_counter()
        with self._lock:
            s = self._stats
            s.bytes_sent += sent
            s.bytes_received += received
            s.calls += 1
            if self._in_flight == 0:
                self._busy_since = now
            self._in_flight += 1
        return now

    def _end(self) -> float:
        now = time.perf_counter()
        with self._lock:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._stats.comm_s += now - self._busy_since
        return now

    def take_stats(self) -> CommStats:
        with self._lock:
            stats, self._stats = self._stats, CommStats()
            if self._in_flight:  # a call spans the boundary: split its time
                now = time.perf_counter()
                stats.comm_s += now - self._busy_since
                self._busy_since = now
        return stats

    def add_wait(self, seconds: float) -> None:
        with self._lock:
            self._stats.wait_s += seconds

    # -- collectives -----------------------------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.world == 1:
            return tensor
        nbytes = ring_allreduce_bytes(tensor.numel() * tensor.element_size(), self.world)
        start = self._begin(nbytes, nbytes)
        dist.all_reduce(tensor, op=op, group=self.group)
        self.add_wait(self._end() - start)
        return tensor

    def all_reduce_async(self, tensor: torch.Tensor) -> torch.futures.Future:
        """Sum-all-reduce without blocking; the future yields the reduced tensor."""
        nbytes = ring_allreduce_bytes(tensor.numel() * tensor.element_size(), self.world)
        self.last_launch = self._begin(nbytes, nbytes)
        work = dist.all_reduce(tensor, group=self.group, async_op=True)

        def done(fut: torch.futures.Future) -> torch.Tensor:
            self._end()
            return fut.value()[0]

        return work.get_future().then(done)

    def _run(self, call, sent: int, received: int, async_op: bool):
        """Run ``call(async_op)`` accounted: a blocking call counts as waiting; an
        async one returns a Work whose wait() is timed and whose completion ends
        the in-flight interval."""
        start = self._begin(sent, received)
        if not async_op:
            call(False)
            self.add_wait(self._end() - start)
            return None
        work = call(True)
        work.get_future().then(lambda _: self._end())
        return _TimedWork(work, self)

    def all_gather_single(self, output: torch.Tensor, input: torch.Tensor, *, async_op: bool = False):
        """Every rank's ``input`` concatenated into ``output`` (FSDP's parameter all-gather)."""
        nbytes = all_gather_bytes(input.numel() * input.element_size(), self.world)
        call = lambda a: _all_gather_single(output, input, group=self.group, async_op=a)  # noqa: E731
        return self._run(call, nbytes, nbytes, async_op)

    def reduce_scatter_single(self, output: torch.Tensor, input: torch.Tensor, *, op=dist.ReduceOp.SUM,
                              async_op: bool = False):
        """``input`` reduced over ranks; this rank keeps its slice in ``output`` (FSDP's gradients)."""
        nbytes = reduce_scatter_bytes(input.numel() * input.element_size(), self.world)
        call = lambda a: _reduce_scatter_single(output, input, op=op, group=self.group, async_op=a)  # noqa: E731
        return self._run(call, nbytes, nbytes, async_op)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.world == 1:
            return tensor
        sent, received = broadcast_bytes(tensor.numel() * tensor.element_size(), self.world, is_root=self.rank == src)
        start = self._begin(sent, received)
        dist.broadcast(tensor, src=src, group=self.group)
        self.add_wait(self._end() - start)
        return tensor


class _TimedWork(dist.Work):
    """A backend Work whose wait() is counted as time blocked on communication."""

    def __init__(self, work: dist.Work, comm: Comm):
        super().__init__()
        self._work, self._comm = work, comm

    def wait(self, timeout=None) -> bool:
        t0 = time.perf_counter()
        done = self._work.wait() if timeout is None else self._work.wait(timeout)
        self._comm.add_wait(time.perf_counter() - t0)
        return done

    def is_completed(self) -> bool:
        return self._work.is_completed()

    def get_future(self) -> torch.futures.Future:
        return self._work.get_future()
