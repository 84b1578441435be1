"""Per-(step, rank) metrics and run events, kept on the driver and written as Parquet.

Both files are rewritten whole every few seconds (small: steps x ranks rows),
each write atomic, so a failure mid-run loses nothing already flushed.
"""
from __future__ import annotations

import time

import pyarrow as pa

from orchestrator.storage import RunFolder

METRIC_SCHEMA = pa.schema([
    ("run_id", pa.string()),
    ("workload", pa.string()),
    ("strategy", pa.string()),
    ("scenario", pa.string()),
    ("step", pa.int64()),
    ("rank", pa.int64()),
    ("loss", pa.float64()),
    ("step_time_s", pa.float64()),  # wall time of the step on this rank
    ("compute_s", pa.float64()),  # step_time_s - idle_s
    ("comm_s", pa.float64()),  # time collectives were in flight (overlapped or not)
    ("idle_s", pa.float64()),  # waiting for data, or for communication no compute hid
    ("bytes_sent", pa.int64()),
    ("bytes_received", pa.int64()),
    ("samples", pa.int64()),
    ("tokens", pa.int64()),
    ("peak_mem_bytes", pa.int64()),
    ("wall_time", pa.float64()),  # unix time at the end of the step
])
METRIC_COLUMNS = METRIC_SCHEMA.names

TIMELINE_SCHEMA = pa.schema([  # executed actions (a pipeline's F/B/W), one row each
    ("run_id", pa.string()),
    ("step", pa.int64()),
    ("rank", pa.int64()),
    ("action", pa.string()),
    ("start", pa.float64()),  # unix time
    ("end", pa.float64()),
])

EVENT_SCHEMA = pa.schema([
    ("run_id", pa.string()),
    ("wall_time", pa.float64()),
    ("kind", pa.string()),
    ("rank", pa.int64()),  # -1: the driver / the whole group
    ("step", pa.int64()),
    ("seconds", pa.float64()),  # duration, for phases
    ("detail", pa.string()),
])


def samples_mean(values, samples) -> float:
    """A step's loss (or accuracy) from its rows: samples-weighted over the ranks
    that report samples (a pipeline's last stage, one shard of a sequence; see
    strategies.StepStats); rows with no samples carry no loss."""
    pairs = [(float(v), int(n)) for v, n in zip(values, samples) if n > 0]
    total = sum(n for _, n in pairs)
    return sum(l * n for l, n in pairs) / total if total else float("nan")


def final_attempt(metrics):
    """A run's metric rows with every step's rows from the last attempt that ran
    it: after a restart, steps redone from a snapshot replace the lost ones
    (which stay in metrics.parquet, tagged with their ``attempt``)."""
    if "attempt" not in metrics or metrics.empty:
        return metrics
    last = metrics.groupby("step")["attempt"].transform("max")
    return metrics[metrics["attempt"] == last]


class MetricsLog:
    def __init__(self, folder: RunFolder, *, run_id: str, workload: str, strategy: str, scenario: str,
                 flush_every_s: float = 5.0):
        self.folder = folder
        self.const = {"run_id": run_id, "workload": workload, "strategy": strategy, "scenario": scenario}
        self.rows: list[dict] = []
        self.events: list[dict] = []
        self.timeline: list[dict] = []
        self.flush_every_s = flush_every_s
        self._last_flush = time.monotonic()
        self._dirty = False

    def keep_history(self, *, up_to_step: int) -> None:
        """Resuming in this run folder: keep its metric rows up to the checkpoint's
        step (later ones are redone) and all its events."""
        if self.folder.exists("metrics.parquet"):
            old = self.folder.read_table("metrics.parquet")
            self.rows = [r for r in old.to_dict("records") if r["step"] <= up_to_step]
        if self.folder.exists("events.parquet"):
            self.events = self.folder.read_table("events.parquet").to_dict("records")

    def add_row(self, row: dict) -> None:
        self.rows.append({**self.const, **row})
        self._dirty = True

    def add_timeline(self, step: int, rank: int, actions: list[tuple[str, float, float]]) -> None:
        run_id = self.const["run_id"]
        self.timeline += [{"run_id": run_id, "step": step, "rank": rank, "action": a, "start": t0, "end": t1}
                          for a, t0, t1 in actions]
        self._dirty = True

    def event(self, kind: str, *, rank: int = -1, step: int = -1, seconds: float = float("nan"), detail: str = "") -> None:
        self.events.append({
            "run_id": self.const["run_id"], "wall_time": time.time(), "kind": kind,
            "rank": rank, "step": step, "seconds": seconds, "detail": detail,
        })
        self._dirty = True

    def maybe_flush(self) -> None:
        if self._dirty and time.monotonic() - self._last_flush >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        self.folder.write_table("metrics.parquet", self.metrics_table())
        self.folder.write_table("events.parquet", pa.Table.from_pylist(self.events, schema=EVENT_SCHEMA))
        if self.timeline:
            self.folder.write_table("timeline.parquet", pa.Table.from_pylist(self.timeline, schema=TIMELINE_SCHEMA))
        self._last_flush, self._dirty = time.monotonic(), False

    def metrics_table(self) -> pa.Table:
        """Required columns first, typed; strategy or workload extras after them."""
        extras = sorted({k for r in self.rows for k in r} - set(METRIC_COLUMNS))
        rows = sorted(self.rows, key=lambda r: (r["step"], r["rank"]))
        table = pa.Table.from_pylist(rows, schema=METRIC_SCHEMA)
        for name in extras:
            table = table.append_column(name, pa.array([r.get(name) for r in rows], type=pa.float64()))
        return table


WARMUP_STEPS = 3  # first steps carry one-off costs (allocation, DDP bucket rebuild)


def summarize(metrics) -> dict:
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
        "compute_s_per_step": float(steady.compute_s.mean()),
        "comm_s_per_step": float(steady.comm_s.mean()),
        "idle_s_per_step": float(steady.idle_s.mean()),
        "peak_mem_bytes": int(metrics.peak_mem_bytes.max()),
    }
    if "accuracy" in metrics:
        row["final_accuracy"] = samples_mean(last.accuracy, last.samples)
    return row
