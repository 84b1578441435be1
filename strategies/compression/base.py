"""Gradient compression on top of ddp: a DDP comm hook that hands each bucket to a
``Compressor``, which combines the ranks' gradients through ``cluster.Comm``
while sending less than the dense all-reduce.

A compressor works on one rank. ``reduce`` gets this rank's gradients of a
step (views into DDP's bucket buffers, named like the parameters) and writes
into them the average over ranks *as the compressed exchange reconstructs it*,
which is identical on every rank, so the replicas stay equal. It keeps its own
state (error-feedback residuals, warm-start factors); its ``Wire`` tallies the
bytes it puts on the wire with the formulas ``Comm`` counts with.

The hook collects a step's buckets and runs the compressor once, when DDP
hands over the last one: one set of collectives a step (two for PowerSGD),
which is what a latency-bound network charges for. The exchange blocks:
compressors chain collectives whose inputs depend on the previous result
(PowerSGD's P then Q; a scale then the values), and launching them from gloo's
completion callbacks could order collectives differently on different ranks.
So a compressed step's exchange does not overlap backward (uncompressed
warm-up steps still do, bucket by bucket, as ddp).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Iterable, Literal

import torch
import torch.distributed as dist
from pydantic import BaseModel, Field
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cluster import Comm, all_gather_bytes, all_to_all_bytes, nbytes, ring_allreduce_bytes
from strategies.base import OptimConfig, StepStats
from strategies.ddp import DDP, DDPOptions
from workloads import Batch, Workload
from workloads.base import meta_model


class CompressionOptions(DDPOptions):
    warmup_steps: int = Field(
        0, ge=0, description="first optimizer steps that all-reduce gradients uncompressed (no error feedback)")
    # The papers train with momentum SGD; each method may run at its own settings in a comparison.
    optimizer: Literal["adamw", "sgd"] | None = Field(
        None, description="adamw | sgd (momentum SGD, as the compression papers); default: optim.name")
    lr: float | None = Field(None, gt=0, description="peak LR of this method's optimizer; default: optim.lr")
    momentum: float | None = Field(None, ge=0, lt=1, description="sgd's momentum; default: optim.momentum")
    weight_decay: float | None = Field(None, ge=0, description="default: optim.weight_decay, or for another "
                                       "optimizer than optim.name its usual (sgd: 1e-4, the papers' L2)")

    def optim(self, base: OptimConfig) -> OptimConfig:
        """The job's optimizer settings with this method's own over them."""
        name = self.optimizer or base.name
        if self.weight_decay is not None:
            wd = self.weight_decay
        elif name == base.name:
            wd = base.weight_decay
        else:  # another optimizer than the job's: its own usual decay
            wd = 1e-4 if name == "sgd" else OptimConfig.model_fields["weight_decay"].default
        return base.model_copy(update={"name": name, "lr": self.lr or base.lr, "weight_decay": wd,
                                       "momentum": base.momentum if self.momentum is None else self.momentum})


class Wire:
    """The collectives a compressor uses, with the bytes each puts on the wire
    tallied in ``sent`` (the ring formulas Comm counts with)."""

    def __init__(self, comm: Comm):
        self.comm = comm
        self.sent = 0

    @property
    def world(self) -> int:
        return self.comm.world

    @property
    def rank(self) -> int:
        return self.comm.rank

    def all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        self.sent += ring_allreduce_bytes(nbytes(t), self.world)
        return self.comm.all_reduce(t, op=op)

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` stacked on a new first dim."""
        self.sent += all_gather_bytes(nbytes(t), self.world)
        return self.comm.all_gather(t)

    def all_to_all(self, t: torch.Tensor) -> torch.Tensor:
        """Row j of ``t`` (shape (world, ...)) goes to rank j; row j of the result came from rank j."""
        out = torch.empty_like(t)
        self.sent += all_to_all_bytes(nbytes(t), self.world)
        self.comm.all_to_all_single(out, t)
        return out


