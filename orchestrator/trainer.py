"""The per-rank training loop; runs inside a worker (a Ray actor, or a test process)."""
from __future__ import annotations

import copy
import math
import os
import resource
import threading
import time
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from cluster import Comm
from cluster.faults import FaultInjector, Injection
from cluster.mesh import nodes_from_per_node
from cluster.network import Scenario
from cluster.dist import init_process_group, pick_device, stop_compute_on_abort
from orchestrator.checkpoint import Checkpointer, committed, restore, restore_snapshot, snapshot_files
from orchestrator.config import JobSpec
from orchestrator.errors import SnapshotLost, is_echo  # SnapshotLost: also importable from here, its old home
from orchestrator.messages import (  # Attempt: as before
    Attempt, Begin, Broken, Committing, Control, Drop, Event, Flush, Injected, Live, Row, Shares, SnapshotPart,
)
from strategies import STRATEGIES, Strategy, StrategyContext
from workloads import WORKLOADS, SampleSource, ShardedLoader, Workload, split_max
from workloads.plugins import is_ref


# How long rank 0 waits for the driver to store a checkpoint's rows before committing it
# anyway: the driver answers within a poll or two; a driver that cannot must not stall training.
COMMIT_WAIT_S = 30.0


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def network_floor(model: Scenario | None, injector: FaultInjector, step: Callable[[], int]):
    """The least time of each communication call: the scenario's network model,
    plus any ``netdelay`` injected on this rank. None when neither applies."""
    if model is None and not any(i.kind == "netdelay" for i in injector.mine):
        return None

    def floor(op: str, sent: int, received: int, ranks: tuple[int, ...]) -> float:
        base = model.seconds(op, sent, received, ranks) if model is not None else 0.0
        return base + injector.comm_delay_s(step())

    return floor


def rank_nodes(model: Scenario | None, world: int, placed: tuple[int, ...] = ()) -> tuple[int, ...]:
    """The node of each rank, which decides each call's link class: a simulated
    network's (``per_node`` ranks a node) over where Ray placed the workers (on
    one machine, all on one node); () when neither is known: one node."""
    return nodes_from_per_node(world, model.per_node) if model is not None else tuple(placed)


class _Poisoned:
    """The workload with its loss made NaN on demand (the ``nan`` injection)."""

    def __init__(self, workload: Workload):
        self._workload, self.active = workload, False

    def __getattr__(self, name):
        return getattr(self._workload, name)

    def loss(self, output, batch):
        loss = self._workload.loss(output, batch)
        return loss * float("nan") if self.active else loss


