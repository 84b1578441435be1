"""sequence: each sequence split over ulysses x ring ranks (USP), times data parallelism.

Rank layout: ``rank = dp_index * sp + sp_rank`` with ``sp = ulysses * ring`` and
``sp_rank = ring_index * ulysses + ulysses_index`` (see ``layout``): a sequence
group is sp neighbouring ranks, its Ulysses groups neighbours within it. Every
rank holds the whole model; the ranks of a sequence group read the same samples
and each runs the model on its tokens (``SequenceLayout.positions``), with the
workload's attention replaced by the distributed one. Each rank's loss is its
tokens' share of the full-sequence mean, so the shares add up to it exactly;
gradients are summed over the sequence group and averaged over replicas in one
all-reduce over all ranks (DDP, through ``Comm``).
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch.nn.parallel import DistributedDataParallel

from cluster import Comm
from strategies.base import StepStats
from strategies.checkpoint import held_bytes
from strategies.optim import clip_and_step
from strategies.registry import register_strategy
from strategies.sequence.attention import SequenceParallelAttention, Traffic
from strategies.sequence.kernels import pick_kernel
from strategies.sequence.layout import SequenceLayout
from strategies.single import Replicated
from workloads import Batch, Workload


class SequenceOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ulysses: int = Field(1, ge=1, description="Ulysses degree u: all-to-all over heads (must divide the heads)")
    ring: int | None = Field(
        None, ge=1, description="ring degree r: K/V blocks rotate over r ranks; default: workers / ulysses "
        "(one sequence group, no data parallelism)")
    layout: Literal["contiguous", "zigzag"] = Field(
        "zigzag", description="zigzag: each ring rank holds an early and a late chunk (balanced causal work; "
        "seq_len divisible by 2 x u x r); contiguous: one run per rank (seq_len divisible by u x r)")
    kernel: Literal["auto", "flash", "math"] = Field(
        "auto", description="block attention: flash (torch's fused CPU kernel), math (matmuls, any device); "
        "auto: flash on CPU")
    bucket_mb: float = Field(25.0, gt=0, description="gradient all-reduce bucket size in MiB (DDP bucket_cap_mb)")


def degrees(options: SequenceOptions, workers: int) -> tuple[int, int]:
    """(ulysses, ring) with the ring's default resolved."""
    u = options.ulysses
    return u, options.ring if options.ring is not None else max(1, workers // u)


def job_layout(options: SequenceOptions, *, workers: int, workload: Workload) -> tuple[SequenceLayout, int]:
    """(layout of one sequence group, data-parallel degree), or a one-line ValueError."""
    u, r = degrees(options, workers)
    if workers % (u * r):
        raise ValueError(f"strategy.ulysses({u}) x strategy.ring({r}) = {u * r} must divide workers={workers}")
    heads, seq_len = getattr(workload, "n_heads", None), getattr(workload, "seq_len", None)
    if not isinstance(heads, int) or not isinstance(seq_len, int):
        raise ValueError(f"strategy='sequence' needs a workload with integer n_heads and seq_len options "
                         f"(workload={workload.name!r})")
    if heads % u:
        raise ValueError(f"strategy.ulysses={u}: must divide workload.n_heads={heads}")
    return SequenceLayout(seq_len, u, r, options.layout), workers // (u * r)


def attention_is_causal(fn) -> bool:
    """Whether ``fn`` computes causal or full softmax attention (probed on random
    tensors against torch's SDPA); anything else cannot be distributed exactly."""
    q, k, v = torch.randn(3, 1, 2, 8, 4, generator=torch.Generator().manual_seed(0)).unbind(0)
    out = fn(q, k, v)
    for causal in (True, False):
        if torch.allclose(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal), atol=1e-5):
            return causal
    raise ValueError(f"the workload's attention ({getattr(fn, '__name__', fn)!r}) is neither causal nor full "
                     f"scaled-dot-product attention; strategy 'sequence' can only distribute those")


def split_groups(comm: Comm, layout: SequenceLayout, dp: int) -> tuple[Comm, Comm, Comm]:
    """(sequence group, Ulysses group, ring group) of this rank; collective."""
    u, r, sp = layout.ulysses, layout.ring, layout.size
    seq = [[d * sp + s for s in range(sp)] for d in range(dp)]
    uly = [[d * sp + i * u + j for j in range(u)] for d in range(dp) for i in range(r)]
    ring = [[d * sp + i * u + j for i in range(r)] for d in range(dp) for j in range(u)]
    return comm.split(seq), comm.split(uly), comm.split(ring)