def draw_seed(seed: int, rank: int, step: int, tensor: int) -> int:
    """The seed of one tensor's random draws at one step on one rank. A function
    of the tensor's name (its index), not of DDP's bucket layout, which changes
    after the first step and again on a restart: a resumed run draws what the
    uninterrupted one did, and compressors keep no generator state."""
    return (((seed * 1_000_003 + rank) * 1_000_033 + step) * 10_007 + tensor) % 2**63


class Compressor(ABC):
    """One rank's compression state for every bucket of a model."""

    def __init__(self, wire: Wire, names: Iterable[str], *, seed: int):
        self.wire, self.seed = wire, seed  # the job seed: the same on every rank
        self.index = {n: i for i, n in enumerate(sorted(names))}
        self._gen = torch.Generator()
        self.feedback_paused = False  # this step: neither add nor update error-feedback residuals

    def generator(self, name: str, step: int, *, rank: int = 0) -> torch.Generator:
        """A generator for ``name``'s draws at ``step``: the same on every rank
        unless ``rank`` is given (independent draws per rank)."""
        return self._gen.manual_seed(draw_seed(self.seed, rank, step, self.index[name]))

    @abstractmethod
    def reduce(self, grads: list[tuple[str, torch.Tensor]], step: int) -> None:
        """Replace each gradient (in place) by the rank average the compressed
        exchange reconstructs; ``step`` is the 0-based optimizer step. Called
        once a step with every gradient, in the same order on every rank."""

    def tensors(self) -> dict[str, torch.Tensor]:
        """This rank's state as flat name -> tensor (for checkpoints and memory)."""
        return {}

    def load_tensors(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what ``tensors`` returned."""

    def step_metrics(self) -> dict[str, float]:
        """Extra per-step metrics (e.g. the chosen ranks); default none."""
        return {}


def _compressed_hook(strategy: "Compressed", bucket):  # DDP rejects an annotation on `bucket`
    return strategy.reduce_bucket(bucket)


class Compressed(DDP):
    """ddp whose gradient buckets go through a ``Compressor``; subclasses say which."""

    Options = CompressionOptions

    # The compressor a strategy runs; the default ``make_compressor`` passes it the
    # strategy's own options (those beyond ``CompressionOptions``) by name.
    compressor: ClassVar[type[Compressor]]

    @classmethod
    def declared_warmup(cls, options: BaseModel) -> int:
        return options.warmup_steps  # all-reduced uncompressed, as ddp

    def make_compressor(self, wire: Wire, shapes: dict[str, torch.Size], seed: int) -> Compressor:
        own = self.options.model_dump(exclude=set(CompressionOptions.model_fields))
        return self.compressor(wire, shapes, seed=seed, **own)

    @classmethod
    def check_options(cls, options, *, workers: int, workload: Workload) -> None:
        """Raise ValueError (one line) if ``options`` cannot run on ``workload``'s
        model (e.g. a rank no weight allows); default: nothing to check."""

    @classmethod
    def check_job(cls, *, workers: int, workload: Workload, options=None, batch_size: int | None = None) -> None:
        super().check_job(workers=workers, workload=workload, options=options, batch_size=batch_size)
        if options is not None:  # the driver, before any worker starts
            cls.check_options(options, workers=workers, workload=workload)

    def optim_config(self, base: OptimConfig) -> OptimConfig:
        return self.options.optim(base)

    def setup(self, workload: Workload, ctx) -> None:
        # the same checks the driver ran, for jobs built without a JobSpec
        self.check_options(self.options, workers=ctx.world, workload=workload)
        super().setup(workload, ctx)
        if not hasattr(self, "compressor"):  # one worker: no DDP, nothing to compress
            self._make(ctx.comm, self.module)

    def _make(self, comm: Comm, module: nn.Module) -> None:
        self.names = {id(p): n for n, p in module.named_parameters()}
        shapes = {n: p.shape for n, p in module.named_parameters() if p.requires_grad}
        # torch.manual_seed(job seed) ran on every rank before setup: same seed everywhere
        self.wire = Wire(comm)
        self.compressor = self.make_compressor(self.wire, shapes, torch.initial_seed() % 2**31)
        self._dense_bytes = 0
        self._pending: list[tuple[torch.Tensor, torch.futures.Future]] = []
        self._grads: list[tuple[str, torch.Tensor]] = []

    def register_hook(self, ddp: DistributedDataParallel, comm: Comm, divide: int) -> None:
        """Instead of ddp's all-reduce: this model's compressor, fed by ``reduce_bucket``."""
        self._make(comm, ddp.module)
        ddp.register_comm_hook(self, _compressed_hook)

    @property
    def optimizer_step(self) -> int:
        """0-based index of the step being computed (the schedule counts finished steps)."""
        return self.sched.last_epoch

    def reduce_bucket(self, bucket) -> torch.futures.Future:
        buf = bucket.buffer()
        comm = self.wire.comm
        self._dense_bytes += ring_allreduce_bytes(nbytes(buf), comm.world)
        if self.optimizer_step < self.options.warmup_steps:  # plain ddp, overlapped with backward
            self.wire.sent += ring_allreduce_bytes(nbytes(buf), comm.world)
            return comm.all_reduce_async(buf.div_(comm.world))
        # Collect buckets as DDP hands them over (in the same order on every rank) and
        # exchange them together with the last: one set of collectives a step, not one
        # per bucket, which is what a latency-bound network charges for. DDP waits for
        # the futures only once backward is done.
        fut = torch.futures.Future()
        self._pending.append((buf, fut))
        self._grads += [(self.names[id(p)], g) for p, g in zip(bucket.parameters(), bucket.gradients())]
        if bucket.is_last():
            # a rank whose gradient this step leaves out (weight 0: a backup worker's
            # straggler) sends zeros and keeps its residual for later
            self.compressor.feedback_paused = self.grad_weight == 0
            self.compressor.reduce(self._grads, self.optimizer_step)
            for b, f in self._pending:
                f.set_result(b)  # the gradients are views into it, already averaged
            self._pending, self._grads = [], []
        return fut

    def train_step(self, micro_batches: list[Batch]) -> StepStats:
        self.wire.sent, self._dense_bytes = 0, 0
        stats = super().train_step(micro_batches)
        sent = self.wire.sent
        # dense fp32 ring all-reduce bytes / bytes actually sent (1 without traffic: world 1)
        stats.extra["compression_ratio"] = self._dense_bytes / sent if sent else 1.0
        stats.extra.update(self.compressor.step_metrics())
        return stats

    # -- state -----------------------------------------------------------------------------
    rank_state_key = "compress"  # the key checkpoints written before the mesh have

    def rank_state(self) -> dict[str, torch.Tensor]:
        return self.compressor.tensors()

    def load_rank_state(self, state: dict[str, torch.Tensor]) -> None:
        self.compressor.load_tensors(state)

    def memory_bytes(self) -> dict[str, int]:
        held = super().memory_bytes()
        if held:
            held = {**held, "compress_bytes": sum(nbytes(t) for t in self.compressor.tensors().values())}
        return held


def matrix_shape(shape: torch.Size) -> tuple[int, int] | None:
    """(rows, cols) a tensor is compressed as (first dim x the rest); None for 1-D."""
    if len(shape) < 2:
        return None
    rows = shape[0]
    return rows, int(torch.Size(shape).numel()) // rows


def model_shapes(workload: Workload) -> dict[str, torch.Size]:
    """The trainable parameter shapes of ``workload``'s model, built on the meta
    device (no memory, no initialisation), for checks on the driver."""
    return {n: p.shape for n, p in meta_model(workload).named_parameters() if p.requires_grad}
