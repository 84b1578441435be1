"""Comparison reports: run folders in, one self-contained report.html and a report.md out.

Everything is read through fsspec + pyarrow (RunFolder), so run folders on
``memory://`` or ``s3://`` render like local ones. Every number in a table is
computed here from the run's metrics.parquet (by ``metrics.summarize``); plots
(``orchestrator/plots.py``) are matplotlib (Agg) PNGs embedded as base64, so the
HTML file travels alone.
"""
from __future__ import annotations

import html
import math
import os
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pandas as pd
import yaml

from orchestrator.compare import strategy_label
from orchestrator.config import ConfigError, ProjectOn
from orchestrator.metrics import (DEFINITIONS, declared_warmup, final_attempt, quality, quality_curve, read_log,
                                  summarize)
from orchestrator.storage import RunFolder, check_writable


@dataclass
class Run:
    url: str
    label: str  # strategy with its options, e.g. powersgd:rank=4
    scenario: str
    metrics: pd.DataFrame  # final attempt only
    events: pd.DataFrame
    timeline: pd.DataFrame | None
    warmup_steps: int = 0  # the strategy's declared warm-up (metrics.declared_warmup)
    repeat: int = 0  # which pass of a compare --repeat matrix (0-based)
    setting: str = ""  # the --tune grid point it ran at ("" untuned)
    optimizer: str = ""  # the update rule it ran with, e.g. "adamw lr=0.003" (optimizer_of)


def optimizer_of(spec: dict) -> str:
    """The update rule a run's spec.yaml says it used: a method's own (demo's sign
    step; a compressor's ``optimizer``/``lr``) over the job's ``optim``."""
    strategy = spec.get("strategy") or {}
    strategy = {"name": strategy} if isinstance(strategy, str) else strategy
    optim = spec.get("optim") or {}
    lr = strategy.get("lr") or optim.get("lr", 1e-3)
    if strategy.get("name") == "demo" or strategy.get("outer") == "demo":
        return f"demo sign step lr={lr:g}"
    name = strategy.get("optimizer") or optim.get("name", "adamw")
    if name == "sgd":
        return f"sgd lr={lr:g} momentum={strategy.get('momentum') or optim.get('momentum', 0.9):g}"
    return f"{name} lr={lr:g}"


@dataclass
class Failure:
    """A combination that did not produce a usable run (its error, one line)."""

    label: str
    scenario: str
    error: str
    url: str | None = None


@dataclass
class Tuned:
    """One grid point of one strategy's tuning (compare --tune): its short run."""

    label: str  # the strategy before tuning
    setting: str  # the grid point, e.g. optim.lr=1e-3,strategy.lr=3e-3
    run: Run | None  # None: it failed
    error: str = ""
    wall_s: float = 0.0
    chosen: bool = False


@dataclass
class Report:
    runs: list[Run]
    failures: list[Failure] = field(default_factory=list)
    target_loss: float | None = None  # None: per scenario, the worst final quality (every run reaches it)
    tuning: list[Tuned] = field(default_factory=list)
    tuning_note: str = ""  # how the grid ran (budget, scenario)
    projection: Any = None  # orchestrator.project.Section: the runs projected on a target cluster
    projection_note: str = ""  # why there is none

    @property
    def scenarios(self) -> list[str]:
        seen = [r.scenario for r in self.runs] + [f.scenario for f in self.failures]
        return list(dict.fromkeys(seen))


def load_run(url: str, *, repeat: int = 0, setting: str = "") -> Run:
    """One run folder; a ConfigError (one line) when it has no metrics."""
    folder = RunFolder.from_url(url)
    try:
        metrics = read_log(folder, "metrics")
    except Exception as e:  # unknown protocol, missing credentials, ...
        raise ConfigError(f"run folder {url!r}: cannot read ({type(e).__name__}: {e})") from None
    if metrics is None:
        raise ConfigError(f"run folder {url!r}: no metrics.parquet (not a run folder, or no step finished)")
    metrics = final_attempt(metrics)
    if metrics.empty:
        raise ConfigError(f"run folder {url!r}: metrics.parquet has no rows (no step finished)")
    spec = {}
    if folder.exists("spec.yaml"):
        with folder.fs.open(f"{folder.path}/spec.yaml", "rb") as f:
            spec = yaml.safe_load(f.read()) or {}
    events = read_log(folder, "events")
    if events is None:
        events = pd.DataFrame(columns=["wall_time", "kind", "rank", "step", "seconds", "detail"])
    timeline = read_log(folder, "timeline")
    label = strategy_label(spec["strategy"]) if "strategy" in spec else str(metrics.strategy.iloc[0])
    warmup = declared_warmup(spec["strategy"]) if "strategy" in spec else 0
    return Run(url=folder.url, label=label, scenario=str(metrics.scenario.iloc[0]), metrics=metrics,
               events=events, timeline=timeline, warmup_steps=warmup, repeat=repeat, setting=setting,
               optimizer=optimizer_of(spec) if spec else "")


