"""The Workload protocol: what every strategy needs from a model and its data.

A workload is a pydantic model: its typed fields are its options (listed by
``polytrain workloads`` and set with ``--set workload.NAME=VALUE``), its
methods build what is trained. It is pure description, so the driver can
validate it before any worker starts and ship it to every rank.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from workloads.data import Batch, SampleSource, Subset, heldout_split


class Workload(BaseModel, ABC):
    """Subclass, declare options as typed fields, implement the four methods."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    micro_batch: int = Field(8, ge=1, description="samples per rank in one micro-batch")
    data: str | None = Field(None, description="URL of the Parquet shards; default: generated and cached")

    @abstractmethod
    def blocks(self) -> list[nn.Module]:
        """The model as ordered blocks; running them in order is the forward pass.

        Pipeline strategies cut the model between blocks, so each block takes
        the previous block's output as its only input.
        """

    @abstractmethod
    def source(self) -> SampleSource:
        """Random access to every sample; called on each rank (and once on the
        driver, to create or check the data before workers start)."""

    @abstractmethod
    def loss(self, output: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Mean loss of one micro-batch."""

    def _heldout_fraction(self) -> float:
        """The tail of ``source()`` kept out of training: a workload's ``heldout_fraction``
        option (the built-ins have one; a user's workload may declare it too), else 0:
        no held-out data, and comparisons rank the workload by training loss."""
        return float(getattr(self, "heldout_fraction", 0.0))

    def train_source(self, source: SampleSource | None = None) -> SampleSource:
        """The samples training steps draw from: ``source()`` without its held-out tail."""
        source = self.source() if source is None else source
        fraction = self._heldout_fraction()
        return Subset(source, 0, heldout_split(len(source), fraction)) if fraction else source

    def heldout_source(self, source: SampleSource | None = None) -> SampleSource | None:
        """Samples no training step sees, for evaluation (None: the workload has none).
        Override it, with ``train_source``, to hold out data of your own choosing."""
        fraction = self._heldout_fraction()
        if not fraction:
            return None
        source = self.source() if source is None else source
        return Subset(source, heldout_split(len(source), fraction), len(source))

    def model(self) -> nn.Sequential:
        return nn.Sequential(*self.blocks())

    def step_metrics(self, output: torch.Tensor, batch: Batch) -> dict[str, float]:
        """Extra per-step metrics (e.g. accuracy); summed over micro-batches
        by sample count. Default: none."""
        return {}

    def tokens_per_sample(self) -> int:
        """Tokens in one sample, for the ``tokens`` metric (0: not a token model)."""
        return 0

    def attention_layers(self, blocks: list[nn.Module]) -> list[nn.Module] | None:
        """Optional hook for sequence parallelism: the modules whose ``attention``
        attribute, a function ``(q, k, v) -> out`` on (batch, heads, seq, head_dim)
        tensors, a strategy may replace. None: the workload has no such hook."""
        return None

    @classmethod
    def capabilities(cls) -> frozenset[str]:
        """What this workload offers strategies beyond the four required methods."""
        caps = {"blocks"}
        if cls.attention_layers is not Workload.attention_layers:
            caps.add("attention")
        return frozenset(caps)


# In-place random fills: on the meta device they compute nothing, yet torch runs
# them through its Python decompositions, whose first use imports torch._dynamo
# (about 1.5 s of CPU in the driver, which needs only the shapes).
_FILLS = frozenset({"normal_", "uniform_", "random_", "bernoulli_", "exponential_", "geometric_",
                    "log_normal_", "cauchy_"})


class _NoInit(torch.overrides.TorchFunctionMode):
    """Skips ``torch.nn.init`` and the random fills on meta tensors."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")  # torch.nn.init passes it by name
        if (isinstance(target, torch.Tensor) and target.is_meta
                and (name in _FILLS or getattr(func, "__module__", None) == "torch.nn.init")):
            return target
        return func(*args, **kwargs)


def meta_model(workload: Workload) -> nn.Module:
    """``workload``'s model on the meta device, uninitialised: its shapes without
    memory, for the driver's checks (checkpoint metadata, a compressor's options)."""
    with torch.device("meta"), _NoInit():
        return workload.model()
