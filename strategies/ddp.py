"""The data-parallel part, and ``ddp``.

Gradients are summed over the mesh's gradient group and divided by its data
axes (``Plan.grad_axes``, ``Plan.divide``), in one of two ways:

- a whole model per rank: torch ``DistributedDataParallel`` over that group,
  buckets all-reduced as backward produces them, through a comm hook that
  routes them through ``cluster.Comm`` (the compression strategies replace the
  hook);
- a pipeline stage: ``GradAverage``, one flat all-reduce of the stage's
  gradients launched when its last weight gradient is done (DDP cannot wrap a
  stage whose backward is split into B and W) and finished before the step.

(FSDP's replicas are averaged by FSDP2's all-reduce hook; see ``strategies.fsdp``.)
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cluster import Comm
from strategies.parallel import Parallel, Plan
from strategies.registry import register_strategy


class DDPOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bucket_mb: float = Field(25.0, gt=0, description="gradient bucket size in MiB (DDP bucket_cap_mb)")
    static_graph: bool = Field(False, description="tell DDP the graph never changes (enables some optimisations)")
    sync_bn: bool = Field(
        True, description="batch norm over the global batch (matches single); false: per-rank statistics, "
        "running stats broadcast from rank 0 (torch DDP's default)"
    )


# torch >= 2.12 renamed DDP's per-forward buffer broadcast.
_BUFFER_SYNC_ARG = ("forward_sync_buffers" if "forward_sync_buffers" in
                    inspect.signature(DistributedDataParallel.__init__).parameters else "broadcast_buffers")


def sum_then_divide_hook(state: tuple[Comm, int], bucket):  # DDP rejects a string annotation on `bucket`
    """DDP's averaging all-reduce, through our accounting layer: the sum over the
    group (sequence shards' gradients add up) divided by its data-parallel ranks."""
    comm, divide = state
    return comm.all_reduce_async(bucket.buffer().div_(divide))


def replicate(module: nn.Module, comm: Comm, options: DDPOptions, *, device: torch.device,
              register: Callable[[DistributedDataParallel], None], sync: bool = True) -> DistributedDataParallel:
    """``module`` under torch DDP over ``comm``'s ranks; ``register`` installs the comm hook.
    DDP broadcasts rank 0's parameters and buffers at construction (``sync``): replicas
    start equal; without, the caller loads the same state on every rank. With
    synchronized batch norm the running stats stay equal without the per-step buffer
    broadcast."""
    from strategies.batchnorm import has_sync_batchnorm

    ddp = DistributedDataParallel(
        module,
        process_group=comm.group,
        device_ids=[device.index] if device.type == "cuda" else None,
        bucket_cap_mb=options.bucket_mb,
        static_graph=options.static_graph,
        init_sync=sync,
        **{_BUFFER_SYNC_ARG: not has_sync_batchnorm(module)},
    )
    register(ddp)
    return ddp


class GradAverage:
    """One flat all-reduce of ``module``'s gradients over ``comm``, launched now,
    divided by ``divide`` and written back by ``finish``."""

    def __init__(self, module: nn.Module, comm: Comm, divide: int):
        self.params = [q for q in module.parameters() if q.requires_grad]
        self.divide = divide
        self.flat = torch.cat([(q.grad if q.grad is not None else torch.zeros_like(q)).reshape(-1)
                               for q in self.params])
        self.work = comm.all_reduce(self.flat, async_op=True)

    def finish(self) -> None:
        self.work.wait()
        self.flat /= self.divide
        offset = 0
        for q in self.params:
            q.grad = self.flat[offset: offset + q.numel()].view_as(q).clone()
            offset += q.numel()


@register_strategy("ddp")
class DDP(Parallel):
    """Data parallel: a replica per rank, gradients all-reduced in buckets overlapped with backward."""

    Options = DDPOptions
    uneven_batches = True
    heal = "peer"  # replicas: a survivor holds the whole state, and the update follows every all-reduce

    @classmethod
    def plan(cls, options: DDPOptions, workers: int) -> Plan:
        return Plan.of(workers, dp=workers, ddp_options=options)