@dataclass
class Sources:
    """What the report is made of: run folders (with their repeat and tuned setting),
    failed combinations, and a compare's tuning records (matrix.yaml)."""

    runs: list[tuple[str, int, str]] = field(default_factory=list)  # (url, repeat, setting)
    failures: list[Failure] = field(default_factory=list)
    tuning: list[dict] = field(default_factory=list)
    tuning_note: str = ""


def expand_urls(urls: list[str]) -> Sources:
    """Run folder URLs; a compare output folder (holding matrix.yaml) stands for
    its successful runs, its failed combinations (as Failures) and its tuning."""
    src = Sources()
    for url in urls:
        fs, path = fsspec.core.url_to_fs(url)
        matrix = f"{path.rstrip('/')}/matrix.yaml"
        if not fs.exists(matrix):
            src.runs.append((url, 0, ""))
            continue
        with fs.open(matrix, "rb") as f:
            doc = yaml.safe_load(f.read())
        for c in doc["combinations"]:
            if c["status"] == "ok":
                src.runs.append((c["url"], c.get("repeat", 0), c.get("setting", "")))
            else:
                src.failures.append(Failure(label=c["label"], scenario=c["scenario"], error=c["error"], url=c["url"]))
        src.tuning += doc.get("tuning") or []
        src.tuning_note = doc.get("tuning_note") or src.tuning_note
    return src


def build_report(src: Sources, *, target_loss: float | None = None) -> Report:
    runs = [load_run(u, repeat=rep, setting=setting) for u, rep, setting in src.runs]
    seen: dict[tuple, int] = {}
    for r in runs:  # folders of one strategy and scenario given apart (no matrix.yaml) are its repeats
        key = (r.label, r.scenario, r.setting)
        r.repeat = max(r.repeat, seen.get(key, 0))
        seen[key] = r.repeat + 1
    tuning = [Tuned(label=t["label"], setting=t["setting"], error=t.get("error", ""), wall_s=t.get("wall_s", 0.0),
                    chosen=t.get("chosen", False), run=load_run(t["url"]) if t["status"] == "ok" else None)
              for t in src.tuning]
    return Report(runs=runs, failures=src.failures, target_loss=target_loss, tuning=tuning,
                  tuning_note=src.tuning_note)


# -- numbers ---------------------------------------------------------------

# figures whose spread over repeats is shown (medians of the repeats, min-max beside)
SPREAD = ("time_to_target_s", "tokens_per_s", "samples_per_s", "step_s", "compute_s", "comm_s", "idle_s", "train_s",
          "load_avg")
QUALITY_NAME = {"val_loss": "held-out loss", "loss": "training loss"}


def display_label(run: Run) -> str:
    """The strategy with the tuned setting it ran at, less what its label already shows (strategy.*)."""
    shown = [kv for kv in run.setting.split(",") if kv and not kv.startswith("strategy.")]
    return run.label + (f" [{','.join(shown)}]" if shown else "")


