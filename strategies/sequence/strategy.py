"""sequence: the named composition of the sequence part (``part``) with data parallelism.

Rank layout: ``rank = dp_index * sp + sp_rank`` with ``sp = ulysses * ring``: a
sequence group is sp neighbouring ranks (the mesh's ``sp`` axis), its Ulysses
groups neighbours within it. Every rank holds the whole model; gradients are
summed over the sequence group and averaged over replicas in one all-reduce
over all ranks (torch DDP, through ``Comm``: ``strategies.ddp``).
"""
from __future__ import annotations

from pydantic import Field

from cluster import Comm
from strategies.parallel import Parallel, Plan
from strategies.registry import register_strategy
from strategies.sequence.layout import SequenceLayout
from strategies.sequence.part import SequenceOptions as _PartOptions, attention_is_causal, subgroups  # noqa: F401


class SequenceOptions(_PartOptions):
    bucket_mb: float = Field(25.0, gt=0, description="gradient all-reduce bucket size in MiB (DDP bucket_cap_mb)")


def degrees(options: SequenceOptions, workers: int) -> tuple[int, int]:
    """(ulysses, ring) with the ring's default resolved."""
    u = options.ulysses
    return u, options.ring if options.ring is not None else max(1, workers // u)


def split_groups(comm: Comm, layout: SequenceLayout, dp: int) -> tuple[Comm, Comm, Comm]:
    """(sequence group, Ulysses group, ring group) of this rank; collective."""
    sp = layout.size
    seq = [[d * sp + s for s in range(sp)] for d in range(dp)]
    return (comm.split(seq), *subgroups(comm, seq, layout))


@register_strategy("sequence")
class SequenceParallel(Parallel):
    """Sequence parallelism (Ulysses x ring, USP) for long sequences, composed with data parallelism."""

    Options = SequenceOptions
    requires = {"attention": "needs swappable attention layers (Workload.attention_layers)"}

    @classmethod
    def plan(cls, options: SequenceOptions, workers: int) -> Plan:
        from strategies.ddp import DDPOptions

        u, r = degrees(options, workers)
        if workers % (u * r):
            raise ValueError(f"strategy.ulysses({u}) x strategy.ring({r}) = {u * r} must divide workers={workers}")
        part = _PartOptions(**options.model_dump(exclude={"bucket_mb"}) | {"ring": r})
        return Plan.of(workers, sp=u * r, dp=workers // (u * r), sequence_options=part,
                       ddp_options=DDPOptions(bucket_mb=options.bucket_mb))