class RankTrainer:
    """Builds one rank's strategy and loader and runs steps. Usable without Ray:
    tests drive it in plain processes against the single-process reference."""

    def __init__(self, spec: JobSpec, *, rank: int, world: int, device: torch.device,
                 workload: Workload | None = None, strategy_cls: type[Strategy] | None = None,
                 shares: list[int] | None = None, injections: list[Injection] = (), report: Callable[[object], None] = None,
                 flush: Callable[[], None] | None = None, nodes: tuple[int, ...] = (), state_follows: bool = False,
                 source: SampleSource | None = None):
        self.spec, self.rank, self.world, self.device = spec, rank, world, device
        self.report = report or (lambda row: None)
        workload = workload if workload is not None else spec.build_workload()
        self.injector = FaultInjector(list(injections), rank, self._fired, flush)
        self.workload = _Poisoned(workload) if any(i.kind == "nan" for i in injections) else workload
        strategy_cls = strategy_cls or spec.strategy_cls()
        self.comm = Comm()
        self.step = 0  # before set-up: the floor reads it, and demo's and gossip's set-up communicate
        self.began = 0  # the step in progress (== step between steps)
        self.comm.set_floor(network_floor(spec.scenario, self.injector, lambda: self.step + 1))
        self.comm.set_nodes(rank_nodes(spec.scenario, world, nodes))
        torch.manual_seed(spec.seed)  # same initial weights on every rank
        self.strategy: Strategy = strategy_cls(strategy_cls.Options(**spec.strategy.options))
        self.strategy.setup(
            self.workload,
            StrategyContext(rank=rank, world=world, device=device, comm=self.comm, optim=spec.optim,
                            total_steps=spec.steps, state_follows=state_follows),
        )
        replica, replicas = self.strategy.data_shard()
        source = workload.source() if source is None else source  # once: the held-out split is of the same samples
        self.loader = ShardedLoader(
            workload.train_source(source), rank=replica, world=replicas, global_batch=spec.global_batch, seed=spec.seed,
            shares=shares,  # per data-parallel replica
        )
        self.dropped: set[int] = set()  # ranks whose gradient this step leaves out (backup workers)
        self._pending: list[Control] = []  # controls not yet due
        self.tokens_per_sample = workload.tokens_per_sample()
        self.micro_batch = spec.micro_batch  # resolved once: it builds the strategy's options
        self.eval_batches = self._eval_batches(workload, replica, replicas, source)

    def _eval_batches(self, workload: Workload, replica: int, replicas: int, source=None) -> tuple[list, list] | None:
        """The held-out samples every evaluation scores, the same ones each time:
        (this replica's slice, all of them where replicas differ, else None), each as micro-batches. None: no
        evaluation (the workload holds nothing out, or the strategy cannot evaluate)."""
        heldout = workload.heldout_source(source)
        if heldout is None or type(self.strategy).evaluate is Strategy.evaluate:
            return None
        n = min(self.spec.eval_samples, len(heldout))
        n -= n % replicas  # every replica scores as many samples: their collectives pair up
        if not n:
            return None
        idx = np.arange(n)
        mine = split_max(heldout.gather(idx[replica::replicas]), self.micro_batch)
        # replicas that differ each score every sample (their spread); the others share them out
        whole = split_max(heldout.gather(idx), self.micro_batch) if self.strategy.replicas_differ() else None
        return mine, whole

    def evaluates(self, step: int) -> bool:
        every = self.spec.eval_every
        return self.eval_batches is not None and (step == self.spec.steps or bool(every) and step % every == 0)

    def evaluate(self) -> dict[str, float]:
        """Collective: the held-out figures of the model as it is now, the same on
        every rank. Replicas that differ (gossip) are scored on their average, with
        ``val_spread`` the range of their own held-out losses."""
        t0 = time.perf_counter()
        mine, whole = self.eval_batches
        out: dict[str, float] = {}
        if self.strategy.replicas_differ():
            own = _eval_sums(self.strategy.evaluate(whole), self._replica)
            losses = [ls / n for ls, n, _ in _merge_by_replica(own).values() if n]
            out["val_spread"] = max(losses) - min(losses) if losses else math.nan
            with self.strategy.replica_average():
                stats = self.strategy.evaluate(whole)
        else:
            stats = self.strategy.evaluate(mine)
        loss_sum, n, sums = _merge(_eval_sums(stats, self._replica))
        out["val_loss"] = loss_sum / n if n else math.nan
        out.update({f"val_{k}": v / n for k, v in sums.items()} if n else {})
        out["eval_s"] = time.perf_counter() - t0
        return out

    @property
    def _replica(self) -> int:
        return self.strategy.data_shard()[0]

    def progress(self) -> dict:
        """Where this rank is now (read from another thread): the step it began and
        the communication calls it entered in it, so the driver can name the rank
        its peers wait for."""
        return {"step": max(self.began, self.step), **self.comm.progress()}  # step: after a restore too

    def roll_back(self) -> None:
        """After a step failed in a collective: its data and random draws are undone,
        so the step is redone from the state it began in (its update never ran:
        ``Strategy.heal``)."""
        if self.began > self.step:
            self.loader.load_state_dict(self._undo[0])
            torch.set_rng_state(self._undo[1])
            self.began = self.step

    def _fired(self, inj, step: int) -> None:
        self.report(Injected(rank=self.rank, step=step, injection=inj))

    # -- controls from the driver ------------------------------------------------------------
    def control(self, msg: Control) -> None:
        """Queue a change that takes effect at step ``msg.step`` on every rank:
        ``Shares`` (samples per data-parallel replica) or ``Drop`` (ranks whose gradient is left out)."""
        if msg.step <= self.step:
            raise RuntimeError(f"control for step {msg.step} arrived at step {self.step}: the driver's margin "
                               f"was too small; this rank cannot apply it in step with its peers")
        self._pending.append(msg)

    def _apply_controls(self, step: int) -> None:
        due = [m for m in self._pending if m.step == step]
        self._pending = [m for m in self._pending if m.step != step]
        for m in due:
            match m:
                case Shares():
                    self.loader.set_shares(list(m.shares))
                case Drop():
                    self.dropped = set(m.ranks)

    def _grad_weight(self) -> float:
        """This rank's weight in the gradient average, relative to an even split:
        the update is sum over kept ranks of (their samples / kept samples) x their
        mean gradient, the full-batch gradient of the samples used."""
        if self.rank in self.dropped or self.loader.world != self.world:
            return 0.0 if self.rank in self.dropped else 1.0
        kept = sum(n for r, n in enumerate(self.loader.shares) if r not in self.dropped)
        return self.loader.shares[self.rank] * self.world / kept

    # -- the step ------------------------------------------------------------------------------
    def train_step(self) -> dict:
        """One optimizer step; returns this rank's metrics row."""
        step = self.step + 1
        self._apply_controls(step)
        self.injector.before_step(step)
        self.report(Begin(rank=self.rank, step=step))  # lets the driver tell a hung rank from its waiting peers
        self.began = step
        self._undo = (self.loader.state_dict(), torch.get_rng_state())  # what the step changes before its update
        t0 = time.perf_counter()
        batch = self.loader.next_batch()
        t_data = time.perf_counter() - t0
        self.comm.take_stats()  # drop anything outside the step (e.g. DDP's initial broadcast)
        self.strategy.grad_weight = self._grad_weight()
        if isinstance(self.workload, _Poisoned):
            self.workload.active = self.injector.poisons(step)
        dropped = self.rank in self.dropped
        # A dropped rank still joins the step's collectives (DDP's reducer needs a
        # forward), on one sample at weight 0, so it contributes nothing and costs little.
        micro = [tuple(t[:1] for t in batch)] if dropped else split_max(batch, self.micro_batch)
        stats = self.strategy.train_step(micro)
        if dropped:
            stats.loss, stats.samples = float("nan"), 0
        slow = self.injector.slowdown(step, time.perf_counter() - t0 - t_data)
        if slow:
            time.sleep(slow)
        step_time = time.perf_counter() - t0
        comm = self.comm.take_stats()
        idle = t_data + comm.wait_s
        self.step = step
        return {
            "step": step,
            "rank": self.rank,
            "loss": stats.loss,
            "step_time_s": step_time,
            "compute_s": max(0.0, step_time - idle),
            "comm_s": comm.comm_s,
            "idle_s": idle,
            "bytes_sent": comm.bytes_sent,
            "bytes_received": comm.bytes_received,
            "bytes_intra": comm.bytes_intra,
            "bytes_inter": comm.bytes_inter,
            "comm_intra_s": comm.comm_intra_s,
            "comm_inter_s": comm.comm_inter_s,
            "samples": stats.samples,
            "tokens": stats.samples * self.tokens_per_sample,  # 0 on ranks that do not report samples
            "peak_mem_bytes": peak_memory_bytes(self.device),
            "wall_time": time.time(),
            "load_avg": os.getloadavg()[0],  # the machine's load: a reader can see what bent a timing
            **({"dropped": 1.0} if dropped else {}),
            **stats.extra,
            **self.strategy.memory_bytes(),
            **({"timeline": stats.timeline} if stats.timeline else {}),
        }

    def run(self, report: Callable[[object], None], checkpointer: Checkpointer | None = None,
            snapshot: Callable[[int], None] | None = None, controls: Callable[[], list[Control]] = lambda: []) -> None:
        while self.step < self.spec.steps:
            for msg in controls():
                self.control(msg)
            row = self.train_step()
            try:
                if self.eval_batches is not None:  # after the step's clock: evaluation is not training time
                    row.update(self.evaluate() if self.evaluates(self.step) else {"val_loss": math.nan, "eval_s": 0.0})
            finally:  # a peer lost during the evaluation: the step itself is done, its row is kept
                report(Row.of(row))
            if checkpointer is not None and checkpointer.due(self.step):
                checkpointer.save(self)
            if snapshot is not None and self.step % self.spec.failure.snapshot_every == 0:
                snapshot(self.step)