def run_rows(report: Report, scenario: str) -> pd.DataFrame:
    """One row per run of the scenario: its summary figures and time to the target.
    Quality is the held-out loss when every run evaluated, else the training loss
    (``attrs['by']``; ``attrs['unevaluated']``: the runs without held-out loss)."""
    runs = [r for r in report.runs if r.scenario == scenario]
    if not runs:
        return pd.DataFrame()
    sums = [summarize(r.metrics, warmup_steps=r.warmup_steps) for r in runs]
    unevaluated = list(dict.fromkeys(display_label(r) for r, s in zip(runs, sums) if quality(s)[0] != "val_loss"))
    by = "loss" if unevaluated else "val_loss"
    finals = [s["final_val_loss"] if by == "val_loss" else s["final_loss"] for s in sums]
    target = max(finals) if report.target_loss is None else report.target_loss
    rows = []
    for r, s in zip(runs, sums):
        curve = quality_curve(r.metrics)
        reached = curve[curve[by] <= target]
        rows.append({
            "strategy": display_label(r), "scenario": r.scenario, "run_id": str(s["run_id"]), "url": r.url,
            "repeat": r.repeat, "setting": r.setting, "optimizer": r.optimizer, "workers": s["workers"],
            "steps": s["steps"],
            "warmup_steps": s["warmup_steps"], "steady_steps": s["steady_steps"],
            "time_to_target_s": float(reached.time_s.iloc[0]) if len(reached) else math.nan,
            "tokens_per_s": s["tokens_per_s"], "samples_per_s": s["samples_per_s"], "step_s": s["median_step_s"],
            "compute_s": s["compute_s_per_step"], "comm_s": s["comm_s_per_step"], "idle_s": s["idle_s_per_step"],
            "bytes_per_step": s["bytes_sent_per_step"],  # per rank, steady
            "bytes_run": s["bytes_sent_run_per_rank"],  # per rank, whole run
            "peak_mem_bytes": s["peak_mem_bytes"], "final_loss": s["final_loss"],
            "final_val_loss": s["final_val_loss"], "final_val_spread": s["final_val_spread"],
            "train_s": s["train_s"], "eval_s": s["eval_s"],
            "load_avg": s["load_avg"], "load_avg_max": s["load_avg_max"],
            "batch": float(r.metrics.groupby("step").samples.sum().median()),  # global samples a step
        })
    df = pd.DataFrame(rows)
    df.attrs.update(by=by, target=target, unevaluated=unevaluated)
    return df


