"""fsdp: torch FSDP2 (``fully_shard``) on every block and on the root.

Parameters, gradients and optimizer state are sharded over ranks; each block's
parameters are all-gathered for its forward (and again for backward when
``reshard_after_forward``) and its gradients reduce-scattered. Both collectives
go through ``cluster.Comm`` (FSDP2's custom-collective hooks), so bytes and
time are accounted like every other strategy's.
"""
from __future__ import annotations

import math

from contextlib import contextmanager
from typing import Literal

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter

from cluster import Comm
from strategies.base import StepStats, Strategy, StrategyContext, run_micro_batches
from strategies.batchnorm import convert_sync_batchnorm, has_batchnorm
from strategies.checkpoint import held_bytes, load_state, save_state
from strategies.optim import build_optimizer
from strategies.registry import register_strategy
from workloads import Batch, Workload


class FSDPOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reshard_after_forward: bool = Field(
        True, description="free gathered parameters after forward and gather again for backward (less memory)")
    mixed_precision: Literal["none", "bf16"] = Field(
        "none", description="bf16: compute and reduce in bfloat16, keep fp32 master weights (where supported)")
    cpu_offload: bool = Field(False, description="keep sharded parameters and optimizer state in CPU memory")


class _AccountedAllGather(AllGather):
    def __init__(self, comm: Comm):
        self.comm = comm

    def allocate(self, size, *, dtype, device):
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, async_op=False):
        return self.comm.all_gather_single(output_tensor, input_tensor, async_op=async_op)


class _AccountedReduceScatter(ReduceScatter):
    def __init__(self, comm: Comm):
        self.comm = comm

    def allocate(self, size, *, dtype, device):
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        return self.comm.reduce_scatter_single(output_tensor, input_tensor, op=op, async_op=async_op)


@register_strategy("fsdp")
class FSDP(Strategy):
    """Fully sharded data parallel (torch FSDP2): parameters, gradients and optimizer state sharded per block."""

    uneven_batches = True

    Options = FSDPOptions

    def setup(self, workload: Workload, ctx: StrategyContext) -> None:
        self.workload, self.ctx = workload, ctx
        o = self.options
        model = workload.model().to(ctx.device)
        if has_batchnorm(model):
            convert_sync_batchnorm(model, ctx.comm)  # statistics over the global batch, as in ddp
        mesh = init_device_mesh(ctx.device.type, (ctx.world,))
        kw = {"mesh": mesh, "reshard_after_forward": o.reshard_after_forward}
        if o.mixed_precision == "bf16":
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
        kw["offload_policy"] = CPUOffloadPolicy() if o.cpu_offload else OffloadPolicy()
        units = [b for b in model if any(True for _ in b.parameters())]
        for block in units:
            fully_shard(block, **kw)
        fully_shard(model, **kw)
        for unit in [*units, model]:
            if unit._get_fsdp_state()._fsdp_param_groups:  # the root may own no parameters
                unit.set_custom_all_gather(_AccountedAllGather(ctx.comm))
                unit.set_custom_reduce_scatter(_AccountedReduceScatter(ctx.comm))
        self.module = self.model = model
        self.opt, self.sched = build_optimizer(model, ctx.optim, ctx.total_steps)
        self._held: dict[str, int] | None = None

    @contextmanager
    def _no_sync(self):
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def train_step(self, micro_batches: list[Batch]) -> StepStats:
        loss, extra, _ = run_micro_batches(self.model, self.workload, micro_batches, device=self.ctx.device,
                                           no_sync=self._no_sync, weight=self.grad_weight)
        if self._held is None and self.opt.state:  # second step: gradients and optimizer state both exist
            self._held = held_bytes(self.model, self.opt)
        extra["lr"] = self.opt.param_groups[0]["lr"]
        clip = self.ctx.optim.grad_clip if self.ctx.optim.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        extra["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if math.isfinite(extra["grad_norm"]):  # a NaN/Inf loss skips the update (see optim.clip_and_step)
            self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return StepStats(loss=loss, samples=sum(mb[0].shape[0] for mb in micro_batches), extra=extra)

    def save_checkpoint(self, url: str) -> None:
        save_state(url, self.model, self.opt, {"sched": self.sched.state_dict()})

    def load_checkpoint(self, url: str) -> None:
        self.sched.load_state_dict(load_state(url, self.model, self.opt, {"sched": self.sched.state_dict()})["sched"])

    def memory_bytes(self) -> dict[str, int]:
        return self._held or {}  # measured at the second step
