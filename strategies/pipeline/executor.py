"""pipeline: the workload's blocks cut into stages, run by a schedule from ``generators``/``auto``.

Rank layout: ``rank = replica * p + stage_rank`` (p = ``stages``): the p ranks of
a replica form the pipeline group, the ranks with one stage rank across
replicas the data-parallel group. Every rank builds the whole model with the
job's seed (so weights equal ``single``'s), keeps the blocks of its stages, and
runs its action list; messages go point to point through ``Comm``. After the
last action: the data-parallel all-reduce of each stage's gradients (launched
as soon as that stage's last weight gradient is done), the global gradient
norm over the pipeline group (clipping and the non-finite check need it), the
optimizer step. That norm is the only synchronisation beyond the schedule: it
makes every rank end the step when the last one does, the flushed makespan the
simulator reports (for ZB-H2 and ZB-V, later than rank 0's own last action).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from strategies.base import StepStats, Strategy, StrategyContext
from strategies.checkpoint import held_bytes
from strategies.optim import build_optimizer
from strategies.pipeline import state
from strategies.pipeline.auto import AutoResult, auto_schedule, check_memory_limit
from strategies.pipeline.backward import SplitBackward
from strategies.pipeline.generators import SCHEDULES, check_microbatches, chunks_per_rank, generate
from strategies.pipeline.p2p import Key, Mailbox
from strategies.pipeline.runtime import StepRun
from strategies.pipeline.simulate import SimResult, simulate, uniform_costs
from strategies.pipeline.stages import BlockProfile, boundary_shapes, measure_blocks, partition, stage_costs
from strategies.registry import register_strategy
from workloads import Batch, Workload, split_micro

ScheduleName = Literal["gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-h2", "zb-v", "auto"]
assert set(ScheduleName.__args__) == set(SCHEDULES)  # noqa: S101  (the two lists must agree)


class PipelineOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schedule: ScheduleName = Field("1f1b", description="gpipe | 1f1b | interleaved-1f1b | zb-h1 | zb-h2 | zb-v | "
                                   "auto (least simulated makespan from measured F/B/W costs)")
    stages: int | None = Field(None, ge=2, description="pipeline ranks p; workers = p x data-parallel replicas "
                               "(default: all workers); zb-v and interleaved cut the model into 2p (chunks x p)")
    microbatches: int = Field(8, ge=1, description="micro-batches each replica's batch is split into per step")
    chunks: int = Field(2, ge=2, description="interleaved-1f1b: model stages per rank")
    balance: Literal["time", "params"] = Field(
        "time", description="cut blocks into stages by measured F+B+W time (time) or by parameter count (params)")
    memory_limit: float | None = Field(
        None, description="activations a rank may hold, in micro-batches of its share of the model (1F1B holds p, "
        "ZB-H2 2p-1); auto searches under it (default p), other schedules are checked against it")

    @field_validator("memory_limit")
    @classmethod
    def _enough_memory(cls, v: float | None) -> float | None:
        try:
            check_memory_limit(v)
        except ValueError as e:  # the field and value are named by whoever reports it
            raise ValueError(str(e).split(": ", 1)[1]) from None
        return v

    @model_validator(mode="after")
    def _microbatches(self) -> "PipelineOptions":
        if self.stages is not None and self.schedule != "auto":
            check_microbatches(self.schedule, self.stages, self.microbatches)
        return self


def count_blocks(workload: Workload) -> int:
    with torch.random.fork_rng(), torch.device("meta"):
        return len(workload.blocks())


def check_layout(o: PipelineOptions, *, workers: int, n_blocks: int, batch_size: int | None = None) -> None:
    """Every error the driver can find before a worker starts (one line, with the numbers)."""
    p = o.stages or workers
    if p < 2:
        raise ValueError(f"workers={workers}: a pipeline needs at least 2 stage ranks (strategy.stages)")
    if workers % p:
        raise ValueError(f"workers={workers}: must be divisible by strategy.stages={p} "
                         f"(workers = stages x data-parallel replicas)")
    if o.schedule != "auto":
        check_microbatches(o.schedule, p, o.microbatches)
    n_stages = p * chunks_per_rank(o.schedule, o.chunks)
    if n_stages > n_blocks:
        raise ValueError(f"strategy.stages={p}: schedule {o.schedule!r} cuts the model into {n_stages} stages, "
                         f"more than the workload's {n_blocks} blocks")
    if o.memory_limit is not None and o.schedule != "auto":
        sched = generate(o.schedule, p, o.microbatches, chunks=o.chunks)
        peak = max(simulate(sched, uniform_costs(sched)).peak_memory)
        if peak > o.memory_limit + 1e-9:
            raise ValueError(f"strategy.memory_limit={o.memory_limit:g}: schedule {o.schedule!r} holds {peak:g} "
                             f"micro-batches of activations on some rank (p={p}, m={o.microbatches})")
    replicas = workers // p
    if batch_size is not None and (batch_size % replicas or (batch_size // replicas) % o.microbatches):
        raise ValueError(f"batch_size={batch_size}: each of the {replicas} pipeline replicas needs a batch divisible "
                         f"by strategy.microbatches={o.microbatches}")


@register_strategy("pipeline")
class Pipeline(Strategy):
    """Pipeline parallelism: GPipe, 1F1B, interleaved, zero-bubble (ZB-H1/H2/V) or an automatic schedule."""

    Options = PipelineOptions
    requires = {"blocks": "the model is cut between blocks"}

    @classmethod
    def check_job(cls, *, workers: int, workload: Workload, options: BaseModel | None = None,
                  batch_size: int | None = None) -> None:
        super().check_job(workers=workers, workload=workload)
        check_layout(options or cls.Options(), workers=workers, n_blocks=count_blocks(workload), batch_size=batch_size)

    @classmethod
    def replicas(cls, *, workers: int, options: PipelineOptions) -> int:
        return workers // (options.stages or workers)  # each replica's stages read the same samples

    # -- set-up --------------------------------------------------------------------------------
    def setup(self, workload: Workload, ctx: StrategyContext) -> None:
        self.workload, self.ctx, o = workload, ctx, self.options
        model = workload.model().to(ctx.device)  # the whole model, seeded as single's is
        blocks = list(model)
        check_layout(o, workers=ctx.world, n_blocks=len(blocks))
        p = o.stages or ctx.world
        self.p, self.n_replicas = p, ctx.world // p
        self.stage_rank, self.replica = ctx.rank % p, ctx.rank // p
        self.pp = ctx.comm.split([[d * p + i for i in range(p)] for d in range(self.n_replicas)])
        self.dp = ctx.comm.split([[d * p + i for d in range(self.n_replicas)] for i in range(p)])
        with torch.random.fork_rng():  # probing must not move the RNG single would see
            probe = self._probe()
            self.shapes = boundary_shapes(blocks, probe)
            # F/B/W per block: the cut (balance=time), auto's search and the predicted idle metric
            self.profiles = profiles = self._profile(blocks, probe)
        weights = [b.total for b in profiles] if o.balance == "time" else \
            [float(sum(q.numel() for q in b.parameters())) for b in blocks]
        self.auto: AutoResult | None = None
        if o.schedule == "auto":
            self.schedule, self.bounds = self._auto(weights, profiles, len(blocks))
        else:
            self.schedule = generate(o.schedule, p, o.microbatches, chunks=o.chunks)
            self.bounds = partition(weights, self.schedule.n_stages)
        per_rank = self.schedule.n_stages // p
        self.predicted: SimResult = simulate(self.schedule, stage_costs(profiles, self.bounds, per_rank=per_rank))
        mine = self.schedule.local_stages(self.stage_rank)
        self.stages = {s: nn.Sequential(OrderedDict((str(i), blocks[i]) for i in range(*self.bounds[s])))
                       for s in mine}
        self.module = nn.Module()  # this rank's blocks under their whole-model names
        for i in sorted(i for s in mine for i in range(*self.bounds[s])):
            self.module.add_module(str(i), blocks[i])
        del model, blocks
        self.split = {s: SplitBackward(m) for s, m in self.stages.items()} if self.schedule.splits_backward() else {}
        self.opt, self.sched = build_optimizer(self.module, ctx.optim, ctx.total_steps)
        self.full_groups = state.full_param_groups(workload, ctx.optim.weight_decay)
        self._held: dict[str, int] | None = None

    def _probe(self) -> Batch:
        """One micro-batch of real samples: block shapes and costs are measured on it."""
        source = self.workload.train_source()
        k = min(self.workload.micro_batch, len(source))
        return tuple(t.to(self.ctx.device) for t in source.gather(np.arange(k)))

    def _profile(self, blocks: list[nn.Module], probe: Batch) -> list[BlockProfile]:
        """Every rank times every block; the mean over ranks, then rank 0's copy of
        it (bit-identical everywhere), is what all ranks cut and schedule with."""
        comm = self.ctx.comm
        local = measure_blocks(blocks, self.workload, probe)
        t = torch.tensor([[b.f, b.b, b.w] for b in local], dtype=torch.float64)
        comm.broadcast(comm.all_reduce(t).div_(comm.world), src=0)
        return [BlockProfile(*row, b.params) for row, b in zip(t.tolist(), local)]

    def _auto(self, weights: list[float], profiles: list[BlockProfile], n_blocks: int):
        p, o = self.p, self.options
        flat = partition(weights, p)
        v = partition(weights, 2 * p) if n_blocks >= 2 * p else None
        self.auto = auto_schedule(
            p, o.microbatches, stage_costs(profiles, flat, per_rank=1),
            v_costs=stage_costs(profiles, v, per_rank=2) if v else None,
            memory_limit=o.memory_limit if o.memory_limit is not None else float(p))
        return self.auto.schedule, flat if self.auto.schedule.n_stages == p else v

    def data_shard(self) -> tuple[int, int]:
        return self.replica, self.n_replicas  # all stages of a replica read the same samples

    # -- the step ------------------------------------------------------------------------------
    def _buffer(self, key: Key, k: int) -> torch.Tensor:
        shape, dtype = self.shapes[self.bounds[key[1]][1] - 1]  # the output of the boundary stage's last block
        return torch.empty((k, *shape), dtype=dtype, device=self.ctx.device)

    def train_step(self, micro_batches: list[Batch]) -> StepStats:
        m = self.schedule.microbatches
        batch = tuple(torch.cat(ts) for ts in zip(*micro_batches))
        n = batch[0].shape[0]
        if n % m:
            raise ValueError(f"strategy.microbatches={m}: this replica's batch of {n} samples is not divisible by it")
        mbs = [tuple(t.to(self.ctx.device) for t in mb) for mb in split_micro(batch, m)]
        mailbox = Mailbox(self.pp, self.schedule, self.stage_rank, lambda key: self._buffer(key, n // m))
        reductions: dict[int, tuple] = {}
        run = StepRun(schedule=self.schedule, rank=self.stage_rank, stages=self.stages, split=self.split,
                      workload=self.workload, micro_batches=mbs, mailbox=mailbox,
                      weights_done=lambda s: reductions.update({s: self._reduce(s)}))
        mailbox.start()
        run.run()
        mailbox.finish()
        for s, pending in reductions.items():
            self._finish_reduce(s, *pending)
        if self._held is None and self.opt.state:
            self._held = held_bytes(self.module, self.opt)
        extra = {"lr": self.opt.param_groups[0]["lr"], "grad_norm": self._clip_and_step()}
        extra["predicted_idle_frac"] = self.predicted.bubble[self.stage_rank]
        reports = self.schedule.placement[-1] == self.stage_rank  # the last stage has the loss
        loss = float(torch.stack(run.losses).mean()) if reports else float("nan")
        if reports:
            extra.update({k: v / n for k, v in run.metrics.items()})
        return StepStats(loss=loss, samples=n if reports else 0, extra=extra, timeline=run.timeline)

    def _params(self, s: int) -> list[nn.Parameter]:
        return [q for q in self.stages[s].parameters() if q.requires_grad]

    def _reduce(self, s: int):
        """Start averaging stage s's gradients over the replicas (its weights are final)."""
        if self.n_replicas == 1:
            return (None, None)
        flat = torch.cat([(q.grad if q.grad is not None else torch.zeros_like(q)).reshape(-1) for q in self._params(s)])
        return (flat, self.dp.all_reduce(flat, async_op=True))

    def _finish_reduce(self, s: int, flat: torch.Tensor | None, work) -> None:
        if flat is None:
            return
        work.wait()
        flat /= self.n_replicas
        offset = 0
        for q in self._params(s):
            q.grad = flat[offset: offset + q.numel()].view_as(q).clone()
            offset += q.numel()

    def _clip_and_step(self) -> float:
        """Global-norm clipping as clip_grad_norm_ does it, over every stage; a
        non-finite norm skips the update (as strategies.optim does)."""
        params = [q for q in self.module.parameters() if q.requires_grad]
        sq = torch.zeros((), dtype=torch.float32, device=self.ctx.device)
        for q in params:
            if q.grad is not None:
                sq += q.grad.detach().float().pow(2).sum()
        norm = float(self.pp.all_reduce(sq).sqrt())
        clip = self.ctx.optim.grad_clip
        if math.isfinite(norm):
            if clip > 0:
                coef = min(1.0, clip / (norm + 1e-6))
                for q in params:
                    if q.grad is not None:
                        q.grad.mul_(coef)
            self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return norm

    # -- state ---------------------------------------------------------------------------------
    def save_checkpoint(self, url: str) -> None:
        state.save(url, self.module, self.opt, self.sched, self.full_groups)

    def load_checkpoint(self, url: str) -> None:
        state.load(url, self.module, self.opt, self.sched, self.full_groups)

    def memory_bytes(self) -> dict[str, int]:
        return self._held or {}  # measured at the second step
