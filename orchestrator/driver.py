"""run(spec): validate, start Ray and the worker group, supervise, write the run folder."""
from __future__ import annotations

import importlib
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass

from typing import TYPE_CHECKING, Any, Callable

from orchestrator.config import ConfigError, JobSpec
from orchestrator.messages import Attempt, Broken, Row
from orchestrator.progress import Progress

if TYPE_CHECKING:
    import pandas as pd

    from orchestrator.controller import GroupStatus
    from orchestrator.metrics import MetricsLog
    from orchestrator.storage import RunFolder

# This module imports nothing heavy at its top (no torch, pandas, pyarrow): the job's
# own imports and data check run in a thread while Ray starts (``_prepare``).


# How often the driver collects reports. ray.wait returns at once when a rank ends
# or fails, so this bounds only progress-line latency; on a small machine every
# poll takes CPU from the workers.
POLL_S = 0.25
# How long a heal waits for the survivors to leave the collective that lost its peer
# (each reports Broken, once out of it and out of its process group) before replacing
# the ones still in it as well.
HEAL_SETTLE_S = 5.0
HEAL_SETTLE_QUIET_S = 1.0  # ... or this long after the last survivor that did


@dataclass
class RunResult:
    run_id: str
    url: str
    steps: int
    wall_s: float
    final_loss: float
    checkpoint: str | None = None  # URL of the last committed checkpoint, when the job wrote any

    @property
    def metrics(self) -> pd.DataFrame:
        return self._read("metrics")

    @property
    def events(self) -> pd.DataFrame:
        return self._read("events")

    def _read(self, name: str) -> pd.DataFrame:
        from orchestrator.metrics import read_log
        from orchestrator.storage import RunFolder

        return read_log(RunFolder.from_url(self.url), name)


class Interrupted(KeyboardInterrupt):
    """Stopped from outside by SIGTERM (polytrain stop, Kubernetes, Slurm) or SIGHUP
    (a closed terminal): handled as Ctrl-C; the CLI exits 128 + ``signum``."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


STOP_SIGNALS = (signal.SIGTERM,) + ((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ())


class StopSignals:
    """While a job runs in this process's main thread, SIGTERM and SIGHUP raise
    ``Interrupted``: once, so that a second signal cannot cut short the teardown
    the first one began. The handlers in place before come back afterwards
    (library use); ``take()`` takes the signals back after something else
    installed its own handler (``ray.init`` does)."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            self._previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
            self.take()
        return self

    def take(self) -> None:
        for s in self._previous:
            signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
            raise Interrupted(signum)

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, signal.SIG_DFL if h is None else h)  # None: set outside Python; default is closest


def _cpus_per_worker(spec: JobSpec, total_cpus: float, embedded: bool) -> float:
    if spec.cluster.cpus_per_worker:
        return spec.cluster.cpus_per_worker
    return min(1.0, total_cpus / spec.workers) if embedded else 1.0


FAILURE_GRACE_S = 3.0


def death_cause(ray_detail: str) -> str:
    """Why a worker process died, in a few words, from Ray's exit detail (which
    cannot tell a SIGKILL from an abrupt exit: both close the connection)."""
    sig = re.search(r"receives a (SIG[A-Z]+)", ray_detail)
    if sig:
        return f"killed from outside: {sig.group(1)}"
    code = re.search(r"exits with an exit code (\d+)", ray_detail)
    if code:
        return f"exited with code {code.group(1)}"
    return "killed from outside by a signal (SIGKILL, the OOM killer) or exited abruptly"


def _failure_message(rank: int, err: BaseException) -> str:
    import ray

    cause = getattr(err, "cause", None)
    if isinstance(err, ray.exceptions.RayTaskError) and cause is not None:
        return f"rank {rank} failed: {type(cause).__name__}: {one_line(str(cause))}"
    if isinstance(err, ray.exceptions.RayActorError):
        return f"rank {rank} failed: its worker process died ({death_cause(str(err))})"
    return f"rank {rank} failed: {type(err).__name__}: {one_line(str(err))}"


