"""pipeline: the named composition of the pipeline part (``part``) with data parallelism.

Rank layout: ``rank = replica * p + stage_rank`` (p = ``stages``): the p ranks of
a replica form the pipeline group (the mesh's ``pp`` axis), the ranks with one
stage rank across replicas the data-parallel group (``dp``). After the last
action: the data-parallel average of each stage's gradients (launched as soon
as that stage's last weight gradient is done), the global gradient norm over
the pipeline group (clipping and the non-finite check need it), the optimizer
step (``strategies.step``). That norm is the only synchronisation beyond the
schedule: it makes every rank end the step when the last one does, the flushed
makespan the simulator reports (for ZB-H2 and ZB-V, later than rank 0's own
last action).
"""
from __future__ import annotations

from pydantic import Field, model_validator

from strategies.parallel import Parallel, Plan
from strategies.pipeline.generators import check_microbatches
from strategies.pipeline.part import PipelineOptions as _PartOptions, check_pipeline, count_blocks
from strategies.registry import register_strategy
from workloads import Workload


class PipelineOptions(_PartOptions):
    stages: int | None = Field(None, ge=2, description="pipeline ranks p; workers = p x data-parallel replicas "
                               "(default: all workers); zb-v and interleaved cut the model into 2p (chunks x p)")

    @model_validator(mode="after")
    def _microbatches(self) -> "PipelineOptions":
        if self.stages is not None and self.schedule != "auto":
            check_microbatches(self.schedule, self.stages, self.microbatches)
        return self

    def part(self) -> _PartOptions:
        return _PartOptions(**self.model_dump(exclude={"stages"}))


def check_layout(o: PipelineOptions, *, workers: int, n_blocks: int, batch_size: int | None = None) -> None:
    """Every error the driver can find before a worker starts (one line, with the numbers)."""
    p = o.stages or workers
    if p < 2:
        raise ValueError(f"workers={workers}: a pipeline needs at least 2 stage ranks (strategy.stages)")
    if workers % p:
        raise ValueError(f"workers={workers}: must be divisible by strategy.stages={p} "
                         f"(workers = stages x data-parallel replicas)")
    check_pipeline(o, p=p, n_blocks=n_blocks, field="strategy.stages", replicas=workers // p, batch_size=batch_size)


@register_strategy("pipeline")
class Pipeline(Parallel):
    """Pipeline parallelism: GPipe, 1F1B, interleaved, zero-bubble (ZB-H1/H2/V) or an automatic schedule."""

    Options = PipelineOptions
    requires = {"blocks": "the model is cut between blocks"}

    @classmethod
    def check_job(cls, *, workers: int, workload: Workload, options: PipelineOptions | None = None,
                  batch_size: int | None = None, **kw) -> None:
        if "blocks" in type(workload).capabilities():  # else the base check names what is missing
            check_layout(options or cls.Options(), workers=workers, n_blocks=count_blocks(workload),
                         batch_size=batch_size)
        super().check_job(workers=workers, workload=workload, options=options, batch_size=batch_size, **kw)

    @classmethod
    def plan(cls, options: PipelineOptions, workers: int) -> Plan:
        p = options.stages or workers
        if p < 2 or workers % p:  # check_layout says why, with the numbers
            check_layout(options, workers=workers, n_blocks=10**9)
        return Plan.of(workers, pp=p, dp=workers // p, pipeline_options=options.part())
