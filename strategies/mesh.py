"""mesh: any composition of the parallel parts, spelled by the user.

``--strategy mesh`` with degrees ``pp``, ``sp`` (= ``ulysses`` x ``ring``),
``fsdp`` and ``dp`` (a degree not given is 1, except ``dp``: the world size
divided by the others), how the ``fsdp`` ranks hold the model (``inner``:
fsdp shards it, ddp replicates it), and an ``outer`` sync across ``dp``
(none, demo, powersgd, gossip, diloco), plus the parts' own options under
their flat names (``microbatches``, ``schedule``, ``topk``, ``rank``, ...).
A YAML job file holds the same under ``strategy.options``.
"""
from __future__ import annotations

import copy
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from strategies.compression.powersgd import PowerSGDOptions
from strategies.ddp import DDPOptions
from strategies.decentralized.demo import DeMoOptions
from strategies.fsdp import FSDPOptions
from strategies.gossip import GossipOptions
from strategies.parallel import OUTERS, Parallel, Plan
from strategies.pipeline.part import PipelineOptions
from strategies.registry import register_strategy
from strategies.sequence.part import SequenceOptions

_PARTS: dict[str, type[BaseModel]] = {
    "pipeline": PipelineOptions, "sequence": SequenceOptions, "fsdp": FSDPOptions, "ddp": DDPOptions,
    "demo": DeMoOptions, "powersgd": PowerSGDOptions, "gossip": GossipOptions,
}


class _MeshBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pp: int = Field(1, ge=1, description="pipeline stages (the pipeline's options: schedule, microbatches, ...)")
    sp: int | None = Field(None, ge=1, description="sequence-parallel degree = ulysses x ring (default: their "
                           "product; ring defaults to sp / ulysses)")
    fsdp: int = Field(1, ge=1, description="ranks of a node that shard (inner=fsdp) or replicate (inner=ddp) "
                      "the model")
    dp: int | None = Field(None, ge=1, description="data-parallel replicas across nodes (default: workers / "
                           "(pp x sp x fsdp)); the outer sync runs over this axis")
    inner: Literal["fsdp", "ddp"] = Field("fsdp", description="how the fsdp ranks hold the model: fsdp shards "
                                          "it (FSDP2), ddp replicates it (torch DDP)")
    outer: Literal[OUTERS] = Field("none", description="sync across dp: none (gradients all-reduced every step), "
                                   "demo, powersgd, gossip, diloco")
    outer_every: int = Field(50, ge=1, description="diloco: inner steps per outer step (H)")
    outer_lr: float = Field(0.7, gt=0, description="diloco: outer learning rate")
    outer_momentum: float = Field(0.9, ge=0, lt=1, description="diloco: outer Nesterov momentum")
    outer_nesterov: bool = Field(True, description="diloco: Nesterov momentum (false: heavy ball)")

    @model_validator(mode="after")
    def _parts_valid(self) -> "_MeshBase":
        """Each part's own checks (its validators) on the fields it owns."""
        for part in _PARTS.values():
            part(**{k: getattr(self, k) for k in part.model_fields})
        return self


def _fields() -> dict:
    """Every part's options under their own names, each description saying whose it is."""
    own = set(_MeshBase.model_fields)
    out = {}
    for label, part in _PARTS.items():
        for name, f in part.model_fields.items():
            if name not in own and name not in out:
                g = copy.copy(f)
                g.description = f"{label}: {f.description}"
                out[name] = (f.annotation, g)
    return out


MeshOptions = create_model("MeshOptions", __base__=_MeshBase, **_fields())


def _pick(options: BaseModel, part: type[BaseModel], **override) -> BaseModel:
    return part(**{k: getattr(options, k) for k in part.model_fields} | override)


@register_strategy("mesh")
class MeshStrategy(Parallel):
    """Any composition: pipeline x sequence x FSDP x data parallel, with an optional low-bandwidth outer sync."""

    Options = MeshOptions

    @classmethod
    def declared_warmup(cls, options: BaseModel) -> int:
        return options.warmup_steps if options.outer == "powersgd" else 0  # the outer sync's uncompressed steps

    @classmethod
    def plan(cls, options: BaseModel, workers: int) -> Plan:
        o = options
        u = o.ulysses
        sp = o.sp if o.sp is not None else u * (o.ring or 1)
        ring = o.ring if o.ring is not None else max(1, sp // u)
        outer_fields = {"demo": DeMoOptions, "powersgd": PowerSGDOptions, "gossip": GossipOptions}.get(o.outer)
        outer_options = {k: getattr(o, k) for k in (outer_fields.model_fields if outer_fields else ())}
        outer_options |= {k: getattr(o, k) for k in ("outer_every", "outer_lr", "outer_momentum", "outer_nesterov")}
        return Plan.of(
            workers, pp=o.pp, sp=sp, fsdp=o.fsdp, dp=o.dp, inner=o.inner, outer=o.outer,
            pipeline_options=_pick(o, PipelineOptions) if o.pp > 1 else None,
            sequence_options=_pick(o, SequenceOptions, ring=ring) if sp > 1 else None,
            fsdp_options=_pick(o, FSDPOptions), ddp_options=_pick(o, DDPOptions), outer_options=outer_options)