def one_line(text: str, limit: int = 300) -> str:
    """An error's first line; where that line only announces what follows (ends
    with ':'), the following lines joined onto it, up to ``limit`` characters."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return ""
    if not lines[0].endswith(":") or len(lines) == 1:
        return lines[0]
    joined = " ".join(lines)
    return joined if len(joined) <= limit else joined[: limit - 3] + "..."


class RayGroup:
    """The controller's Group on Ray: one WorkerGroup (placement group + actors)
    per attempt, running ``train_worker``."""

    def __init__(self, spec: JobSpec, *, cpus: float, keeper, payload: bytes, run_url: str, ckpt_meta: dict,
                 phases: list):
        self.spec, self.cpus, self.keeper = spec, cpus, keeper
        self.payload, self.run_url, self.ckpt_meta = payload, run_url, ckpt_meta
        self.phases = phases  # (name, seconds) of each start, for the events
        self.wg = None
        self.pending: dict = {}
        self.finished: set[int] = set()
        self._held: list = []  # reports read while healing, for the controller's next poll
        self._broke: set[tuple[int, int]] = set()  # (attempt, rank) of every Broken read: out of its collective
        # a spare worker for heals, when a failure can heal in place
        self.spares = spec.failure.heal_mode(spec.strategy_cls().heal) != "restart"

    def start(self, attempt: Attempt) -> None:
        from cluster.worker_group import WorkerGroup

        spec = self.spec
        self.wg = WorkerGroup(
            attempt.world, cpus_per_worker=self.cpus, gpus_per_worker=spec.cluster.gpus_per_worker,
            placement=spec.cluster.placement, placement_timeout_s=spec.cluster.placement_timeout_s,
            keeper=self.keeper, imports=("orchestrator.trainer:warm_up",),  # strategies, workloads: before the job
        )
        self.wg.start()
        self.phases += list(self.wg.phases.items())
        from orchestrator.trainer import train_worker

        refs = self.wg.run_async(train_worker, spec, self.payload, self.run_url, attempt, self.ckpt_meta)
        self.pending = dict(zip(refs, range(attempt.world)))
        self.finished = set()

    def poll(self) -> GroupStatus:
        import ray

        from orchestrator.controller import GroupStatus

        status = GroupStatus()
        if self.pending:
            done, _ = ray.wait(list(self.pending), num_returns=1, timeout=POLL_S)
            if done:  # and whatever else is already done
                done, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=0)
            for ref in done:
                rank = self.pending.pop(ref)
                try:
                    ray.get(ref)
                    self.finished.add(rank)
                except Exception as e:  # RayTaskError, RayActorError
                    status.errors[rank] = _failure_message(rank, e)
        status.rows, self._held = self._held + self.wg.poll(), []
        self._broke |= {(m.attempt, m.rank) for m in status.rows if isinstance(m, Broken)}  # may precede the heal
        status.finished = set(self.finished)
        if self.spares and self.wg.spare is None and any(isinstance(m, Row) for m in status.rows):
            from orchestrator.trainer import load_job

            # steps are under way: its start no longer competes with the group's; it reads the data meanwhile
            self.wg.prestart_spare(load_job, self.spec, self.payload)
        return status

    def heal(self, attempt: Attempt, lost: int) -> dict[str, float]:
        """Heal in place (``Attempt.heal``): rank ``lost``'s actor is replaced (or
        dropped, the group shrinking), the survivors, waiting in ``train_worker``
        with their state, are told their place in the re-formed group, and the new
        actor runs ``train_worker`` from the start. A survivor that has not left its
        collective (reported ``Broken``) within HEAL_SETTLE_S is replaced too."""
        shrink = attempt.world < self.wg.n
        self.wg.abort(lost)
        t = time.perf_counter()
        gone = [lost] if shrink else sorted({lost, *self._settle(lost, attempt.number - 1)})
        settle = time.perf_counter() - t
        # the lost ranks' runs are over (their actors are killed); survivors keep theirs, renumbered when shrinking
        self.pending = {ref: r - (shrink and r > lost) for ref, r in self.pending.items() if r not in gone}
        new = self.wg.heal(gone, shrink=shrink)
        for r in range(attempt.world):
            if r not in new:
                self.wg.reform(r, {"attempt": attempt})
        from orchestrator.trainer import train_worker

        refs = self.wg.run_on(new, train_worker, self.spec, self.payload, self.run_url, attempt, self.ckpt_meta)
        self.pending.update(zip(refs, new))
        self.finished = set()
        return {**self.wg.phases, "settle_s": settle}

    def _settle(self, lost: int, attempt: int) -> list[int]:
        """The survivors that did not report ``Broken`` (for ``attempt``) within
        HEAL_SETTLE_S of the abort: still blocked in a collective whose work an
        aborted group never ends (seen under DDP with 4 ranks), or ended. A survivor
        next to the lost rank breaks before the loss is even known: its Broken, read by
        an earlier poll, counts. What the polls read meanwhile is held for the
        controller's next poll."""
        waiting = set(range(self.wg.n)) - {lost} - {r for a, r in self._broke if a == attempt}
        start = time.perf_counter()
        deadline = start + HEAL_SETTLE_S
        while waiting and time.perf_counter() < deadline:
            rows = self.wg.poll(timeout_s=POLL_S)
            self._held += rows
            broke = {m.rank for m in rows if isinstance(m, Broken) and m.attempt == attempt} & waiting
            if broke:  # the others break within moments of each other: one still silent later is stuck
                waiting -= broke
                deadline = min(start + HEAL_SETTLE_S, time.perf_counter() + HEAL_SETTLE_QUIET_S)
            if waiting:
                time.sleep(0.05)
        return sorted(waiting)

    def control(self, msg: object) -> None:
        self.wg.control(msg)

    def shutdown(self) -> None:
        if self.wg is not None:
            self.wg.shutdown()
            self.wg = None


