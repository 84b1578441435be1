"""compare(): several jobs on one Ray instance, summarised side by side.

Each row is measured in that run (from its metrics.parquet); nothing is
estimated. The HTML/Markdown report with plots builds on this table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import pandas as pd

from orchestrator.config import JobSpec
from orchestrator.driver import RunResult, run
from orchestrator.metrics import final_attempt, samples_mean

WARMUP_STEPS = 3  # first steps carry one-off costs (allocation, DDP bucket rebuild)


def summarize(metrics: pd.DataFrame) -> dict:
    """One run's headline figures from its metrics rows."""
    metrics = final_attempt(metrics)
    steady = metrics[metrics.step > WARMUP_STEPS] if metrics.step.max() > WARMUP_STEPS else metrics
    per_step = steady.groupby("step").agg(
        step_time_s=("step_time_s", "max"), samples=("samples", "sum"), tokens=("tokens", "sum"))
    last = metrics[metrics.step == metrics.step.max()]
    row = {
        "run_id": metrics.run_id.iloc[0], "workload": metrics.workload.iloc[0],
        "strategy": metrics.strategy.iloc[0], "scenario": metrics.scenario.iloc[0],
        "workers": int(metrics["rank"].nunique()), "steps": int(metrics.step.max()),
        "final_loss": samples_mean(last.loss, last.samples),
        "median_step_s": float(per_step.step_time_s.median()),
        "samples_per_s": float(per_step.samples.sum() / per_step.step_time_s.sum()),
        "tokens_per_s": float(per_step.tokens.sum() / per_step.step_time_s.sum()),
        "bytes_sent_per_step": float(steady.bytes_sent.mean()),
        "comm_s_per_step": float(steady.comm_s.mean()),
        "idle_s_per_step": float(steady.idle_s.mean()),
        "peak_mem_bytes": int(metrics.peak_mem_bytes.max()),
    }
    if "accuracy" in metrics:
        row["final_accuracy"] = samples_mean(last.accuracy, last.samples)
    return row


@dataclass
class CompareResult:
    runs: list[RunResult]

    @property
    def summary(self) -> pd.DataFrame:
        return pd.DataFrame([summarize(r.metrics) for r in self.runs])


def compare(specs: Iterable[JobSpec], *, progress: bool = True, stream=None) -> CompareResult:
    """Run the jobs one after another on one Ray instance (started once)."""
    from cluster import runtime as ray_runtime

    specs = list(specs)
    addresses = {s.cluster.address for s in specs}
    if len(addresses) > 1:
        raise ValueError(f"cluster.address: compare() runs every job on one cluster, got {sorted(map(str, addresses))}")
    runtime = ray_runtime.start(address=addresses.pop())  # each run() below reuses it
    try:
        return CompareResult(runs=[run(s, progress=progress, stream=stream) for s in specs])
    finally:
        runtime.shutdown()
