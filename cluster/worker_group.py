"""One Ray actor per rank, in a placement group, running a function we ship.

The group knows nothing of training: it starts actors, gives each its rank,
a rendezvous address and a way to report, runs a function on all of them and
hands the reports back when polled. The driver's loop is in orchestrator/.
"""
from __future__ import annotations

import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.controls import Abort, Flushed
from cluster.dist import free_port, node_ip
from cluster.runtime import ClusterError


@dataclass(kw_only=True)
class WorkerContext:
    """What a rank's function gets: who it is, where to meet, how to report."""

    rank: int
    world: int
    local_rank: int
    node_ip: str
    master_addr: str
    master_port: int
    threads: int
    nodes: tuple[int, ...] = ()  # node index of every rank (ranks on one Ray node share one)
    # set on the worker:
    report: Callable[[Any], None] = field(default=lambda msg: None, repr=False)  # any picklable message
    controls: Callable[[], list[dict]] = field(default=lambda: [], repr=False)  # messages from the driver
    stash: Callable[[Any], Any] = field(default=lambda value: value, repr=False)  # value -> handle
    fetch: Callable[[list], list] = field(default=lambda handles: handles, repr=False)  # handles -> values
    # wait until reports are taken; with a mark, until the driver says it stored everything up to it
    flush: Callable[..., bool] = field(default=lambda timeout_s, mark=None: True, repr=False)
    # registers a function whose value every poll carries as one more report: read on the
    # polling thread, so it answers while the job's thread is stuck (in a collective, say)
    live: Callable[[Callable[[], Any]], None] = field(default=lambda fn: None, repr=False)

    @property
    def init_method(self) -> str:
        return f"tcp://{self.master_addr}:{self.master_port}"


def prepare(imports: tuple[str, ...]) -> None:
    """Import each module of ``imports``; for an entry "pkg.mod:fn", call fn() too (a
    warm-up of what the module's users would otherwise do lazily, on their clock)."""
    import importlib

    for entry in imports:
        module, _, fn = entry.partition(":")
        loaded = importlib.import_module(module)
        if fn:
            getattr(loaded, fn)()


class _Worker:
    def __init__(self, threads: int, env: dict[str, str], keeper=None, imports: tuple[str, ...] = ()):
        os.environ.update(env)
        import torch

        torch.set_num_threads(threads)
        prepare(imports)  # what every rank's function needs, imported while the actor starts
        self.threads = threads
        self.keeper = keeper
        self._lock = threading.Lock()
        self._reports: list = []
        self._controls: list = []
        self._stored = threading.Condition(self._lock)  # notified when the driver answers a flush mark
        self._stored_mark = float("-inf")  # the highest mark the driver has answered
        self._live: Callable[[], Any] | None = None  # what poll() reports of the rank now

    def where(self) -> tuple[str, str, int]:
        """(node id, node ip, pid) for placement and diagnostics."""
        return ray.get_runtime_context().get_node_id(), node_ip(), os.getpid()

    def rendezvous_port(self) -> int:
        return free_port()

    def _report(self, msg: Any) -> None:
        with self._lock:
            self._reports.append(msg)

    def _flush(self, timeout_s: float, mark: Any = None) -> bool:
        """Wait until the driver's poll has taken every report (or ``timeout_s``),
        then a moment more for that poll's reply to leave this process: a rank
        about to die makes sure its last words arrive.

        With a ``mark`` (which the job has reported, in its own message type): wait
        until the driver answers with the control ``Flushed(mark=m)``, ``m >= mark``
        (it has stored what the mark stands for); False when ``timeout_s`` passed first."""
        if mark is not None:
            with self._lock:
                return self._stored.wait_for(lambda: self._stored_mark >= mark, timeout=timeout_s)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._reports:
                    break
            time.sleep(0.02)
        time.sleep(0.3)
        return True

    def _take_controls(self) -> list:
        with self._lock:
            msgs, self._controls = self._controls, []
        return msgs

    def _stash(self, value: Any) -> str:
        key = uuid.uuid4().hex
        if self.keeper is None:
            raise RuntimeError("no Keeper: this worker group was started without one")
        return ray.get(self.keeper.stash.remote(key, value))

    def _fetch(self, keys: list[str]) -> list:
        refs = ray.get(self.keeper.fetch.remote(keys))
        return ray.get([r[0] for r in refs])

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        """``fn(*args)`` in this actor, for its effect (a spare readies the job it may join).
        What it raises is dropped: the rank's own run meets it again, and reports it."""
        try:
            fn(*args)
        except Exception:  # noqa: BLE001
            pass

    def run(self, ctx: WorkerContext, fn: Callable[..., Any], *args: Any) -> Any:
        ctx.report, ctx.controls, ctx.flush = self._report, self._take_controls, self._flush
        ctx.stash = self._stash
        ctx.fetch = self._fetch
        ctx.live = lambda live: setattr(self, "_live", live)
        return fn(ctx, *args)

    def poll(self) -> list:
        with self._lock:
            rows, self._reports = self._reports, []
        if self._live is not None:
            rows.append(self._live())
        return rows

    def control(self, msg: object) -> None:
        """``Abort`` and ``Flushed`` are for this actor; any other message is queued for
        the rank's function (``ctx.controls``)."""
        if isinstance(msg, Abort):
            from cluster.dist import abort_process_group

            abort_process_group(destroy=False)  # the job's thread leaves the group itself, once out of it
            return
        with self._lock:
            if isinstance(msg, Flushed):
                self._stored_mark = max(self._stored_mark, msg.mark)
                self._stored.notify_all()
            else:
                self._controls.append(msg)