def check_before_ray(spec: JobSpec) -> None:
    """Fail fast, before Ray starts and anything is written: an address nothing
    listens on, or a job this machine's embedded Ray cannot hold."""
    from cluster import runtime as ray_runtime

    if spec.cluster.address:
        ray_runtime.check_reachable(spec.cluster.address)
    elif ray_runtime.will_embed(spec.cluster.address):
        gpus = spec.cluster.gpus_per_worker
        if gpus:
            import torch
        ray_runtime.check_embedded(workers=spec.workers, gpus_per_worker=gpus,
                                   gpus_here=torch.cuda.device_count() if gpus else 0)


def run(spec: JobSpec, *, progress: bool = True, stream=None) -> RunResult:
    """Run a job to the end. Raises ConfigError for bad input (before any worker
    starts) and RunFailed if a worker fails; KeyboardInterrupt on Ctrl-C, and its
    subclass Interrupted on SIGTERM or SIGHUP, after tearing down. The run folder
    keeps what was written."""
    with StopSignals() as stop:
        try:
            return _run(spec, progress=progress, stream=stream, stop=stop)
        except KeyboardInterrupt as e:
            if stop.received and not isinstance(e, Interrupted):  # Ray re-raises it as a plain KeyboardInterrupt
                raise Interrupted(stop.received) from None
            raise


@dataclass
class _Prepared:
    """What the driver knows of a job once its data is checked (``_prepare``)."""
    folder: RunFolder
    log: MetricsLog
    ckpt_meta: dict
    payload: bytes
    resume_url: str | None
    resumed_step: int


def _prepare(spec: JobSpec, out: Progress) -> _Prepared:
    """The driver's share of a job before its workers start: import the workload and
    strategy (torch), create or check the data (ConfigError when it cannot hold the
    job), resolve ``resume``, create the run folder and its log. Runs while Ray starts."""
    from orchestrator import checkpoint
    from orchestrator.metrics import MetricsLog
    from orchestrator.storage import RunFolder
    from orchestrator.trainer import pack_job
    importlib.import_module("cluster.worker_group")  # the main thread's next import (0.3 s)

    try:
        t0 = time.perf_counter()
        workload = spec.build_workload()
        n_samples = len(workload.train_source())  # creates or checks the data before any worker
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None
    if spec.global_batch > n_samples:
        raise ConfigError(spec.dataset_too_small(n_samples))
    data_s = time.perf_counter() - t0
    folder = RunFolder(spec.storage, spec.run_id)
    strategy_cls = spec.strategy_cls()
    ckpt_meta = {"workload": spec.workload.name, "workload_options": spec.workload.options,
                 "strategy": spec.strategy.name, "format": strategy_cls.checkpoint_format,
                 "shapes": checkpoint.model_shapes(workload)}
    resume_url, resumed_step, notes = None, 0, []
    if spec.resume:
        try:
            resume_url, meta, notes = checkpoint.resolve(spec.resume, run_url=folder.url,
                                                         fmt=ckpt_meta["format"], shapes=ckpt_meta["shapes"])
        except checkpoint.CheckpointError as e:
            raise ConfigError(str(e)) from None
        resumed_step = meta["step"]
    folder.create(spec.to_yaml())
    log = MetricsLog(folder, run_id=spec.run_id, workload=spec.workload.name,
                     strategy=spec.strategy.name, scenario=spec.scenario_name)
    if resume_url:
        gaps = log.keep_history(up_to_step=resumed_step)  # rows after the checkpoint are redone
        if gaps:
            out.note(f"note: {len(gaps)} step(s) up to the checkpoint have no metric rows (event 'gap')")
        for note in notes:
            out.note(f"note: {note}")
            log.event("resume_fallback", detail=note)
        if not meta.get("manifest"):
            out.note(f"warning: {resume_url}: {checkpoint.NO_MANIFEST}")
            log.event("resume_unverified", detail=f"{resume_url}: {checkpoint.NO_MANIFEST}")
        out.note(f"resuming from {resume_url} (step {resumed_step})")
        log.event("resume", step=resumed_step, detail=resume_url)
    log.event("phase:data", seconds=data_s, detail=f"{n_samples} samples")
    log.sync()
    return _Prepared(folder=folder, log=log, ckpt_meta=ckpt_meta, payload=pack_job(workload, strategy_cls),
                     resume_url=resume_url, resumed_step=resumed_step)