def _eval_sums(stats, replica: int) -> tuple[int, float, int, dict[str, float]]:
    """One rank's share of an evaluation, as sums: (replica, loss x samples, samples, metric x samples)."""
    n = stats.samples
    return replica, (stats.loss * n if n else 0.0), n, {k: v * n for k, v in stats.extra.items()} if n else {}


def _gather(item) -> list:
    """Every rank's ``item`` (a few numbers: outside the step, not accounted)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [item]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, item)
    return out


def _merge_by_replica(item) -> dict[int, tuple[float, int, dict[str, float]]]:
    merged: dict[int, tuple[float, int, dict[str, float]]] = {}
    for replica, loss_sum, n, sums in _gather(item):
        ls, m, acc = merged.get(replica, (0.0, 0, {}))
        merged[replica] = (ls + loss_sum, m + n, {k: acc.get(k, 0.0) + sums.get(k, 0.0) for k in {*acc, *sums}})
    return merged


def _merge(item) -> tuple[float, int, dict[str, float]]:
    """The world's evaluation sums (replicas that scored the same samples count each time)."""
    parts = _merge_by_replica(item).values()
    names = {k for _, _, sums in parts for k in sums}
    return (sum(p[0] for p in parts), sum(p[1] for p in parts),
            {k: sum(p[2].get(k, 0.0) for p in parts) for k in names})