def scenario_table(report: Report, scenario: str) -> pd.DataFrame:
    """The ranking for one scenario, one row per strategy: the median of its repeats
    (``<figure>_lo``/``_hi``: their min and max), fastest to the target first, then
    by throughput; ``noise`` compares each row's time to target with the row above."""
    runs = run_rows(report, scenario)
    if runs.empty:
        return runs
    rows = []
    for label, g in runs.groupby("strategy", sort=False):
        row = {"strategy": label, "repeats": len(g), "optimizer": g.optimizer.iloc[0]}
        for key in g.columns.drop(["strategy", "scenario", "run_id", "url", "repeat", "setting", "optimizer"]):
            row[key] = float(g[key].median(skipna=False))  # a repeat that never reached the target: not reached
        row.update({f"{k}_{end}": float(getattr(g[k], fn)(skipna=False)) for k in SPREAD
                    for end, fn in (("lo", "min"), ("hi", "max"))})
        # the parts of the median step are those of the median run(s), so they still add up to it
        middle = g.sort_values("step_s").iloc[[(len(g) - 1) // 2, len(g) // 2]]
        row.update({k: float(middle[k].mean()) for k in ("step_s", "compute_s", "idle_s", "comm_s")})
        rows.append(row)
    df = pd.DataFrame(rows).sort_values(["time_to_target_s", "tokens_per_s", "samples_per_s"],
                                        ascending=[True, False, False], na_position="last").reset_index(drop=True)
    df.insert(0, "rank", range(1, len(df) + 1))
    df["target_loss"] = runs.attrs["target"]
    df["noise"] = [noise(df, i) for i in range(len(df))]
    df.attrs.update(runs.attrs)
    return df


def noise(df: pd.DataFrame, i: int) -> str:
    """Row i's time to target against the row above: within noise when their ranges
    over the repeats overlap; unchecked with one run each."""
    if i == 0 or math.isnan(df.time_to_target_s[i]):
        return ""
    if min(df.repeats[i], df.repeats[i - 1]) < 2:
        return "unchecked"
    return "within noise" if df.time_to_target_s_lo[i] <= df.time_to_target_s_hi[i - 1] else "beyond noise"


def verdict(df: pd.DataFrame) -> str:
    """The scenario's answer in one line: the best strategy by time to the target,
    its margin over the next and whether the margin exceeds the noise."""
    what = QUALITY_NAME[df.attrs["by"]]
    reached = df[df.time_to_target_s.notna()].reset_index(drop=True)
    if reached.empty:
        return f"no strategy reached the target {what} {df.target_loss.iloc[0]:.4f}"
    best = reached.iloc[0]
    first = f"**{best.strategy}** reaches the target {what} first ({best.time_to_target_s:,.3f} s)"
    if len(reached) == 1:
        return first + ("; no other strategy reached it" if len(df) > 1 else " (the only strategy)")
    nxt = reached.iloc[1]
    margin = nxt.time_to_target_s / best.time_to_target_s - 1
    how = {"unchecked": "unchecked for noise (one run each; --repeat 3 checks it)",
           "within noise": f"within noise (their ranges over {int(min(best.repeats, nxt.repeats))} repeats overlap: "
                           f"not a result)",
           "beyond noise": f"beyond the noise (their ranges over {int(min(best.repeats, nxt.repeats))} repeats do "
                           f"not overlap)"}[noise(reached, 1)]
    return f"{first}, {margin:.0%} ahead of **{nxt.strategy}** ({nxt.time_to_target_s:,.3f} s); the margin is {how}"


# -- formatting (the Markdown and HTML tables show the same strings) --------

COLUMNS = [  # (key, header, formatter of one value); SPREAD keys show (min-max) beside with repeats
    ("rank", "#", str),
    ("strategy", "strategy", str),
    ("time_to_target_s", "time to target (s)", lambda v: fmt_num(v, 3)),
    ("tokens_per_s", "tokens/s", lambda v: fmt_num(v, 0)),
    ("step_s", "step (s)", lambda v: fmt_num(v, 4)),
    ("compute_s", "compute (s)", lambda v: fmt_num(v, 4)),
    ("comm_s", "comm (s)", lambda v: fmt_num(v, 4)),
    ("idle_s", "idle (s)", lambda v: fmt_num(v, 4)),
    ("bytes_per_step", "bytes/step/rank (steady)", lambda v: fmt_bytes(v)),
    ("peak_mem_bytes", "peak mem/rank", lambda v: fmt_bytes(v)),
    ("final_loss", "final train loss", lambda v: fmt_num(v, 4)),
    ("final_val_loss", "final held-out loss", lambda v: fmt_num(v, 4)),
    ("bytes_run", "bytes/rank (whole run)", lambda v: fmt_bytes(v)),
    ("load_avg", "load (1-min avg)", lambda v: fmt_num(v, 2)),
    ("noise", "vs the row above", str),
]


def fmt_num(v: float, decimals: int) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:,.{decimals}f}"


def fmt_bytes(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(v) >= scale:
            return f"{v / scale:.2f} {unit}"
    return f"{v:.0f} B"


def _cell(row, key: str, fmt) -> str:
    text = fmt(row[key])
    if key in SPREAD and row["repeats"] > 1 and text != "-":
        text += f" ({fmt(row[key + '_lo'])}–{fmt(row[key + '_hi'])})"
    return text


def throughput(df: pd.DataFrame) -> tuple[str, str]:
    """(key, unit) of a ranking's throughput: tokens/s where a run counts tokens, else
    samples/s (an image model)."""
    return ("tokens_per_s", "tokens/s") if (df.tokens_per_s.fillna(0) > 0).any() else ("samples_per_s", "samples/s")


def columns(df: pd.DataFrame) -> list[tuple]:
    key, unit = throughput(df)
    return [(key, unit, f) if k == "tokens_per_s" else (k, h, f) for k, h, f in COLUMNS]


def table_cells(df: pd.DataFrame) -> list[list[str]]:
    cols = columns(df)
    return [[_cell(row, k, f) for k, _, f in cols] for _, row in df.iterrows()]


def scenario_notes(df: pd.DataFrame) -> list[str]:
    """The lines above a scenario's table: the verdict, what quality is, the repeats, the warm-ups."""
    by, repeats = df.attrs["by"], int(df.repeats.max())
    target = f"Target loss {df.target_loss.iloc[0]:.4f} ({QUALITY_NAME[by]}"
    if by == "loss":
        target += f"; ranked by training loss: no held-out evaluation in {', '.join(df.attrs['unevaluated'])})"
    else:
        target += ")"
    spread = (f"{repeats} repeats per strategy, run round-robin; every time figure is the median of the repeats "
              f"with their min–max in brackets (the step's parts: the median run's)" if repeats > 1 else
              "One run per strategy: rankings are unchecked for noise (--repeat N checks them)")
    warm = ", ".join(f"{r.strategy} {int(r.warmup_steps)}" for _, r in df.iterrows())
    notes = [f"Verdict: {verdict(df)}.", f"{target}. {spread}. Warm-up steps left out of steady figures: {warm}."]
    if df.batch.nunique() > 1:  # runs made apart (a compare takes one batch): say per-step figures do not compare
        notes.append("The runs' global batches differ (" + ", ".join(f"{r.strategy} {r.batch:.0f}" for _, r in
                     df.iterrows()) + " samples a step): loss and time per step do not compare between them.")
    replicas = df[df.final_val_spread.notna()]
    if len(replicas):  # gossip: the held-out loss is the replicas' average model's; how far apart they ended
        notes.append("Replicas differ: the held-out loss is that of their average; their own final held-out losses "
                     "span " + ", ".join(f"{r.strategy} {r.final_val_spread:.4f}" for _, r in replicas.iterrows())
                     + " (max − min).")
    return notes


def tuning_rows(report: Report) -> list[list[str]]:
    """Every grid point's short run: strategy, setting, final held-out and training loss, seconds, chosen."""
    out = []
    for t in sorted(report.tuning, key=lambda t: t.label):  # grouped by strategy, in the order they ran
        s = summarize(t.run.metrics, warmup_steps=t.run.warmup_steps) if t.run else None
        out.append([t.label, t.setting, fmt_num(s["final_val_loss"], 4) if s else "-",
                    fmt_num(s["final_loss"], 4) if s else "-", fmt_num(t.wall_s, 1),
                    "chosen" if t.chosen else ("failed: " + t.error if t.run is None else "")])
    return out


TUNING_HEADER = ["strategy", "setting", "final held-out loss", "final train loss", "run (s)", "result"]
RUNS_HEADER = ["strategy", "scenario", "repeat", "optimizer", "training (s)", "evaluation (s)", "load median (max)", "run folder"]


def tuning_cost(report: Report) -> str:
    return f"{len(report.tuning)} runs, {sum(t.wall_s for t in report.tuning):,.1f} s"


def runs_rows(report: Report) -> list[list[str]]:
    """Every run with the machine's load over it (os.getloadavg()[0] sampled after each step)."""
    out = []
    for sc in report.scenarios:
        df = run_rows(report, sc)
        for _, r in (df.iterrows() if len(df) else []):
            out.append([r.strategy, sc, str(int(r["repeat"]) + 1), r.optimizer or "-", fmt_num(r.train_s, 1),
                        fmt_num(r.eval_s, 1),
                        "-" if math.isnan(r.load_avg) else f"{r.load_avg:.2f} ({r.load_avg_max:.2f})", r.url])
    return out


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
            + ["| " + " | ".join(cells) + " |" for cells in rows] + [""])


def render_markdown(report: Report) -> str:
    lines = ["# polytrain comparison report", "", f"Definitions: {DEFINITIONS}.", ""]
    if report.tuning:
        lines += ["## Tuning", "", f"{report.tuning_note} Cost: {tuning_cost(report)}.", ""]
        lines += _md_table(TUNING_HEADER, tuning_rows(report))
    for sc in report.scenarios:
        df = scenario_table(report, sc)
        lines += [f"## Scenario `{sc}`", ""]
        if len(df):
            lines += [ln for note in scenario_notes(df) for ln in (note, "")]
            lines += _md_table([h for _, h, _ in columns(df)], table_cells(df))
        for f in report.failures:
            if f.scenario == sc:
                lines.append(f"- **{f.label} failed**: {f.error}" + (f" ({f.url})" if f.url else ""))
        lines.append("")
    if report.projection is not None:
        lines += [report.projection.markdown(), ""]
    elif report.projection_note:
        lines += ["## Projection", "", report.projection_note, ""]
    lines += ["## Runs", ""] + _md_table(RUNS_HEADER, runs_rows(report))
    return "\n".join(lines)


# -- HTML --------------------------------------------------------------------

_CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;font-size:13px;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:nth-child(2),th:nth-child(2){text-align:left}"
        "th{background:#f3f3f3}.fail{color:#b00}figure{margin:1em 0}figcaption{font-size:12px;color:#555}")


