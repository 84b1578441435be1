"""The pipeline part: a workload's blocks cut into stages over the mesh's ``pp``
axis, run by a schedule from ``generators``/``auto``.

Every rank builds the whole model with the job's seed (so weights equal
``single``'s), keeps the blocks of its stages, and runs its action list;
messages go point to point through the ``pp`` group's ``Comm``. Each stage's
weight gradients are final after its last W: ``weights_done`` is told then, so
the data-parallel part can start averaging them while other stages still
compute. Stage costs are measured on one probe micro-batch (every rank times
every block; the mean over ranks, then rank 0's copy of it, is what all ranks
cut and schedule with).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from cluster import Comm
from strategies.pipeline.auto import AutoResult, auto_schedule, check_memory_limit
from strategies.pipeline.backward import SplitBackward
from strategies.pipeline.generators import SCHEDULES, check_microbatches, chunks_per_rank, generate
from strategies.pipeline.p2p import Key, Mailbox
from strategies.pipeline.runtime import StepRun
from strategies.pipeline.simulate import SimResult, simulate, uniform_costs
from strategies.pipeline.stages import BlockProfile, boundary_shapes, measure_blocks, partition, stage_costs
from workloads import Batch, Workload, split_micro

ScheduleName = Literal["gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-h2", "zb-v", "auto"]
assert set(ScheduleName.__args__) == set(SCHEDULES)  # noqa: S101  (the two lists must agree)


class PipelineOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schedule: ScheduleName = Field("1f1b", description="gpipe | 1f1b | interleaved-1f1b | zb-h1 | zb-h2 | zb-v | "
                                   "auto (least simulated makespan from measured F/B/W costs)")
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


def count_blocks(workload: Workload) -> int:
    with torch.random.fork_rng(), torch.device("meta"):
        return len(workload.blocks())


def check_pipeline(o: PipelineOptions, *, p: int, n_blocks: int, field: str, replicas: int = 1,
                   batch_size: int | None = None) -> None:
    """Every error a pipeline of ``p`` stage ranks (``field`` names that degree)
    can show before a worker starts, one line with the numbers."""
    if o.schedule != "auto":
        check_microbatches(o.schedule, p, o.microbatches)
    n_stages = p * chunks_per_rank(o.schedule, o.chunks)
    if n_stages > n_blocks:
        raise ValueError(f"{field}={p}: schedule {o.schedule!r} cuts the model into {n_stages} stages, "
                         f"more than the workload's {n_blocks} blocks")
    if o.memory_limit is not None and o.schedule != "auto":
        sched = generate(o.schedule, p, o.microbatches, chunks=o.chunks)
        peak = max(simulate(sched, uniform_costs(sched)).peak_memory)
        if peak > o.memory_limit + 1e-9:
            raise ValueError(f"strategy.memory_limit={o.memory_limit:g}: schedule {o.schedule!r} holds {peak:g} "
                             f"micro-batches of activations on some rank (p={p}, m={o.microbatches})")
    if batch_size is not None and (batch_size % replicas or (batch_size // replicas) % o.microbatches):
        raise ValueError(f"batch_size={batch_size}: each of the {replicas} pipeline replicas needs a batch divisible "
                         f"by strategy.microbatches={o.microbatches}")


class PipelinePart:
    """This rank's stages of the whole model ``blocks`` and the schedule that runs them.

    ``positions``: the token positions this rank holds when the pipeline is
    composed with sequence parallelism (stage boundaries then carry its tokens only)."""

    def __init__(self, *, workload: Workload, blocks: list[nn.Module], options: PipelineOptions, pp: Comm,
                 world: Comm, device: torch.device, positions: torch.Tensor | None = None):
        self.workload, self.options, self.pp, self.device = workload, options, pp, device
        self.p, self.rank = pp.world, pp.rank
        o = options
        with torch.random.fork_rng():  # probing must not move the RNG single would see
            probe = self._probe(positions)
            self.shapes = boundary_shapes(blocks, probe)
            # F/B/W per block: the cut (balance=time), auto's search and the predicted idle metric
            self.profiles = profiles = self._profile(blocks, probe, world)
        weights = [b.total for b in profiles] if o.balance == "time" else \
            [float(sum(q.numel() for q in b.parameters())) for b in blocks]
        self.auto: AutoResult | None = None
        if o.schedule == "auto":
            self.schedule, self.bounds = self._auto(weights, profiles, len(blocks))
        else:
            self.schedule = generate(o.schedule, self.p, o.microbatches, chunks=o.chunks)
            self.bounds = partition(weights, self.schedule.n_stages)
        per_rank = self.schedule.n_stages // self.p
        self.predicted: SimResult = simulate(self.schedule, stage_costs(profiles, self.bounds, per_rank=per_rank))
        mine = self.schedule.local_stages(self.rank)
        self.stages = {s: nn.Sequential(OrderedDict((str(i), blocks[i]) for i in range(*self.bounds[s])))
                       for s in mine}
        self.module = nn.Module()  # this rank's blocks under their whole-model names
        for i in sorted(i for s in mine for i in range(*self.bounds[s])):
            self.module.add_module(str(i), blocks[i])
        self.split = {s: SplitBackward(m) for s, m in self.stages.items()} if self.schedule.splits_backward() else {}

    @property
    def reports_loss(self) -> bool:
        return self.schedule.placement[-1] == self.rank  # the last stage computes the loss

    def _probe(self, positions: torch.Tensor | None) -> Batch:
        """One micro-batch of real samples: block shapes and costs are measured on it."""
        source = self.workload.train_source()
        k = min(self.workload.micro_batch, len(source))
        probe = tuple(t.to(self.device) for t in source.gather(np.arange(k)))
        return probe if positions is None else tuple(t[:, positions] for t in probe)

    def _profile(self, blocks: list[nn.Module], probe: Batch, comm: Comm) -> list[BlockProfile]:
        """Every rank times every block; the mean over ranks, then rank 0's copy of
        it (bit-identical everywhere), is what all ranks cut and schedule with."""
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

    def _buffer(self, key: Key, k: int) -> torch.Tensor:
        shape, dtype = self.shapes[self.bounds[key[1]][1] - 1]  # the output of the boundary stage's last block
        return torch.empty((k, *shape), dtype=dtype, device=self.device)

    def run(self, micro_batches: list[Batch], *, positions: torch.Tensor | None = None, scale: float = 1.0,
            weights_done: Callable[[int], None] = lambda s: None) -> StepRun:
        """One step of this rank's actions on its replica's batch (re-split into the
        schedule's micro-batches); each loss counts ``scale`` x its samples' share.
        ``positions``: the tokens this rank holds of every sample (sequence parallelism)."""
        m = self.schedule.microbatches
        batch = tuple(torch.cat(ts) for ts in zip(*micro_batches))
        n = batch[0].shape[0]
        if n % m:
            raise ValueError(f"strategy.microbatches={m}: this replica's batch of {n} samples is not divisible by it")
        mbs = [tuple((t if positions is None else t[:, positions]).to(self.device) for t in mb)
               for mb in split_micro(batch, m)]
        mailbox = Mailbox(self.pp, self.schedule, self.rank, lambda key: self._buffer(key, n // m))
        run = StepRun(schedule=self.schedule, rank=self.rank, stages=self.stages, split=self.split,
                      workload=self.workload, micro_batches=mbs, mailbox=mailbox, weights_done=weights_done,
                      scale=scale)
        mailbox.start()
        run.run()
        mailbox.finish()
        return run

    def evaluate(self, micro_batches: list[Batch], *, positions: torch.Tensor | None = None,
                 scale: float = 1.0) -> tuple[float, dict[str, float], int]:
        """Forward only, no schedule: each micro-batch runs through the stages in
        order, every rank taking its stages in turn (one chain, so blocking sends
        cannot deadlock). Returns the last stage's (loss sum x ``scale``, metric sums,
        samples); zeros elsewhere. The caller holds no_grad and eval mode."""
        loss_sum, sums, samples = 0.0, {}, 0
        placement, last = self.schedule.placement, self.schedule.n_stages - 1
        for mb in micro_batches:
            k = mb[0].shape[0]
            if not k:
                continue
            mb = tuple((t if positions is None else t[:, positions]).to(self.device) for t in mb)
            x = mb[0]
            for s in range(last + 1):
                here, before = placement[s] == self.rank, placement[s - 1] if s else None
                if s and here and before != self.rank:
                    x = self.pp.recv(self._buffer(("act", s - 1, 0), k), before)
                if not here:
                    continue
                x = self.stages[s](x)
                if s == last:
                    loss_sum += float(self.workload.loss(x, mb)) * scale * k
                    samples += k
                    for name, v in self.workload.step_metrics(x, mb).items():
                        sums[name] = sums.get(name, 0.0) + v * k
                elif placement[s + 1] != self.rank:
                    self.pp.send(x.contiguous(), placement[s + 1])
        return loss_sum, sums, samples

