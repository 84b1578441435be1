"""The same gpt-tiny DDP job written the plain way, for torchrun, Ray Train and plain Ray actors.

Same model, data stream, optimizer and batch as `polytrain run --strategy ddp`,
with torch DDP's default all-reduce; rank 0 writes its step times as JSON.
"""
from __future__ import annotations

import json
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from strategies.base import OptimConfig
from strategies.optim import build_optimizer, clip_and_step
from workloads import WORKLOADS, ShardedLoader


def ddp_loop(*, rank: int, world: int, steps: int, out: str, launched: float) -> None:
    torch.set_num_threads(1)
    workload = WORKLOADS.get("gpt-tiny")()
    torch.manual_seed(0)
    model = DistributedDataParallel(workload.model())
    cfg = OptimConfig()
    opt, sched = build_optimizer(model, cfg, steps)
    loader = ShardedLoader(workload.train_source(), rank=rank, world=world, global_batch=8 * world, seed=0)
    times, first = [], None
    for _ in range(steps):
        t0 = time.perf_counter()
        x, y = loader.next_batch()
        loss = workload.loss(model(x), (x, y))
        loss.backward()
        clip_and_step(model, opt, sched, cfg)
        loss.item()
        times.append(time.perf_counter() - t0)
        first = first or time.time()
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"step_times": times, "first_step_wall": first, "launched": launched}, f)


def torchrun_main() -> None:
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--launched", type=float, required=True)
    a = p.parse_args()
    dist.init_process_group("gloo")
    ddp_loop(rank=dist.get_rank(), world=dist.get_world_size(), steps=a.steps, out=a.out, launched=a.launched)
    dist.destroy_process_group()


def ray_train_main(steps: int, out: str, launched: float, workers: int) -> None:
    import ray
    from ray.train import ScalingConfig, get_context
    from ray.train.torch import TorchTrainer

    def loop(config):
        ctx = get_context()
        ddp_loop(rank=ctx.get_world_rank(), world=ctx.get_world_size(), **config)

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    TorchTrainer(loop, train_loop_config={"steps": steps, "out": out, "launched": launched},
                 scaling_config=ScalingConfig(num_workers=workers, use_gpu=False,  # more workers than cores fit
                                              resources_per_worker={"CPU": min(1.0, os.cpu_count() / workers)})).fit()
    ray.shutdown()


def ray_actors_main(steps: int, out: str, launched: float, workers: int, child: bool) -> None:
    """The loop in plain Ray actors, one per rank (no Ray Train, no polytrain): what a
    Ray worker process costs a step. With ``child``, each actor runs it in a child
    process of its own (torchrun's kind of process, under the actor)."""
    import subprocess
    import sys

    import ray

    from cluster.dist import free_port

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(workers)}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    @ray.remote(num_cpus=os.cpu_count() / workers)
    class Rank:
        def run(self, rank: int) -> None:
            mine = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            if child:
                subprocess.run([sys.executable, "-m", "benchmarks._baseline", "--steps", str(steps), "--out", out,
                                "--launched", repr(launched)], check=True, cwd=root,
                               env={**os.environ, **mine, "PYTHONPATH": root})
                return
            os.environ.update(mine)
            dist.init_process_group("gloo")
            ddp_loop(rank=rank, world=workers, steps=steps, out=out, launched=launched)
            dist.destroy_process_group()

    ranks = [Rank.remote() for _ in range(workers)]
    ray.get([a.run.remote(r) for r, a in enumerate(ranks)])
    ray.shutdown()


if __name__ == "__main__":
    torchrun_main()


def trainer_steps(rank: int, world: int, spec) -> list[dict]:
    """``spec``'s steps on this rank of a process group already formed (``tests.ranks``):
    each step's time and the process's CPU seconds in it (gloo's threads included)."""
    import time

    import torch

    from orchestrator.trainer import RankTrainer

    trainer = RankTrainer(spec, rank=rank, world=world, device=torch.device("cpu"))
    rows = []
    for _ in range(spec.steps):
        cpu = time.process_time()
        row = trainer.train_step()
        rows.append({"step": row["step"], "rank": rank, "step_time_s": row["step_time_s"],
                     "cpu_s": time.process_time() - cpu})
    return rows