def warm_up() -> None:
    """What a rank's first set-up would import lazily, done while its actor starts (a
    spare's too, so a heal's newcomer does not pay it while the survivors wait): the
    optimizer's constructor imports torch._dynamo (~1 s of CPU), the mesh the outer
    syncs, fsspec its chained file systems."""
    import fsspec.implementations.chained  # noqa: F401

    import strategies.outer  # noqa: F401

    param = torch.nn.Parameter(torch.zeros(1))
    param.grad = torch.zeros(1)
    torch.optim.AdamW([param]).step()


def pack_job(workload: Workload, strategy_cls: type[Strategy]) -> bytes:
    """The driver's resolved workload and strategy, as bytes. Classes from a
    script or notebook travel by value; classes from files or modules by
    reference, which ``unpack_job`` can only resolve once their module is imported."""
    import ray.cloudpickle as cloudpickle

    return cloudpickle.dumps((workload, strategy_cls))


def unpack_job(spec: JobSpec, payload: bytes) -> tuple[Workload, type[Strategy]]:
    import pickle

    for component in (spec.workload, spec.strategy):
        if is_ref(component.name):  # import the user's file or module first
            (WORKLOADS if component is spec.workload else STRATEGIES).get(component.name)
    return pickle.loads(payload)


# A worker process keeps the job it unpacked and the samples it read, by payload: a
# survivor of a heal, and a spare that read them while the steps went on
# (``RayGroup.poll``), build their next trainer without reading the data again
# (0.4 s for gpt-tiny on 2 cores, on the heal's critical path).
_JOBS: dict[bytes, tuple[Workload, type[Strategy], SampleSource]] = {}
_JOBS_LOCK = threading.Lock()  # a spare may still be reading when its heal's run starts


def load_job(spec: JobSpec, payload: bytes) -> tuple[Workload, type[Strategy], SampleSource]:
    """``unpack_job`` and the workload's ``source()``, once per worker process."""
    with _JOBS_LOCK:
        if payload not in _JOBS:
            workload, strategy_cls = unpack_job(spec, payload)
            _JOBS[payload] = (workload, strategy_cls, workload.source())
        return _JOBS[payload]


class _PeerLost(Exception):
    """A collective of this rank lost a peer while its strategy heals in place:
    the state of the rank's trainer, rolled back to its last whole step, for the
    next attempt in this process (``heal = "peer"``: a copy; the trainer itself is
    let go, so its process groups close their connections: a peer still waiting
    on this rank fails now, not at its timeout)."""

    def __init__(self, trainer: RankTrainer, error: BaseException, peer: bool):
        super().__init__(f"{type(error).__name__}: {error}")
        trainer.roll_back()
        self.step = trainer.step
        self.state = None if not peer else copy.deepcopy({
            "state": trainer.strategy.heal_state(), "step": trainer.step, "cursor": trainer.loader.state_dict(),
            "rng": torch.get_rng_state()})