def _in_thread(fn: Callable[..., Any], *args) -> Callable[[], Any]:
    """Start ``fn(*args)`` in a daemon thread; the returned callable waits for it and
    returns its result or raises what it raised."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001  (handed to the caller)
            box["error"] = e

    thread = threading.Thread(target=target, name=fn.__name__, daemon=True)
    thread.start()

    def result():
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["value"]

    return result


def _run(spec: JobSpec, *, progress: bool, stream, stop: StopSignals) -> RunResult:
    from cluster import runtime as ray_runtime
    import ray

    t_start = time.perf_counter()
    check_before_ray(spec)
    out = Progress(spec.steps, enabled=progress, stream=stream or sys.stderr)
    # Ray starts (seconds of waiting on its processes) while a thread imports the job
    # and checks its data; bad data is still exit 2, once Ray has stopped again.
    prepared = _in_thread(_prepare, spec, out)
    try:
        runtime = ray_runtime.start(address=spec.cluster.address, dashboard=spec.cluster.dashboard,
                                    py_modules=spec.worker_sources())
    except BaseException:
        try:
            prepared().log.flush()  # single files, as after any run that ends
        except BaseException:  # noqa: BLE001  (Ray's failure is the one to tell)
            pass
        raise
    stop.take()  # ray.init installs its own SIGTERM handler
    try:
        job = prepared()
    except BaseException:
        runtime.shutdown()  # nothing left running after bad data
        raise
    from orchestrator import checkpoint
    from orchestrator.controller import Controller, ControllerOptions
    from cluster.keeper import start_keeper

    folder, log, ckpt_meta, payload = job.folder, job.log, job.ckpt_meta, job.payload
    resume_url, resumed_step = job.resume_url, job.resumed_step
    log.event("phase:ray_start", seconds=runtime.start_s, detail=runtime.address)
    try:
        cpus = _cpus_per_worker(spec, runtime.total_cpus, runtime.embedded)
        if not runtime.embedded:  # before a placement group waits for what will never come
            ray_runtime.check_placeable(workers=spec.workers, cpus_per_worker=cpus, nodes=ray_runtime.node_resources(),
                                        gpus_per_worker=spec.cluster.gpus_per_worker)
        if runtime.embedded and spec.workers > runtime.total_cpus:
            out.note(f"note: {spec.workers} workers on {runtime.total_cpus:g} CPUs: {cpus:.2g} CPU and 1 thread "
                     f"each (a simulated cluster on one machine)")
        out.note(f"run {spec.run_id}: {spec.workers} x {spec.strategy.name} on {spec.workload.name}, "
                 f"{spec.steps} steps, global batch {spec.global_batch} -> {folder.url}")
        keeper = start_keeper() if spec.snapshots_needed else None  # no snapshots, no process to hold them
        phases: list = []
        make_group = lambda: RayGroup(spec, cpus=cpus, keeper=keeper, payload=payload,  # noqa: E731
                                      run_url=folder.url, ckpt_meta=ckpt_meta, phases=phases)

        def newest_checkpoint(before=None):
            try:
                url, meta, _ = checkpoint.resolve("latest", run_url=folder.url, fmt=ckpt_meta["format"],
                                                  shapes=ckpt_meta["shapes"], before=before)
                return meta["step"], url
            except checkpoint.CheckpointError:
                return None

        controller = Controller(
            spec, make_group, log, out, start_step=resumed_step,
            first=Attempt(world=spec.workers, resume_url=resume_url, injections=list(spec.inject)),
            options=ControllerOptions(
                grace_s=FAILURE_GRACE_S, newest_checkpoint=newest_checkpoint,
                forget=lambda handles: keeper and keeper.drop.remote(handles),
                first_step_at=lambda step: log.event("phase:first_step", step=step,
                                                     seconds=time.perf_counter() - t_start)),
        )
        try:
            final_loss, last_checkpoint = controller.run()
        finally:
            if keeper is not None:
                ray.kill(keeper)  # the snapshots it owns go with it
            for phase, secs in phases:
                log.event(f"phase:{phase.removesuffix('_s')}", seconds=secs)
    except KeyboardInterrupt:
        log.event("interrupted", detail=signal.Signals(stop.received).name if stop.received else "Ctrl-C")
        raise
    finally:
        out.close()
        try:
            log.flush()  # single files again, before a teardown that may take seconds
        finally:
            runtime.shutdown()
    wall = time.perf_counter() - t_start
    log.event("finished", seconds=wall)
    log.flush()
    return RunResult(run_id=spec.run_id, url=folder.url, steps=spec.steps, wall_s=wall, final_loss=final_loss,
                     checkpoint=last_checkpoint or (checkpoint.committed(folder.url) or [(0, None)])[0][1])
