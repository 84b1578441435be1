"""The same gpt-tiny DDP job written the plain way, for torchrun and Ray Train.

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
                 scaling_config=ScalingConfig(num_workers=workers, use_gpu=False)).fit()
    ray.shutdown()


if __name__ == "__main__":
    torchrun_main()
