"""The Strategy protocol: how one training step is parallelised across ranks.

A strategy owns the model replica (or shard), the optimizer and the LR
schedule on its rank, and turns one step's micro-batches into an update. It
talks to other ranks only through ``cluster.Comm`` (or torch wrappers whose
communication is routed through it) and never to Ray.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Annotated, Callable, ClassVar, ContextManager, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from cluster import Comm
from workloads import Batch, Workload


class OptimConfig(BaseModel):
    """AdamW (or momentum SGD) with linear warm-up then cosine decay to ``min_lr_ratio * lr``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: Literal["adamw", "sgd"] = Field(
        "adamw", description="adamw | sgd (momentum SGD, as the gradient-compression papers train)")
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.1, ge=0, description="weight decay, AdamW's decoupled or sgd's L2 (not applied to "
                                "biases and norms)")
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field(
        (0.9, 0.95), description="AdamW betas, each in [0, 1)")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd's momentum (heavy ball), in [0, 1)")
    warmup_steps: int = Field(20, ge=0, description="linear warm-up steps")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final LR as a fraction of lr")
    schedule: str = Field("cosine", pattern="^(cosine|constant)$", description="cosine | constant after warm-up")
    grad_clip: float = Field(1.0, ge=0, description="max global gradient norm; 0 turns clipping off")


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass(kw_only=True)
class StrategyContext:
    rank: int
    world: int
    device: torch.device
    comm: Comm
    optim: OptimConfig
    total_steps: int
    # every rank loads the same whole state right after set-up (a heal from a peer):
    # replicas need not be made equal at construction
    state_follows: bool = False


@dataclass(kw_only=True)
class StepStats:
    """This rank's share of the step. Ranks that work on the same samples (the
    stages of a pipeline, the shards of a sequence) report them once: one rank
    of each replica gives its ``samples`` and exact ``loss``, the others
    ``samples=0`` and ``loss=nan``. The step's loss is the samples-weighted mean."""

    loss: float  # mean over this rank's samples of the step
    samples: int
    extra: dict[str, float] = field(default_factory=dict)
    # Executed actions of the step, (name, start, end) in time.time() seconds, e.g.
    # a pipeline's ("1F3", ...); written to the run folder's timeline.parquet.
    timeline: list[tuple[str, float, float]] = field(default_factory=list)


class Strategy(ABC):
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Options: ClassVar[type[BaseModel]] = NoOptions
    # Workload capabilities this strategy needs, with why (shown by `polytrain strategies`).
    requires: ClassVar[dict[str, str]] = {}
    # What save_checkpoint writes; checkpoints load across strategies of one format.
    checkpoint_format: ClassVar[str] = "dcp"
    # Whether train_step honours ``grad_weight`` and uneven (or empty) per-rank
    # batches, which straggler rebalancing, backup workers and elastic shrink need.
    uneven_batches: ClassVar[bool] = False
    # How a lost rank is healed in place, the surviving ranks keeping their processes:
    # "peer": every rank holds the whole state and every collective of a step comes
    # before its update, so a survivor's state (``heal_state``) is whole and any rank
    # takes it from the survivor furthest on (at most the failed step is redone);
    # "restore": ranks hold different state (shards), so every rank restores the
    # newest in-memory snapshot or checkpoint on the re-formed group;
    # "restart": the whole group is restarted (state whose set-up cannot be redone in a process).
    heal: ClassVar[str] = "restart"

    def __init__(self, options: BaseModel | None = None):
        self.options = options if options is not None else self.Options()
        # This rank's batch share relative to an even split, set by the trainer
        # before each step: gradients are averaged as sum_r share_r * g_r.
        self.grad_weight = 1.0

    @classmethod
    def unsupported(cls, workload_cls: type[Workload]) -> str | None:
        """Why this strategy cannot train that workload, or None if it can."""
        missing = [why for cap, why in cls.requires.items() if cap not in workload_cls.capabilities()]
        return "; ".join(missing) or None

    @classmethod
    def check_job(cls, *, workers: int, workload: Workload, options: BaseModel | None = None,
                  batch_size: int | None = None) -> None:
        """Raise ValueError, naming the field, if this strategy cannot run the job
        (``options``: the validated strategy options; ``batch_size``: the global batch)."""
        why = cls.unsupported(type(workload))
        if why:
            raise ValueError(f"strategy={cls.name!r} cannot train workload={workload.name!r}: {why}")

    @classmethod
    def replicas(cls, *, workers: int, options: BaseModel) -> int:
        """Data-parallel replicas among ``workers``: what the global batch is split
        over. Ranks that split one replica's work (pipeline stages, sequence shards)
        count once; ``data_shard`` must agree."""
        return workers

    @classmethod
    def declared_warmup(cls, options: BaseModel) -> int:
        """Steps at the start of a run that this strategy runs differently from its
        steady state (e.g. PowerSGD's uncompressed steps): reports leave them out of
        steady-state figures. Default: none."""
        return 0

    @abstractmethod
    def setup(self, workload: Workload, ctx: StrategyContext) -> None: ...

    def data_shard(self) -> tuple[int, int]:
        """(index, count) of this rank's data-parallel replica: the loader gives
        it the index-th of count slices of every global batch. Ranks that split
        one replica's work (pipeline stages, sequence shards) share an index.
        Called after setup; default: every rank is its own replica."""
        return self.ctx.rank, self.ctx.world

    @abstractmethod
    def train_step(self, micro_batches: list[Batch]) -> StepStats: ...

    def evaluate(self, micro_batches: list[Batch]) -> StepStats | None:
        """Collective, forward only (no gradients, the model in eval mode): the loss
        of this rank's share of held-out ``micro_batches``, reported as ``train_step``
        reports (ranks that share samples give them once). None: this strategy does
        not evaluate (a user's strategy without the hook); the run is then judged
        on its training loss."""
        return None

    def replicas_differ(self) -> bool:
        """Whether data-parallel replicas hold different weights (gossip, DiLoCo
        between syncs): evaluation then scores each replica and their average."""
        return False

    def replica_average(self) -> ContextManager:
        """Collective: while open, every replica holds the replicas' average weights."""
        return nullcontext()

    @abstractmethod
    def save_checkpoint(self, url: str) -> None:
        """Collective (every rank calls it): write this strategy's model, optimizer
        and LR-schedule state under the folder ``url`` (a path or fsspec URL)."""

    @abstractmethod
    def load_checkpoint(self, url: str) -> None:
        """Collective: restore what ``save_checkpoint`` wrote, possibly from a
        different strategy's or world size's checkpoint where the format allows."""

    def heal_state(self) -> dict:
        """This rank's whole state (model, optimizer, LR schedule), for ``heal = "peer"``:
        what a newcomer loads with ``load_heal_state``. Local: no communication."""
        raise NotImplementedError(f"strategy {self.name!r} does not heal from a peer (heal={self.heal!r})")

    def load_heal_state(self, state: dict) -> None:
        raise NotImplementedError(f"strategy {self.name!r} does not heal from a peer (heal={self.heal!r})")

    @abstractmethod
    def memory_bytes(self) -> dict[str, int]:
        """Bytes this rank holds: ``param_bytes``, ``grad_bytes``, ``optim_bytes``,
        measured once gradients and optimizer state exist (empty before)."""