def train_worker(ctx, spec: JobSpec, payload: bytes, run_url: str, attempt: Attempt, ckpt_meta: dict) -> dict:
    """Entry point shipped to every Ray worker (ctx: cluster.WorkerContext).

    ``attempt`` says where to restore from (a snapshot, or a checkpoint the
    driver has already checked), the batch shares and the faults still to
    inject; ``ckpt_meta`` describes this job in every checkpoint it writes.

    A rank whose collective loses a peer, under a strategy that heals in place
    (``Strategy.heal``), does not exit: it reports ``Broken``, waits for the
    driver's re-form (``WorkerGroup.heal``: its rank, world and rendezvous, and
    the next attempt) and runs that attempt in this process, with its state."""
    job = load_job(spec, payload)
    survivor: _PeerLost | None = None
    while True:
        try:
            return _run_attempt(ctx, spec, job, run_url, attempt, ckpt_meta, survivor)
        except _PeerLost as lost:
            survivor = lost
            ctx, attempt = _await_reform(ctx, lost, attempt.number)


def _await_reform(ctx, lost: _PeerLost, attempt: int):
    import gc
    from dataclasses import replace

    from cluster.dist import abort_process_group

    # out of the collective now: said first, so the driver's settle does not wait on the clean-up below
    ctx.report(Broken(rank=ctx.rank, step=lost.step, error=str(lost), attempt=attempt))
    gc.collect()  # the old trainer's modules hold its process groups: gone, they close their connections
    abort_process_group()
    while True:
        for msg in ctx.controls():  # others were meant for the attempt that failed
            if "reform" in msg:
                return replace(ctx, **msg["reform"]), msg["attempt"]
        time.sleep(0.01)


def take_from_peer(trainer: RankTrainer, survivor: _PeerLost | None) -> int:
    """Collective (``heal = "peer"``): every rank loads the whole state of the
    survivor furthest on (survivors may be a step apart when one finished the
    failed step); returns that rank. Survivors pass the state they held, a newcomer
    None. A survivor at that step holds the same state (replicas) and loads its own;
    only the newcomers and the survivors behind receive it, point to point."""
    import torch.distributed as dist

    from cluster.dist import broadcast_tree

    steps = [None] * trainer.world
    dist.all_gather_object(steps, survivor.step if survivor is not None else -1)
    src = steps.index(max(steps))
    behind = [r for r, s in enumerate(steps) if s < steps[src]]
    got = broadcast_tree(survivor.state if trainer.rank == src else None, src=src, device=trainer.device, to=behind)
    if got is None:  # level with src
        got = survivor.state
    trainer.strategy.load_heal_state(got["state"])
    trainer.step = got["step"]
    trainer.loader.load_state_dict(got["cursor"])  # one cursor for every rank: each reads its share of it
    torch.set_rng_state(got["rng"])  # replicas draw alike: the lost rank's RNG state was this too
    return src


