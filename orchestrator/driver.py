"""run(spec): validate, start Ray and the worker group, supervise, write the run folder."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import pandas as pd

from orchestrator import checkpoint
from orchestrator.config import ConfigError, JobSpec
from orchestrator.metrics import MetricsLog, samples_mean
from orchestrator.progress import Progress
from orchestrator.storage import RunFolder


# How often the driver collects reports. ray.wait returns at once when a rank ends
# or fails, so this bounds only progress-line latency; on a small machine every
# poll takes CPU from the workers.
POLL_S = 0.25


class RunFailed(RuntimeError):
    """The job started but did not finish (exit code 1)."""


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
        return RunFolder.from_url(self.url).read_table("metrics.parquet")

    @property
    def events(self) -> pd.DataFrame:
        return RunFolder.from_url(self.url).read_table("events.parquet")


def _cpus_per_worker(spec: JobSpec, total_cpus: float, embedded: bool) -> float:
    if spec.cluster.cpus_per_worker:
        return spec.cluster.cpus_per_worker
    return min(1.0, total_cpus / spec.workers) if embedded else 1.0


FAILURE_GRACE_S = 3.0

# Messages of errors that are the echo of another rank's death, not a cause.
_PEER_FAILURE = ("connection closed by peer", "connection reset", "broken pipe", "remote worker crashing",
                 "gloo", "nccl", "timed out", "socket")


def _failures(done: list, pending: dict) -> list[tuple[int, str]]:
    """(rank, message) for each finished ref that raised; pops every finished ref."""
    import ray

    out = []
    for ref in done:
        rank = pending.pop(ref)
        try:
            ray.get(ref)
        except Exception as e:  # RayTaskError, RayActorError
            out.append((rank, _failure_message(rank, e)))
    return out


def _root_cause(failures: list[tuple[int, str]]) -> tuple[int, str]:
    for rank, msg in failures:
        if not any(p in msg.lower() for p in _PEER_FAILURE):
            return rank, msg
    return failures[0]


def _failure_message(rank: int, err: BaseException) -> str:
    import ray

    cause = getattr(err, "cause", None)
    if isinstance(err, ray.exceptions.RayTaskError) and cause is not None:
        return f"rank {rank} failed: {type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
    if isinstance(err, ray.exceptions.RayActorError):
        return f"rank {rank} failed: its worker process died ({type(err).__name__})"
    return f"rank {rank} failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def run(spec: JobSpec, *, progress: bool = True, stream=None) -> RunResult:
    """Run a job to the end. Raises ConfigError for bad input (before any worker
    starts) and RunFailed if a worker fails; the run folder keeps what was written."""
    from cluster import runtime as ray_runtime
    from cluster.worker_group import WorkerGroup
    from orchestrator.trainer import pack_job, train_worker

    t_start = time.perf_counter()
    if spec.cluster.address:  # fail fast, before anything is written
        ray_runtime.check_reachable(spec.cluster.address)
    out = Progress(spec.steps, enabled=progress, stream=stream or sys.stderr)
    try:
        t0 = time.perf_counter()
        workload = spec.build_workload()
        n_samples = len(workload.source())  # creates or checks the data before any worker
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None
    if spec.global_batch > n_samples:
        raise ConfigError(f"batch_size={spec.global_batch}: larger than the dataset ({n_samples} samples)")
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
                     strategy=spec.strategy.name, scenario=spec.scenario)
    if resume_url:
        log.keep_history(up_to_step=resumed_step)  # rows after the checkpoint are redone
        for note in notes:
            out.note(f"note: {note}")
            log.event("resume_fallback", detail=note)
        out.note(f"resuming from {resume_url} (step {resumed_step})")
        log.event("resume", step=resumed_step, detail=resume_url)
    log.event("phase:data", seconds=data_s, detail=f"{n_samples} samples")

    runtime = ray_runtime.start(address=spec.cluster.address, dashboard=spec.cluster.dashboard,
                                py_modules=spec.worker_sources())
    log.event("phase:ray_start", seconds=runtime.start_s, detail=runtime.address)
    group = None
    try:
        cpus = _cpus_per_worker(spec, runtime.total_cpus, runtime.embedded)
        if not runtime.embedded and spec.workers * cpus > runtime.total_cpus:
            raise ConfigError(
                f"workers={spec.workers}: needs {spec.workers * cpus:g} CPUs at cluster.cpus_per_worker={cpus:g}, "
                f"the cluster has {runtime.total_cpus:g}"
            )
        if runtime.embedded and spec.workers > runtime.total_cpus:
            out.note(f"note: {spec.workers} workers on {runtime.total_cpus:g} CPUs: {cpus:.2g} CPU and 1 thread "
                     f"each (a simulated cluster on one machine)")
        group = WorkerGroup(
            spec.workers, cpus_per_worker=cpus, gpus_per_worker=spec.cluster.gpus_per_worker,
            placement=spec.cluster.placement, placement_timeout_s=spec.cluster.placement_timeout_s,
        )
        group.start()
        for phase, secs in group.phases.items():
            log.event(f"phase:{phase.removesuffix('_s')}", seconds=secs)
        out.note(f"run {spec.run_id}: {spec.workers} x {spec.strategy.name} on {spec.workload.name}, "
                 f"{spec.steps} steps, global batch {spec.global_batch} -> {folder.url}")
        refs = group.run_async(train_worker, spec, pack_job(workload, strategy_cls), folder.url, resume_url, ckpt_meta)
        final_loss, last_checkpoint = _supervise(spec, refs, group, log, out, t_start, first_step=resumed_step + 1)
    except KeyboardInterrupt:
        log.event("interrupted", detail="Ctrl-C")
        raise
    finally:
        out.close()
        if group is not None:
            group.shutdown()
        runtime.shutdown()
        log.flush()
    wall = time.perf_counter() - t_start
    log.event("finished", seconds=wall)
    log.flush()
    return RunResult(run_id=spec.run_id, url=folder.url, steps=spec.steps, wall_s=wall, final_loss=final_loss,
                     checkpoint=last_checkpoint or (checkpoint.committed(folder.url) or [(0, None)])[0][1])


def _supervise(spec: JobSpec, refs: list, group, log: MetricsLog, out: Progress, t_start: float,
               first_step: int) -> tuple[float, str | None]:
    """Collect reports until every rank returns; the first failure ends the run.
    Returns the final loss and the newest checkpoint written."""
    import ray

    pending = dict(zip(refs, range(spec.workers)))
    per_step: dict[int, list[dict]] = {}
    final_loss, last_checkpoint = float("nan"), None

    def absorb(rows: list[dict]) -> None:
        nonlocal final_loss, last_checkpoint
        for row in rows:
            if "event" in row:
                log.event(row["event"], rank=row["rank"], step=row.get("step", -1),
                          seconds=row.get("seconds", float("nan")), detail=row.get("detail", ""))
                if row["event"] == "checkpoint":
                    last_checkpoint = row["detail"]
                continue
            log.add_row(row)
            got = per_step.setdefault(row["step"], [])
            got.append(row)
            if len(got) == spec.workers:  # every rank finished this step
                step = row["step"]
                final_loss = samples_mean([r["loss"] for r in got], [r["samples"] for r in got])
                if step == first_step:
                    log.event("phase:first_step", step=step, seconds=time.perf_counter() - t_start)
                out.update(step, final_loss, tokens=sum(r["tokens"] for r in got),
                           samples=sum(r["samples"] for r in got), ended=max(r["wall_time"] for r in got))
                del per_step[step]

    while pending:
        done, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
        failures = _failures(done, pending)
        if failures:
            # A rank's error makes its peers' collectives fail a moment later; give
            # them a moment to report so the root cause, not the echo, is named.
            if pending:
                more, _ = ray.wait(list(pending), num_returns=len(pending), timeout=FAILURE_GRACE_S)
                failures += _failures(more, pending)
            absorb(group.poll())
            rank, msg = _root_cause(failures)
            for r, m in failures:
                log.event("failed", rank=r, detail=m)
            raise RunFailed(msg)
        absorb(group.poll())
        log.maybe_flush()
    absorb(group.poll())
    return final_loss, last_checkpoint