def _sum_then_mean_over_replicas(state: tuple[Comm, int], bucket):
    """Sequence shards' gradients add up to their replica's; replicas average."""
    comm, dp = state
    return comm.all_reduce_async(bucket.buffer().div_(dp))


@register_strategy("sequence")
class SequenceParallel(Replicated):
    """Sequence parallelism (Ulysses x ring, USP) for long sequences, composed with data parallelism."""

    Options = SequenceOptions
    requires = {"attention": "needs swappable attention layers (Workload.attention_layers)"}
    uneven_batches = False  # a sequence group's ranks must see the same samples

    @classmethod
    def check_job(cls, *, workers: int, workload: Workload, options: SequenceOptions | None = None,
                  batch_size: int | None = None) -> None:
        super().check_job(workers=workers, workload=workload)
        if not callable(getattr(workload, "position_layers", None)):
            raise ValueError(f"strategy='sequence' cannot train workload={workload.name!r}: needs position_layers"
                             f"(blocks), the modules whose `positions` give the tokens' global positions")
        with torch.device("meta"):
            blocks = workload.blocks()
        for layer in workload.attention_layers(blocks):
            attention_is_causal(layer.attention)
        if options is not None:
            job_layout(options, workers=workers, workload=workload)

    @classmethod
    def replicas(cls, *, workers: int, options: SequenceOptions) -> int:
        u, r = degrees(options, workers)
        return max(1, workers // (u * r))

    def wrap(self, module):
        ctx = self.ctx
        self.layout, self.dp = job_layout(self.options, workers=ctx.world, workload=self.workload)
        self.dp_index, self.sp_rank = divmod(ctx.rank, self.layout.size)
        self.sp_comm, ulysses, ring = split_groups(ctx.comm, self.layout, self.dp)
        self.positions = self.layout.positions(self.sp_rank)
        blocks = list(module)
        for layer in self.workload.position_layers(blocks):
            layer.positions = self.positions.to(ctx.device)
        kernel = pick_kernel(self.options.kernel, ctx.device)
        self.traffic = Traffic()
        self.attention_layers = self.workload.attention_layers(blocks)
        for layer in self.attention_layers:
            layer.attention = SequenceParallelAttention(
                self.layout, self.sp_rank, ulysses=ulysses, ring=ring, causal=attention_is_causal(layer.attention),
                kernel=kernel, traffic=self.traffic)
        ddp = DistributedDataParallel(
            module, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
            bucket_cap_mb=self.options.bucket_mb)
        ddp.register_comm_hook((ctx.comm, self.dp), _sum_then_mean_over_replicas)
        return ddp

    def data_shard(self) -> tuple[int, int]:
        return self.dp_index, self.dp

    def no_sync(self):
        return self.model.no_sync()

    def train_step(self, micro_batches: list[Batch]) -> StepStats:
        ctx, n = self.ctx, len(micro_batches)
        samples = sum(mb[0].shape[0] for mb in micro_batches)
        share = torch.zeros((), dtype=torch.float64)  # this rank's part of the replica's mean loss
        frac = self.layout.local_len / self.layout.seq_len
        for i, mb in enumerate(micro_batches):
            x, *rest = (t[:, self.positions].to(ctx.device, non_blocking=True) for t in mb)
            with self.no_sync() if i < n - 1 else nullcontext():
                out = self.model(x)
                loss = self.workload.loss(out, (x, *rest)) * (frac * x.shape[0] / samples)
                loss.backward()
            share += loss.detach().double().cpu()
        t_backward = time.perf_counter()
        ctx.comm.close_launched(t_backward)  # DDP's backward returns once every bucket is reduced
        self.sp_comm.all_reduce(share)
        traffic, layers = self.traffic.take(), len(self.attention_layers)
        extra = {"sp_fwd_bytes_per_layer": traffic.forward / layers, "sp_bwd_bytes_per_layer": traffic.backward / layers}
        if self._held is None and self.opt.state:  # second step: gradients and optimizer state both exist
            self._held = held_bytes(self.module, self.opt)
        extra["lr"] = self.opt.param_groups[0]["lr"]
        extra["grad_norm"] = clip_and_step(self.module, self.opt, self.sched, ctx.optim)
        reports = self.sp_rank == 0  # one rank per sequence group reports its samples (StepStats)
        return StepStats(loss=float(share) if reports else math.nan, samples=samples if reports else 0, extra=extra)
