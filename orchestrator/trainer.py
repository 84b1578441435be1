"""The per-rank training loop; runs inside a worker (a Ray actor, or a test process)."""
from __future__ import annotations

import resource
import time
from typing import Callable

import torch

from cluster import Comm
from cluster.dist import destroy_process_group, init_process_group, pick_device
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
        self.loader = ShardedLoader(
            self.workload.source(), rank=rank, world=world, global_batch=spec.global_batch, seed=spec.seed
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
            "tokens": stats.samples * self.tokens_per_sample,
            "peak_mem_bytes": peak_memory_bytes(self.device),
            "wall_time": time.time(),
            **stats.extra,
        }

    def run(self, report: Callable[[dict], None]) -> None:
        while self.step < self.spec.steps:
            report(self.train_step())


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


def train_worker(ctx, spec: JobSpec, payload: bytes) -> dict:
    """Entry point shipped to every Ray worker (ctx: cluster.WorkerContext)."""
    workload, strategy_cls = unpack_job(spec, payload)
    t0 = time.perf_counter()
    device = pick_device(ctx.local_rank) if spec.cluster.gpus_per_worker > 0 else torch.device("cpu")
    if ctx.world > 1:
        init_process_group(
            rank=ctx.rank, world=ctx.world, init_method=ctx.init_method,
            device=device, timeout_s=spec.cluster.collective_timeout_s,
        )
    t1 = time.perf_counter()
    try:
        trainer = RankTrainer(spec, rank=ctx.rank, world=ctx.world, device=device,
                              workload=workload, strategy_cls=strategy_cls)
        t2 = time.perf_counter()
        ctx.report({"event": "worker_ready", "rank": ctx.rank, "rendezvous_s": t1 - t0, "setup_s": t2 - t1})
        trainer.run(ctx.report)
        return {"rank": ctx.rank, "steps": trainer.step}
    finally:
        destroy_process_group()