def _html_table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in cells) + "</tr>" for cells in rows)
    return f"<table class='{cls}'><tr>{head}</tr>{body}</table>"


def _html_text(line: str) -> str:
    """A Markdown note line as HTML (only **bold** is used)."""
    parts = html.escape(line).split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


def render_html(report: Report, plots: dict[str, list[tuple[str, str]]]) -> str:
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>polytrain comparison</title>"
             f"<style>{_CSS}</style></head><body><h1>polytrain comparison report</h1>",
             f"<p class='defs'>Definitions: {e(DEFINITIONS)}.</p>"]
    if report.tuning:
        parts += [f"<h2>Tuning</h2><p>{e(report.tuning_note)} Cost: {e(tuning_cost(report))}.</p>",
                  _html_table(TUNING_HEADER, tuning_rows(report), "tuning")]
    for sc in report.scenarios:
        parts.append(f"<h2>Scenario <code>{e(sc)}</code></h2>")
        df = scenario_table(report, sc)
        if len(df):
            parts += [f"<p>{_html_text(note)}</p>" for note in scenario_notes(df)]
            parts.append(_html_table([h for _, h, _ in columns(df)], table_cells(df), "ranking"))
        for f in report.failures:
            if f.scenario == sc:
                parts.append(f"<p class='fail'><b>{e(f.label)} failed</b>: {e(f.error)}</p>")
        parts += _figures(plots.get(sc, []))
    for section in ("pipeline Gantt charts", "failures, restarts and stragglers"):
        if section in plots:
            parts.append(f"<h2>{e(section)}</h2>")
            parts += _figures(plots[section])
    if report.projection is not None:
        p = report.projection
        parts += ["<h2>Projection</h2>", f"<p>{_html_text(p.intro)}</p>", _html_table(p.header, p.rows, "projection")]
        parts += [f"<p>{_html_text(n)}</p>" for n in p.notes] + _figures(p.plots)
    elif report.projection_note:
        parts += ["<h2>Projection</h2>", f"<p>{_html_text(report.projection_note)}</p>"]
    parts += ["<h2>Runs</h2>", _html_table(RUNS_HEADER, runs_rows(report), "runs"), "</body></html>"]
    return "\n".join(parts)