# one thread runs the job, one answers poll() and control()
RankWorker = ray.remote(max_concurrency=2)(type("RankWorker", (_Worker,), {}))
# A started, idle worker that takes a lost rank's place in a heal without a process
# start and torch's import while the survivors wait. Its own class name, so it is
# told apart from the ranks (a test or benchmark killing "a worker" kills a rank).
SpareWorker = ray.remote(max_concurrency=2)(type("SpareWorker", (_Worker,), {}))


class WorkerGroup:
    def __init__(
        self,
        workers: int,
        *,
        cpus_per_worker: float,
        gpus_per_worker: float = 0,
        placement: str = "PACK",
        env: dict[str, str] | None = None,
        placement_timeout_s: float = 60,
        keeper=None,
        imports: tuple[str, ...] = (),
    ):
        self.n = workers
        self.cpus, self.gpus = cpus_per_worker, gpus_per_worker
        self.placement, self.env = placement, env or {}
        self.placement_timeout_s = placement_timeout_s
        # imports: modules each actor imports as it starts; "pkg.mod:fn" also calls fn()
        self.keeper, self.imports = keeper, imports
        self.actors: list = []
        self.contexts: list[WorkerContext] = []
        self.pids: list[int] = []
        self._pg = None
        self._polls: dict[int, ray.ObjectRef] = {}  # rank -> its poll() not read yet
        self.phases: dict[str, float] = {}
        self.spare = None  # a SpareWorker, once prestart_spare() started one

    def prestart_spare(self, *ready: Any) -> None:
        """Start one idle worker for the next heal. It reserves no CPU or GPU
        (num_cpus=0; with GPUs none is started): once it replaces a rank, the lost
        rank's bundle stays reserved and empty, so the group never holds more than it
        was placed with; on a cluster it runs where Ray puts it, not in that bundle.
        ``ready``: a function and its arguments the spare then calls (``call``)."""
        if self.spare is None and not self.gpus and self.actors:
            self.spare = SpareWorker.options(num_cpus=0).remote(*self._actor_args())
            if ready:
                self.spare.call.remote(*ready)

    def _actor_args(self) -> tuple:
        """A worker actor's constructor arguments: one thread per whole CPU it holds (at least one)."""
        return max(1, int(self.cpus)), self.env, self.keeper, self.imports

    def _rank_actor(self, bundle: int):
        """A RankWorker in the placement group's ``bundle``."""
        return RankWorker.options(
            num_cpus=self.cpus, num_gpus=self.gpus,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=bundle),
        ).remote(*self._actor_args())

    def start(self) -> None:
        t0 = time.perf_counter()
        bundle = {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {})}
        self._pg = placement_group([bundle] * self.n, strategy=self.placement)
        ready, _ = ray.wait([self._pg.ready()], timeout=self.placement_timeout_s)
        if not ready:
            have = ray.cluster_resources()
            raise ClusterError(
                f"workers={self.n} x {bundle} could not be placed within {self.placement_timeout_s:.0f} s "
                f"(cluster has CPU={have.get('CPU', 0):g}, GPU={have.get('GPU', 0):g}; placement={self.placement})"
            )
        t1 = time.perf_counter()
        self.actors = [self._rank_actor(i) for i in range(self.n)]
        where = ray.get([a.where.remote() for a in self.actors])
        t2 = time.perf_counter()
        self.pids = [pid for _, _, pid in where]
        self.where, self.bundles = where, list(range(self.n))
        self.contexts = self._contexts()
        self.phases = {"placement_s": t1 - t0, "actors_s": t2 - t1}

    def _contexts(self) -> list[WorkerContext]:
        """Every rank's context from where its actor is (``self.where``), with a
        fresh rendezvous port from rank 0's actor. Ranks are bundle order (PACK keeps
        a node's bundles together); local rank counts within a node."""
        seen: dict[str, int] = {}
        local_ranks = []
        for node_id, _, _ in self.where:
            local_ranks.append(seen.get(node_id, 0))
            seen[node_id] = local_ranks[-1] + 1
        node_index = {n: i for i, n in enumerate(dict.fromkeys(node_id for node_id, _, _ in self.where))}
        nodes = tuple(node_index[node_id] for node_id, _, _ in self.where)
        port = ray.get(self.actors[0].rendezvous_port.remote())
        threads = self._actor_args()[0]
        return [WorkerContext(rank=r, world=self.n, local_rank=local_ranks[r], node_ip=self.where[r][1],
                              master_addr=self.where[0][1], master_port=port, threads=threads, nodes=nodes)
                for r in range(self.n)]

    def abort(self, lost: int) -> None:
        """The first half of a heal: rank ``lost``'s actor is killed (it may be hung,
        not dead) and every other one aborts its process groups, since a survivor may
        wait on another survivor, not on the lost rank; done before any is told to
        re-form (a threaded actor may reorder calls)."""
        self._t_heal = time.perf_counter()
        ray.kill(self.actors[lost], no_restart=True)
        ray.wait([a.control.remote(Abort()) for r, a in enumerate(self.actors) if r != lost],
                 num_returns=len(self.actors) - 1, timeout=10)

    def heal(self, lost: list[int], *, shrink: bool) -> list[int]:
        """Replace ranks ``lost`` in place (after ``abort``): a new actor (the spare
        first) takes each one's rank and bundle, every other actor stays (same
        process); with ``shrink``, the one lost rank is dropped and the ranks above
        it move down. New contexts with a new rendezvous (a new port: the old
        group's may linger). Returns the ranks whose actors are new; the caller tells
        the others (``reform``) and runs its function on the new ones (``run_on``)."""
        for r in lost:
            ray.kill(self.actors[r], no_restart=True)  # again for the first: harmless
            self._polls.pop(r, None)
        if shrink:
            (gone,) = lost
            for seq in (self.actors, self.where, self.bundles, self.pids):
                del seq[gone]
            self._polls = {(r - (r > gone)): ref for r, ref in self._polls.items()}
            self.n -= 1
            new = []
        else:
            for r in lost:
                if self.spare is not None:
                    self.actors[r], self.spare = self.spare, None
                else:
                    self.actors[r] = self._rank_actor(self.bundles[r])
            for r, where in zip(lost, ray.get([self.actors[r].where.remote() for r in lost])):
                self.where[r], self.pids[r] = where, where[2]
            new = list(lost)
        self.contexts = self._contexts()
        self.phases = {"replace_s": time.perf_counter() - self._t_heal}
        return new

    def reform(self, rank: int, extra: dict) -> None:
        """Tell a surviving rank its new place: ``{"reform": its context's fields, **extra}``."""
        c = self.contexts[rank]
        fields = {"rank": c.rank, "world": c.world, "local_rank": c.local_rank, "node_ip": c.node_ip,
                  "master_addr": c.master_addr, "master_port": c.master_port, "nodes": c.nodes}
        self.actors[rank].control.remote({"reform": fields, **extra})

    def run_on(self, ranks: list[int], fn: Callable[..., Any], *args: Any) -> list[ray.ObjectRef]:
        """``run_async`` on some ranks only (the new actors of a heal)."""
        fn_ref = ray.put(fn)
        return [self.actors[r].run.remote(self.contexts[r], fn_ref, *args) for r in ranks]

    def run_async(self, fn: Callable[..., Any], *args: Any) -> list[ray.ObjectRef]:
        fn_ref = ray.put(fn)
        return [a.run.remote(ctx, fn_ref, *args) for a, ctx in zip(self.actors, self.contexts)]

    def poll(self, timeout_s: float = 10) -> list:
        """Every report the ranks made since the last poll. A rank that does not
        answer in time is skipped this round; its answer is read by a later poll,
        so no report is lost."""
        for i, a in enumerate(self.actors):
            if i not in self._polls:
                self._polls[i] = a.poll.remote()
        ready, _ = ray.wait(list(self._polls.values()), num_returns=len(self._polls), timeout=timeout_s)
        ready = set(ready)
        rows = []
        for i in sorted(self._polls):
            if self._polls[i] not in ready:
                continue
            ref = self._polls.pop(i)
            try:
                rows += ray.get(ref)
            except ray.exceptions.RayActorError:
                pass  # a dead worker shows up in its run() result
        return rows

    def control(self, msg: object) -> None:
        """Send ``msg`` to every rank's actor (fire and forget; see ``_Worker.control``)."""
        for a in self.actors:
            a.control.remote(msg)

    def kill(self, rank: int) -> None:
        ray.kill(self.actors[rank], no_restart=True)

    def shutdown(self) -> None:
        for a in self.actors + ([self.spare] if self.spare is not None else []):
            ray.kill(a, no_restart=True)
        self.actors, self.spare = [], None
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None
