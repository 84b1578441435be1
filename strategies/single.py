"""single: one process, the reference every strategy is checked against."""
from __future__ import annotations

from strategies.base import NoOptions
from strategies.parallel import Parallel, Plan
from strategies.registry import register_strategy
from workloads import Workload


@register_strategy("single")
class Single(Parallel):
    """One process, no communication: the reference for every other strategy."""

    uneven_batches = True

    @classmethod
    def plan(cls, options: NoOptions, workers: int) -> Plan:
        return Plan.of(1)

    @classmethod
    def check_job(cls, *, workers: int, workload: Workload, **kw) -> None:
        if workers != 1:
            raise ValueError(f"workers={workers}: strategy 'single' runs exactly 1 worker")
        super().check_job(workers=workers, workload=workload, **kw)