def _figures(items: list[tuple[str, str]]) -> list[str]:
    return [f"<figure><img alt='{html.escape(cap)}' src='data:image/png;base64,{b64}'>"
            f"<figcaption>{html.escape(cap)}</figcaption></figure>" for cap, b64 in items]


def write_report(report: Report, out: str) -> tuple[str, str]:
    """Write report.html and report.md under ``out`` (a path or fsspec URL); returns both URLs."""
    from orchestrator.plots import make_plots  # it draws from this module's tables

    if not report.runs and not report.failures:
        raise ConfigError("report: no runs to report")
    plots = make_plots(report)
    fs, path = fsspec.core.url_to_fs(out if "://" in out else os.path.abspath(out))
    fs.makedirs(path, exist_ok=True)
    urls = []
    for name, text in (("report.html", render_html(report, plots)), ("report.md", render_markdown(report))):
        fs.pipe_file(f"{path}/{name}", text.encode())
        urls.append(f"{out.rstrip('/')}/{name}")
    return urls[0], urls[1]


def project_runs(report: Report, urls: list[str], on: ProjectOn) -> None:
    """The report's projection section: its own runs on ``on``'s cluster. A strategy or
    workload the model cannot project leaves a one-line note, not a failed report."""
    scenario = on.scenario if on.scenario is not None else (report.scenarios or ["local"])[0]
    if scenario == "none" or not report.runs:
        return
    from orchestrator.project import report_section

    try:
        report.projection = report_section(urls, None if scenario == "local" and on.speed is None else scenario,
                                           speed=on.speed, workers=on.workers)
    except ConfigError:
        raise
    except Exception as e:  # a composition the model does not cover: the tables still stand
        report.projection_note = f"Not projected: {(str(e).splitlines() or [type(e).__name__])[0]}"


def report_from_urls(urls: list[str], out: str, *, target_loss: float | None = None,
                     project_on: ProjectOn | None = None) -> tuple[str, str]:
    """`polytrain report RUN_DIR... --out DIR` (and the report a compare writes)."""
    if not urls:
        raise ConfigError("report: give at least one run folder")
    report = build_report(expand_urls(urls), target_loss=target_loss)
    check_writable(out, "--out")  # before the projection's profiling
    project_runs(report, urls, project_on or ProjectOn())
    return write_report(report, out)
