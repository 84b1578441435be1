"""The FSDP part, and ``fsdp``: torch FSDP2 (``fully_shard``) on every block and on the root.

Parameters, gradients and optimizer state are sharded over the mesh's
``fsdp`` ranks; each block's parameters are all-gathered for its forward (and
again for backward when ``reshard_after_forward``) and its gradients
reduce-scattered (averaged over the shard group). Both collectives go through
``cluster.Comm`` (FSDP2's custom-collective hooks), and so does the
replicas' all-reduce of the reduced shards when FSDP is composed with data
parallelism (HSDP, FSDP2's all-reduce hook): bytes and time are accounted like
every other strategy's.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable, Literal

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from cluster import Comm
from strategies.parallel import Parallel, Plan
from strategies.registry import register_strategy

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule


class FSDPOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reshard_after_forward: bool = Field(
        True, description="free gathered parameters after forward and gather again for backward (less memory; "
        "composed with a pipeline, parameters stay gathered for the step's micro-batches)")
    mixed_precision: Literal["none", "bf16"] = Field(
        "none", description="bf16: compute and reduce in bfloat16, keep fp32 master weights (where supported)")
    cpu_offload: bool = Field(False, description="keep sharded parameters and optimizer state in CPU memory")


@functools.cache
def _accounted_collectives() -> tuple[type, type]:
    """FSDP2's all-gather and reduce-scatter, through ``Comm`` (so they are accounted).
    Defined on first use: torch's FSDP2 imports DTensor, about 1 s in every worker
    process, which a run without FSDP does not need."""
    from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter

    class AccountedAllGather(AllGather):
        def __init__(self, comm: Comm):
            self.comm = comm

        def allocate(self, size, *, dtype, device):
            return torch.empty(*size, dtype=dtype, device=device)

        def __call__(self, output_tensor, input_tensor, group, async_op=False):
            return self.comm.all_gather_single(output_tensor, input_tensor, async_op=async_op)

    class AccountedReduceScatter(ReduceScatter):
        def __init__(self, comm: Comm):
            self.comm = comm

        def allocate(self, size, *, dtype, device):
            return torch.empty(*size, dtype=dtype, device=device)

        def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
            return self.comm.reduce_scatter_single(output_tensor, input_tensor, op=op, async_op=async_op)

    return AccountedAllGather, AccountedReduceScatter


def apply_fsdp(units: list[nn.Module], roots: list[nn.Module], comm: Comm, options: FSDPOptions, *,
               device: torch.device, all_reduce: Callable[[torch.Tensor], None] | None = None,
               reshard_after_forward: bool | None = None) -> list[FSDPModule]:
    """``fully_shard`` every unit (a block with parameters), then every root (a
    model, or a pipeline stage, over those units) on ``comm``'s ranks. ``all_reduce``
    gets each reduce-scattered gradient shard (HSDP: average it over the replicas)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    gather, scatter = _accounted_collectives()
    group = comm.group if comm.group is not None else dist.group.WORLD
    mesh = DeviceMesh.from_group(group, device.type)
    kw = {"mesh": mesh, "reshard_after_forward": options.reshard_after_forward
          if reshard_after_forward is None else reshard_after_forward}
    if options.mixed_precision == "bf16":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
    kw["offload_policy"] = CPUOffloadPolicy() if options.cpu_offload else OffloadPolicy()
    sharded = [fully_shard(u, **kw) for u in units] + [fully_shard(r, **kw) for r in roots]
    for unit in sharded:
        if unit._get_fsdp_state()._fsdp_param_groups:  # a root may own no parameters
            unit.set_custom_all_gather(gather(comm))
            unit.set_custom_reduce_scatter(scatter(comm))
            if all_reduce is not None:
                unit.set_all_reduce_hook(all_reduce)
    return sharded


def units_of(module: nn.Module) -> list[nn.Module]:
    """The blocks FSDP shards one by one: the children that hold parameters."""
    return [b for b in module.children() if any(True for _ in b.parameters())]


@register_strategy("fsdp")
class FSDP(Parallel):
    """Fully sharded data parallel (torch FSDP2): parameters, gradients and optimizer state sharded per block."""

    Options = FSDPOptions
    uneven_batches = True
    heal = "restore"  # the lost rank's shards are held by no peer: every rank restores the snapshot

    @classmethod
    def plan(cls, options: FSDPOptions, workers: int) -> Plan:
        return Plan.of(workers, fsdp=workers, fsdp_options=options)