def eval_micro_batches(model: nn.Module, workload: Workload, micro_batches: list[Batch], *,
                       device: torch.device, positions: torch.Tensor | None = None,
                       scale: float = 1.0) -> tuple[float, dict[str, float]]:
    """``run_micro_batches``' forward alone, under no_grad with ``model`` in eval
    mode (restored after): (mean loss times ``scale``, per-sample-weighted metrics)."""
    micro_batches = [mb for mb in micro_batches if mb[0].shape[0]]
    total_samples = sum(mb[0].shape[0] for mb in micro_batches)
    if not total_samples:
        return float("nan"), {}
    total, extra = 0.0, {}
    with eval_mode(model):
        for mb in micro_batches:
            mb = tuple((t if positions is None else t[:, positions]).to(device, non_blocking=True) for t in mb)
            k = mb[0].shape[0]
            out = model(mb[0])
            total += float(workload.loss(out, mb)) * scale * k
            for name, v in workload.step_metrics(out, mb).items():
                extra[name] = extra.get(name, 0.0) + v * k
    return total / total_samples, {k: v / total_samples for k, v in extra.items()}


@contextmanager
def eval_mode(*modules: nn.Module):
    """no_grad with ``modules`` in eval mode (batch norm on its running statistics,
    no dropout), each put back in the mode it was in."""
    was = [m.training for m in modules]
    try:
        with torch.no_grad():
            for m in modules:
                m.eval()
            yield
    finally:
        for m, training in zip(modules, was):
            m.train(training)


def run_micro_batches(
    model: nn.Module,
    workload: Workload,
    micro_batches: list[Batch],
    *,
    device: torch.device,
    no_sync: Callable[[], ContextManager] = nullcontext,
    weight: float = 1.0,
    positions: torch.Tensor | None = None,
    scale: float = 1.0,
) -> tuple[float, dict[str, float], float]:
    """Forward and backward over the micro-batches, gradients averaged over their
    samples (micro-batches may differ in size) and scaled by ``weight``.

    ``weight`` is this rank's share of the global batch relative to an even
    split (rebalanced stragglers); at 0 the rank's gradient counts for nothing
    but its backward still runs, so collectives hooked on it (DDP) see every
    rank. No samples at all: a backward of zeros (for strategies without hooks).
    ``no_sync`` wraps every backward but the last (DDP's accumulation).
    ``positions``: the tokens this rank holds of every sample (sequence
    parallelism slices dimension 1 of each tensor); its loss then counts
    ``scale`` (its share of the tokens), so the shares of a sequence add up.
    Returns (mean loss times ``scale``, per-sample-weighted extra metrics,
    perf_counter when the last backward returned).
    """
    micro_batches = [mb for mb in micro_batches if mb[0].shape[0]]
    total_samples = sum(mb[0].shape[0] for mb in micro_batches)
    if not total_samples:
        sum(p.sum() for p in model.parameters() if p.requires_grad).mul(0.0).backward()
        return float("nan"), {}, time.perf_counter()
    n = len(micro_batches)
    total, extra = 0.0, {}
    for i, mb in enumerate(micro_batches):
        mb = tuple((t if positions is None else t[:, positions]).to(device, non_blocking=True) for t in mb)
        k = mb[0].shape[0]
        with no_sync() if i < n - 1 else nullcontext():
            out = model(mb[0])
            loss = workload.loss(out, mb) * scale
            (loss * (weight * k / total_samples)).backward()
        total += loss.item() * k
        for name, v in workload.step_metrics(out.detach(), mb).items():
            extra[name] = extra.get(name, 0.0) + v * k
    return total / total_samples, {k: v / total_samples for k, v in extra.items()}, time.perf_counter()
