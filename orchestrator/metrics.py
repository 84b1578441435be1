"""Per-(step, rank) metrics, run events and a pipeline's timeline, kept on the
driver and written as Parquet.

Rows reach storage as they come: at least once a second while they arrive, the
new rows of each table become one more immutable part under ``<run>/parts/``
(see RunFolder), so a driver killed outright loses at most its last second.
The parts are compacted into ``metrics.parquet``, ``events.parquet`` and
``timeline.parquet`` whenever they hold as many rows as the file (or number
``compact_parts``) and at the end of every run, which leaves single files.
``read_log`` is the one way to read them: file plus parts, so a run whose
driver was killed before compacting reads whole.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import pandas as pd
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
    ("bytes_intra", pa.int64()),  # bytes_sent by calls whose ranks share one node ...
    ("bytes_inter", pa.int64()),  # ... and by calls that cross nodes (the scenario's per_node, or Ray's nodes)
    ("comm_intra_s", pa.float64()),  # time an intra-node call was in flight (comm_s split by link class;
    ("comm_inter_s", pa.float64()),  # the two overlap where calls of both classes are in flight at once)
    ("samples", pa.int64()),
    ("tokens", pa.int64()),
    ("peak_mem_bytes", pa.int64()),
    ("wall_time", pa.float64()),  # unix time at the end of the step
])
METRIC_COLUMNS = METRIC_SCHEMA.names
_INT_COLUMNS = {f.name for f in METRIC_SCHEMA if pa.types.is_integer(f.type)}
LOGS = ("metrics", "events", "timeline")  # each <name>.parquet, plus its parts while a run writes it

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


def metrics_table(rows: list[dict]) -> pa.Table:
    """Rows as a table: the required columns typed, strategy or workload extras
    (float64) after them by name, rows by (step, rank), attempts in order."""
    extras = sorted({k for r in rows for k in r} - set(METRIC_COLUMNS))
    # an integer column read back through pandas holds NaN where it was empty (an older run's)
    rows = [{k: None if k in _INT_COLUMNS and v != v else v for k, v in r.items()} for r in rows]
    table = pa.Table.from_pylist(rows, schema=METRIC_SCHEMA)
    for name in extras:
        table = table.append_column(name, pa.array([r.get(name) for r in rows], type=pa.float64()))
    return _arrange_metrics(table)


def _arrange_metrics(table: pa.Table) -> pa.Table:
    for field in METRIC_SCHEMA:  # a run written before a column existed reads with it empty
        if field.name not in table.column_names:
            table = table.append_column(field, pa.nulls(len(table), type=field.type))
    extras = sorted(set(table.column_names) - set(METRIC_COLUMNS))
    return table.select(METRIC_COLUMNS + extras).sort_by([("step", "ascending"), ("rank", "ascending")])  # stable


def read_log(folder: RunFolder, name: str) -> pd.DataFrame | None:
    """A run's ``metrics``, ``events`` or ``timeline`` as written so far (compacted
    file and parts alike: mid-run, or after the driver was killed); None when
    the run has none. Every reader of a run folder goes through here."""
    table = folder.read_log(name)
    if table is None:
        return None
    return (_arrange_metrics(table) if name == "metrics" else table).to_pandas()


def missing_steps(metrics: pd.DataFrame, up_to_step: int) -> list[int]:
    """Steps 1..up_to_step that the final-attempt view does not hold whole: no
    row, or rows from fewer ranks than that attempt ran."""
    if "attempt" not in metrics:
        metrics = metrics.assign(attempt=0.0)
    world = metrics.groupby("attempt")["rank"].max() + 1
    final = final_attempt(metrics)
    ranks = final.groupby("step").agg(n=("rank", "nunique"), attempt=("attempt", "first"))
    whole = {int(step) for step, r in ranks.iterrows() if r.n == world[r.attempt]}
    return [s for s in range(1, up_to_step + 1) if s not in whole]


def _ranges(steps: list[int]) -> str:
    """[3, 4, 5, 9] -> '3-5, 9'"""
    runs: list[list[int]] = []
    for s in steps:
        if runs and s == runs[-1][1] + 1:
            runs[-1][1] = s
        else:
            runs.append([s, s])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)


class MetricsLog:
    """The driver's tables of one run: every row stays in memory (it is the
    whole truth of what the compacted files hold) and goes to storage as a part
    within ``flush_every_s`` (see the module's docstring)."""

    def __init__(self, folder: RunFolder, *, run_id: str, workload: str, strategy: str, scenario: str,
                 flush_every_s: float = 1.0, compact_parts: int = 32, clock: Callable[[], float] = time.monotonic):
        self.folder = folder
        self.const = {"run_id": run_id, "workload": workload, "strategy": strategy, "scenario": scenario}
        self.rows: list[dict] = []
        self.events: list[dict] = []
        self.timeline: list[dict] = []
        self.flush_every_s, self.compact_parts, self.clock = flush_every_s, compact_parts, clock
        self._last_sync = clock()
        self._stored = dict.fromkeys(LOGS, 0)  # rows of each table on storage (parts or file)
        self._parts = dict.fromkeys(LOGS, 0)  # parts written since the last compaction
        self._compacted: dict[str, int | None] = dict.fromkeys(LOGS)  # rows at the last compaction; None: never

    def _table(self, name: str, rows: list[dict]) -> pa.Table:
        if name == "metrics":
            return metrics_table(rows)
        return pa.Table.from_pylist(rows, schema=EVENT_SCHEMA if name == "events" else TIMELINE_SCHEMA)

    def _rows(self, name: str) -> list[dict]:
        return {"metrics": self.rows, "events": self.events, "timeline": self.timeline}[name]

    def keep_history(self, *, up_to_step: int) -> list[int]:
        """Resuming in this run folder: keep its metric rows (and timeline) up to the
        checkpoint's step (later ones are redone) and all its events, parts of a
        killed driver included, compacted now. Steps up to the checkpoint whose
        rows never reached storage are named in a ``gap`` event and returned."""
        metrics = read_log(self.folder, "metrics")
        gaps = []
        if metrics is not None and len(metrics):  # a run folder with no rows is another run's checkpoint
            metrics = metrics[metrics.step <= up_to_step]
            self.rows[:] = metrics.to_dict("records")
            gaps = missing_steps(metrics, up_to_step)
        events, timeline = read_log(self.folder, "events"), read_log(self.folder, "timeline")
        self.events[:] = [] if events is None else events.to_dict("records")
        self.timeline[:] = [] if timeline is None else timeline[timeline.step <= up_to_step].to_dict("records")
        if gaps:
            self.event("gap", step=gaps[0], detail=f"step(s) {_ranges(gaps)}: no metric rows (lost before they "
                       f"reached storage); resumed from step {up_to_step}")
        for name in LOGS:  # storage now holds exactly this history: redone steps' old rows are gone
            if self._rows(name) or name != "timeline" or timeline is not None:
                self._compact(name)
        return gaps

    def add_row(self, row: dict) -> None:
        self.rows.append({**self.const, **row})

    def add_timeline(self, step: int, rank: int, actions: list[tuple[str, float, float]]) -> None:
        run_id = self.const["run_id"]
        self.timeline += [{"run_id": run_id, "step": step, "rank": rank, "action": a, "start": t0, "end": t1}
                          for a, t0, t1 in actions]

    def event(self, kind: str, *, rank: int = -1, step: int = -1, seconds: float = float("nan"), detail: str = "") -> None:
        self.events.append({
            "run_id": self.const["run_id"], "wall_time": time.time(), "kind": kind,
            "rank": rank, "step": step, "seconds": seconds, "detail": detail,
        })

    def sync(self) -> None:
        """Every row made so far is on storage: the new rows of each table as one part."""
        for name in LOGS:
            rows = self._rows(name)
            if len(rows) > self._stored[name]:
                self.folder.append_part(name, self._table(name, rows[self._stored[name]:]))
                self._stored[name], self._parts[name] = len(rows), self._parts[name] + 1
        self._last_sync = self.clock()

    def maybe_flush(self) -> None:
        """From the controller's loop: new rows to storage once ``flush_every_s`` has
        passed, and a compaction where the parts hold as many rows as the file
        (so rewriting costs O(rows) over the run) or number ``compact_parts``."""
        if self.clock() - self._last_sync < self.flush_every_s:
            return
        self.sync()
        for name in LOGS:
            held = self._compacted[name] or 0
            if self._parts[name] and (self._parts[name] >= self.compact_parts or self._stored[name] >= 2 * held):
                self._compact(name)

    def flush(self) -> None:
        """Everything on storage as single files: ``metrics.parquet`` and
        ``events.parquet`` always, ``timeline.parquet`` when there is a timeline."""
        self.sync()
        for name in LOGS:
            if self._parts[name] or self._compacted[name] is None and (name != "timeline" or self.timeline):
                self._compact(name)

    def _compact(self, name: str) -> None:
        rows = self._rows(name)
        self.folder.compact(name, self._table(name, rows))
        self._stored[name] = self._compacted[name] = len(rows)
        self._parts[name] = 0


WARMUP_STEPS = 3  # first steps carry one-off costs (allocation, DDP bucket rebuild)

# Every figure a summary or report shows, defined once (the report's header and docs/reports.md show this text).
DEFINITIONS = (
    "step = the slowest rank's step_time_s of each step; step, tokens/s (samples/s for a model without tokens) "
    "and the compute / idle / comm parts are over the steady steps (after the warm-up: max(3, the strategy's "
    "declared warm-up) steps; a run no longer "
    "than that: all its steps); step is the median of those steps; compute + idle = step, each part its share "
    "of the slowest rank's steady time (idle: blocked in communication no compute hid, or waiting for data); "
    "comm = collectives in flight, the same share of step (it overlaps compute); time to target = training "
    "time (wall clock since the first step began, evaluation excluded) to the first evaluated step at or below "
    "the target; bytes are sent per rank: steady = mean per steady step, whole run = total over every step")


def declared_warmup(strategy) -> int:
    """The warm-up steps a strategy declares (``Strategy.declared_warmup``) for a spec's
    ``strategy`` section (``{name, **options}`` or a name); 0 when the strategy
    cannot be resolved here (a plugin this machine cannot import)."""
    from strategies import STRATEGIES

    component = {"name": strategy} if isinstance(strategy, str) else dict(strategy)
    name = component.pop("name")
    try:
        cls = STRATEGIES.get(name)
        return int(cls.declared_warmup(cls.Options(**component)))
    except Exception:  # an unknown plugin, options of an older version: no declared warm-up
        return 0


def steady(metrics: pd.DataFrame, declared: int = 0) -> pd.DataFrame:
    """The rows of a run's steady steps: after max(WARMUP_STEPS, ``declared``); a run no
    longer than that has no steady state and all its rows stand for it."""
    after = max(WARMUP_STEPS, declared)
    return metrics[metrics.step > after] if metrics.step.max() > after else metrics


def slowest_ranks(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per step, the row of the rank whose step took longest (its parts add up to the step)."""
    return metrics.loc[metrics.groupby("step").step_time_s.idxmax()]


def run_start(m: pd.DataFrame) -> float:
    """Unix time the run's first step began (its earliest rank)."""
    first = m[m.step == m.step.min()]
    return float((first.wall_time - first.step_time_s).min())


def per_step_max(m: pd.DataFrame, column: str) -> pd.Series:
    """``column``'s max over ranks per step, 0 where absent (older runs) or NaN."""
    if column not in m:
        return pd.Series(0.0, index=sorted(m.step.unique()))
    return m.groupby("step")[column].max().fillna(0.0)


def train_clock(m: pd.DataFrame) -> pd.Series:
    """Per step, seconds of training since the run began: the step's last rank's
    wall_time (taken at the end of the step, before its evaluation) less the
    evaluation time of the steps before it (each step's slowest evaluating rank)."""
    evals_before = per_step_max(m, "eval_s").cumsum().shift(fill_value=0.0)
    return m.groupby("step").wall_time.max() - run_start(m) - evals_before


def quality_curve(m: pd.DataFrame) -> pd.DataFrame:
    """Per step: training loss (samples-weighted), held-out loss (NaN between
    evaluations, or without any) and training time (``train_clock``)."""
    clock = train_clock(m)
    rows = [{"step": int(s), "time_s": float(clock[s]), "loss": samples_mean(g.loss, g.samples),
             "val_loss": float(g.val_loss.mean()) if "val_loss" in g else float("nan")}
            for s, g in m.groupby("step")]
    return pd.DataFrame(rows)


def _last_value(m: pd.DataFrame, column: str) -> float:
    """The last step's value of a column every rank carries alike (NaN if absent)."""
    if column not in m:
        return float("nan")
    last = m[m.step == m.step.max()][column].dropna()
    return float(last.mean()) if len(last) else float("nan")


def summarize(metrics, *, warmup_steps: int = 0) -> dict:
    """One run's headline figures from its metrics rows, by DEFINITIONS
    (``warmup_steps``: what the strategy declares, see ``declared_warmup``)."""
    metrics = final_attempt(metrics)
    rows = steady(metrics, warmup_steps)
    slow = slowest_ranks(rows)
    step_s = float(slow.step_time_s.median())
    busy = float(slow.step_time_s.sum())
    share = (lambda col: float(slow[col].sum()) / busy) if busy > 0 else (lambda col: 0.0)
    idle = step_s * share("idle_s")
    per_step = rows.groupby("step").agg(samples=("samples", "sum"), tokens=("tokens", "sum"))
    last = metrics[metrics.step == metrics.step.max()]
    ranks = int(metrics["rank"].nunique())
    row = {
        "run_id": metrics.run_id.iloc[0], "workload": metrics.workload.iloc[0],
        "strategy": metrics.strategy.iloc[0], "scenario": metrics.scenario.iloc[0],
        "workers": ranks, "steps": int(metrics.step.max()),
        "warmup_steps": max(WARMUP_STEPS, warmup_steps), "steady_steps": int(rows.step.nunique()),
        "final_loss": samples_mean(last.loss, last.samples),
        "final_val_loss": _last_value(metrics, "val_loss"),
        "final_val_spread": _last_value(metrics, "val_spread"),
        "median_step_s": step_s,
        "samples_per_s": float(per_step.samples.sum() / busy) if busy > 0 else float("nan"),
        "tokens_per_s": float(per_step.tokens.sum() / busy) if busy > 0 else float("nan"),
        "bytes_sent_per_step": float(rows.bytes_sent.mean()),  # steady, per rank
        "bytes_sent_run_per_rank": float(metrics.bytes_sent.sum()) / ranks,  # whole run, warm-up included
        "compute_s_per_step": step_s - idle,
        "comm_s_per_step": step_s * share("comm_s"),
        "idle_s_per_step": idle,
        "train_s": float(train_clock(metrics).iloc[-1]),
        "eval_s": float(per_step_max(metrics, "eval_s").sum()),
        "load_avg": float(metrics.load_avg.median()) if "load_avg" in metrics else float("nan"),
        "load_avg_max": float(metrics.load_avg.max()) if "load_avg" in metrics else float("nan"),
        "peak_mem_bytes": int(metrics.peak_mem_bytes.max()),
    }
    if "accuracy" in metrics:
        row["final_accuracy"] = samples_mean(last.accuracy, last.samples)
    if "val_accuracy" in metrics:
        row["final_val_accuracy"] = _last_value(metrics, "val_accuracy")
    return row


def quality(summary: dict) -> tuple[str, float]:
    """What quality is judged by: the final held-out loss where the run evaluated,
    else the final training loss."""
    val = summary.get("final_val_loss", math.nan)
    return ("loss", summary["final_loss"]) if math.isnan(val) else ("val_loss", val)