def _run_attempt(ctx, spec: JobSpec, job: tuple[Workload, type[Strategy], SampleSource], run_url: str,
                 attempt: Attempt, ckpt_meta: dict, survivor: _PeerLost | None) -> dict:
    workload, strategy_cls, source = job
    t0 = time.perf_counter()
    heals = spec.failure.heal_mode(strategy_cls.heal) != "restart" and ctx.world > 1  # in place, in this process
    if heals:
        stop_compute_on_abort()  # a heal's abort ends a doomed step now, not at its end
    device = pick_device(ctx.local_rank) if spec.cluster.gpus_per_worker > 0 else torch.device("cpu")
    # always, even for one worker: ddp, fsdp and zero* need a process group at world size 1 too
    init_process_group(
        rank=ctx.rank, world=ctx.world, init_method=ctx.init_method,
        device=device, timeout_s=spec.cluster.collective_timeout_s,
    )
    t1 = time.perf_counter()
    trainer = None
    try:
        from_peer = attempt.heal and strategy_cls.heal == "peer"
        trainer = RankTrainer(spec, rank=ctx.rank, world=ctx.world, device=device, workload=workload,
                              strategy_cls=strategy_cls, shares=attempt.shares, injections=attempt.injections,
                              report=ctx.report, flush=lambda: ctx.flush(5.0), nodes=ctx.nodes,
                              state_follows=from_peer, source=source)
        ctx.live(lambda: Live(rank=ctx.rank, progress=trainer.progress()))
        t_built = time.perf_counter()
        restored = ""
        if from_peer:
            src = take_from_peer(trainer, survivor)
            restored = f", took the state of step {trainer.step} from rank {src}"
        elif attempt.snapshot:
            try:
                parts = ctx.fetch(attempt.snapshot)
            except Exception as e:  # RayActorError (Keeper lost), ObjectLostError, KeyError (a restarted Keeper)
                raise SnapshotLost(f"the in-memory snapshot cannot be fetched ({type(e).__name__})") from None
            restore_snapshot(trainer, parts)
            restored = f", restored the in-memory snapshot of step {trainer.step}"
        elif attempt.resume_url:
            restore(trainer, attempt.resume_url)
            restored = f", restored {attempt.resume_url}"
        t2 = time.perf_counter()
        if attempt.heal:  # the re-formed group's phases, each rank's own (the pid: a survivor keeps its process)
            kept = "kept its process" if survivor is not None else "new process"
            ctx.report(Event(kind="heal:reform", rank=ctx.rank, step=trainer.step, seconds=t1 - t0,
                             detail=f"pid {os.getpid()} ({kept}): rendezvous of {ctx.world} ranks"))
            ctx.report(Event(kind="heal:transfer", rank=ctx.rank, step=trainer.step, seconds=t2 - t1,
                             detail=f"pid {os.getpid()}: set-up {t_built - t1:.2f}s, state {t2 - t_built:.2f}s{restored}"))
        ctx.report(Event(kind="phase:worker_setup", rank=ctx.rank, step=trainer.step, seconds=t2 - t1,
                         detail=f"rendezvous {t1 - t0:.2f}s{restored}; pid {os.getpid()}"))

        def committing(step: int, url: str, seconds: float) -> None:
            # The event and every rank's rows up to this step reach storage before the
            # marker: a driver killed right after the commit loses none of them.
            ctx.report(Committing(rank=0, step=step, seconds=seconds, url=url))
            ctx.report(Flush(mark=step))
            ctx.flush(COMMIT_WAIT_S, mark=step)

        checkpointer = Checkpointer(run_url, every=spec.checkpoint_every, keep=spec.keep_checkpoints,
                                    rank=ctx.rank, world=ctx.world, meta=ckpt_meta,
                                    written=trainer.injector.during_checkpoint, committing=committing)
        if attempt.heal and trainer.step and checkpointer.due(trainer.step) and \
                trainer.step not in {s for s, _ in committed(run_url)}:
            checkpointer.save(trainer)  # the failure cut this step's checkpoint short: the loop saves only after a step

        def snapshot(step: int) -> None:
            t = time.perf_counter()
            handle = ctx.stash(snapshot_files(trainer, ckpt_meta))
            ctx.report(SnapshotPart(rank=ctx.rank, step=step, seconds=time.perf_counter() - t, handle=handle))

        lost = None
        try:
            trainer.run(ctx.report, checkpointer, snapshot if spec.snapshots_needed else None, ctx.controls)
        except Exception as e:
            if not (heals and is_echo(str(e))):
                raise
            lost = _PeerLost(trainer, e, peer=strategy_cls.heal == "peer")
        if lost is not None:  # raised here, not in the handler: the failed step's frames are let go with it
            progress = {**trainer.progress(), "op": "re-form"}
            ctx.live(lambda: Live(rank=ctx.rank, progress=progress))
            trainer = None  # not kept alive (below): its process groups must close
            raise lost
        return {"rank": ctx.rank, "steps": trainer.step}
    finally:
        # The worker process is killed once the job ends; its process group and the
        # strategy are deliberately never torn down here. Tearing down gloo joins its
        # threads while this thread holds the GIL, and a gloo thread may still need
        # the GIL to release a finished collective's Python callback (Comm's
        # accounting, DDP comm hooks): a deadlock we hit in ~1 of 20 jobs.
        if trainer is not None:
            _KEEP_ALIVE.append(trainer)


_KEEP_ALIVE: list = []
