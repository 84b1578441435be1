"""The per-rank training loop; runs inside a worker (a Ray actor, or a test process)."""
from __future__ import annotations

import resource
import time
from typing import Callable

import torch

from cluster import Comm
from cluster.dist import destroy_process_group, init_process_group, pick_device
from orchestrator.checkpoint import Checkpointer, restore
from orchestrator.config import JobSpec
from strategies import STRATEGIES, Strategy, StrategyContext
from workloads import WORKLOADS, ShardedLoader, Workload, split_micro
from workloads.plugins import is_ref


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class RankTrainer:
    """Builds one rank's strategy and loader and runs steps. Usable without Ray:
    tests drive it in plain processes against the single-process reference."""

    def __init__(self, spec: JobSpec, *, rank: int, world: int, device: torch.device,
                 workload: Workload | None = None, strategy_cls: type[Strategy] | None = None):
        self.spec, self.rank, self.world, self.device = spec, rank, world, device
        self.workload = workload if workload is not None else spec.build_workload()
        strategy_cls = strategy_cls or spec.strategy_cls()
        self.comm = Comm()
        torch.manual_seed(spec.seed)  # same initial weights on every rank
        self.strategy: Strategy = strategy_cls(strategy_cls.Options(**spec.strategy.options))
        self.strategy.setup(
            self.workload,
            StrategyContext(rank=rank, world=world, device=device, comm=self.comm, optim=spec.optim, total_steps=spec.steps),
        )
        replica, replicas = self.strategy.data_shard()
        self.loader = ShardedLoader(
            self.workload.source(), rank=replica, world=replicas, global_batch=spec.global_batch, seed=spec.seed
        )
        self.tokens_per_sample = self.workload.tokens_per_sample()
        self.step = 0

    def train_step(self) -> dict:
        """One optimizer step; returns this rank's metrics row."""
        t0 = time.perf_counter()
        batch = self.loader.next_batch()
        t_data = time.perf_counter() - t0
        self.comm.take_stats()  # drop anything outside the step (e.g. DDP's initial broadcast)
        stats = self.strategy.train_step(split_micro(batch, self.spec.grad_accum))
        step_time = time.perf_counter() - t0
        comm = self.comm.take_stats()
        idle = t_data + comm.wait_s
        self.step += 1
        return {
            "step": self.step,
            "rank": self.rank,
            "loss": stats.loss,
            "step_time_s": step_time,
            "compute_s": max(0.0, step_time - idle),
            "comm_s": comm.comm_s,
            "idle_s": idle,
            "bytes_sent": comm.bytes_sent,
            "bytes_received": comm.bytes_received,
            "samples": stats.samples,
            "tokens": stats.samples * self.tokens_per_sample,  # 0 on ranks that do not report samples
            "peak_mem_bytes": peak_memory_bytes(self.device),
            "wall_time": time.time(),
            **stats.extra,
            **self.strategy.memory_bytes(),
        }

    def run(self, report: Callable[[dict], None], checkpointer: Checkpointer | None = None) -> None:
        while self.step < self.spec.steps:
            report(self.train_step())
            if checkpointer is not None and checkpointer.due(self.step):
                t0 = time.perf_counter()
                url = checkpointer.save(self)
                if self.rank == 0:
                    report({"event": "checkpoint", "rank": 0, "step": self.step,
                            "seconds": time.perf_counter() - t0, "detail": url})


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


def train_worker(ctx, spec: JobSpec, payload: bytes, run_url: str, resume_url: str | None,
                 ckpt_meta: dict) -> dict:
    """Entry point shipped to every Ray worker (ctx: cluster.WorkerContext).

    ``resume_url`` is a checkpoint the driver has already checked; ``ckpt_meta``
    describes this job in every checkpoint it writes."""
    workload, strategy_cls = unpack_job(spec, payload)
    t0 = time.perf_counter()
    device = pick_device(ctx.local_rank) if spec.cluster.gpus_per_worker > 0 else torch.device("cpu")
    # always, even for one worker: ddp, fsdp and zero* need a process group at world size 1 too
    init_process_group(
        rank=ctx.rank, world=ctx.world, init_method=ctx.init_method,
        device=device, timeout_s=spec.cluster.collective_timeout_s,
    )
    t1 = time.perf_counter()
    try:
        trainer = RankTrainer(spec, rank=ctx.rank, world=ctx.world, device=device,
                              workload=workload, strategy_cls=strategy_cls)
        if resume_url:
            restore(trainer, resume_url)
        t2 = time.perf_counter()
        ctx.report({"event": "phase:worker_setup", "rank": ctx.rank, "step": trainer.step, "seconds": t2 - t1,
                    "detail": f"rendezvous {t1 - t0:.2f}s" + (f", restored {resume_url}" if resume_url else "")})
        checkpointer = Checkpointer(run_url, every=spec.checkpoint_every, keep=spec.keep_checkpoints,
                                    rank=ctx.rank, world=ctx.world, meta=ckpt_meta)
        trainer.run(ctx.report, checkpointer)
        return {"rank": ctx.rank, "steps": trainer.step}
    finally:
        destroy_process_group()
