"""Comparison reports: run folders in, one self-contained report.html and a report.md out.

Everything is read through fsspec + pyarrow (RunFolder), so run folders on
``memory://`` or ``s3://`` render like local ones. Every number in a table is
computed here from the run's metrics.parquet; plots are matplotlib (Agg)
PNGs embedded as base64, so the HTML file travels alone.
"""
from __future__ import annotations

import base64
import html
import io
import math
import os
import tempfile
from dataclasses import dataclass, field

import fsspec
import pandas as pd
import yaml

from orchestrator.config import ConfigError
from orchestrator.metrics import WARMUP_STEPS, final_attempt, read_log, samples_mean, summarize
from orchestrator.storage import RunFolder

# event kinds drawn on the failure timeline (prefix match)
TIMELINE_KINDS = ("failure", "restart", "recovered", "straggler", "evict", "inject", "decision", "resume")


@dataclass
class Run:
    url: str
    label: str  # strategy with its options, e.g. powersgd:rank=4
    scenario: str
    metrics: pd.DataFrame  # final attempt only
    events: pd.DataFrame
    timeline: pd.DataFrame | None


@dataclass
class Failure:
    """A combination that did not produce a usable run (its error, one line)."""

    label: str
    scenario: str
    error: str
    url: str | None = None


@dataclass
class Report:
    runs: list[Run]
    failures: list[Failure] = field(default_factory=list)
    target_loss: float | None = None  # None: per scenario, the worst final loss (every run reaches it)

    @property
    def scenarios(self) -> list[str]:
        seen = [r.scenario for r in self.runs] + [f.scenario for f in self.failures]
        return list(dict.fromkeys(seen))


def strategy_label(strategy) -> str:
    """``{name: powersgd, rank: 4}`` -> ``powersgd:rank=4`` (the --strategies syntax)."""
    if isinstance(strategy, str):
        return strategy
    opts = {k: v for k, v in strategy.items() if k != "name"}
    return strategy["name"] + (":" + ",".join(f"{k}={v}" for k, v in opts.items()) if opts else "")


def load_run(url: str) -> Run:
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
    return Run(url=folder.url, label=label, scenario=str(metrics.scenario.iloc[0]), metrics=metrics,
               events=events, timeline=timeline)


def expand_urls(urls: list[str]) -> tuple[list[str], list[Failure]]:
    """Run folder URLs; a compare output folder (holding matrix.yaml) stands for
    its successful runs, and its failed combinations come back as Failures."""
    out, failures = [], []
    for url in urls:
        fs, path = fsspec.core.url_to_fs(url)
        matrix = f"{path.rstrip('/')}/matrix.yaml"
        if not fs.exists(matrix):
            out.append(url)
            continue
        with fs.open(matrix, "rb") as f:
            for c in yaml.safe_load(f.read())["combinations"]:
                if c["status"] == "ok":
                    out.append(c["url"])
                else:
                    failures.append(Failure(label=c["label"], scenario=c["scenario"], error=c["error"], url=c["url"]))
    return out, failures


# -- numbers ---------------------------------------------------------------

def run_start(m: pd.DataFrame) -> float:
    """Unix time the run's first step began (its earliest rank)."""
    first = m[m.step == m.step.min()]
    return float((first.wall_time - first.step_time_s).min())


def loss_curve(m: pd.DataFrame) -> pd.DataFrame:
    """Per step: loss (samples-weighted over reporting ranks) and seconds since the run began."""
    t0 = run_start(m)
    rows = [{"step": int(s), "loss": samples_mean(g.loss, g.samples), "time_s": float(g.wall_time.max()) - t0}
            for s, g in m.groupby("step")]
    return pd.DataFrame(rows)


def summary_row(run: Run, target: float) -> dict:
    """``summarize``'s figures under the report's column names, plus the time to the target loss."""
    m = run.metrics
    s = summarize(m)
    curve = loss_curve(m)
    reached = curve[curve.loss <= target]
    return {
        "strategy": run.label, "scenario": run.scenario, "run_id": str(s["run_id"]),
        "workers": s["workers"], "steps": s["steps"],
        "time_to_target_s": float(reached.time_s.iloc[0]) if len(reached) else math.nan,
        "tokens_per_s": s["tokens_per_s"], "samples_per_s": s["samples_per_s"], "step_s": s["median_step_s"],
        "compute_s": s["compute_s_per_step"], "comm_s": s["comm_s_per_step"], "idle_s": s["idle_s_per_step"],
        "bytes_per_step": s["bytes_sent_per_step"],  # per rank
        "peak_mem_bytes": s["peak_mem_bytes"], "final_loss": s["final_loss"],
    }


def scenario_table(report: Report, scenario: str) -> pd.DataFrame:
    """The ranking for one scenario: fastest to the target loss first, then by throughput."""
    runs = [r for r in report.runs if r.scenario == scenario]
    if not runs:
        return pd.DataFrame()
    target = report.target_loss
    if target is None:
        target = max(loss_curve(r.metrics).loss.iloc[-1] for r in runs)
    df = pd.DataFrame([summary_row(r, target) for r in runs])
    df["target_loss"] = target
    df = df.sort_values(["time_to_target_s", "tokens_per_s"], ascending=[True, False], na_position="last")
    df.insert(0, "rank", range(1, len(df) + 1))
    return df.reset_index(drop=True)


# -- formatting (the Markdown and HTML tables show the same strings) --------

COLUMNS = [  # (key, header, formatter)
    ("rank", "#", str),
    ("strategy", "strategy", str),
    ("time_to_target_s", "time to target (s)", lambda v: fmt_num(v, 3)),
    ("tokens_per_s", "tokens/s", lambda v: fmt_num(v, 0)),
    ("step_s", "step (s)", lambda v: fmt_num(v, 4)),
    ("compute_s", "compute (s)", lambda v: fmt_num(v, 4)),
    ("comm_s", "comm (s)", lambda v: fmt_num(v, 4)),
    ("idle_s", "idle (s)", lambda v: fmt_num(v, 4)),
    ("bytes_per_step", "bytes/step/rank", lambda v: fmt_bytes(v)),
    ("peak_mem_bytes", "peak mem/rank", lambda v: fmt_bytes(v)),
    ("final_loss", "final loss", lambda v: fmt_num(v, 4)),
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


def table_cells(df: pd.DataFrame) -> list[list[str]]:
    return [[f(row[k]) for k, _, f in COLUMNS] for _, row in df.iterrows()]


def render_markdown(report: Report) -> str:
    lines = ["# polytrain comparison report", ""]
    for sc in report.scenarios:
        df = scenario_table(report, sc)
        lines += [f"## Scenario `{sc}`", ""]
        if len(df):
            lines += [f"Target loss {df.target_loss.iloc[0]:.4f}; step times are per-step means after "
                      f"{WARMUP_STEPS} warm-up steps; bytes are sent per rank per step.", ""]
            lines.append("| " + " | ".join(h for _, h, _ in COLUMNS) + " |")
            lines.append("|" + "|".join("---" for _ in COLUMNS) + "|")
            lines += ["| " + " | ".join(cells) + " |" for cells in table_cells(df)]
            lines.append("")
        for f in report.failures:
            if f.scenario == sc:
                lines.append(f"- **{f.label} failed**: {f.error}" + (f" ({f.url})" if f.url else ""))
        lines.append("")
    lines += ["## Runs", ""] + [f"- `{r.label}` x `{r.scenario}`: {r.url}" for r in report.runs]
    return "\n".join(lines) + "\n"


# -- plots -------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _plt().close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _legend_outside(ax) -> None:
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)


LINESTYLES = ["-", "--", ":", "-."]


def plot_loss(runs: list[Run], x: str, title: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    for i, r in enumerate(runs):  # equal curves (ddp vs fsdp) stay distinguishable by line style
        c = loss_curve(r.metrics)
        ax.plot(c[x], c.loss, linestyle=LINESTYLES[i % len(LINESTYLES)], marker="os^vD*"[i % 6] if len(c) < 30
                else None, markersize=4, label=r.label, alpha=0.85)
    ax.set_xlabel("step" if x == "step" else "wall time since the run began (s)")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title(title, fontsize=10, loc="left")
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    return _png(fig)


def _barh(df: pd.DataFrame, key: str, xlabel: str, title: str, fmt, log: bool = False) -> str:
    """One horizontal bar per run, its value written at the bar's end."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 0.8 + 0.45 * len(df)))
    vals = list(df[key])
    bars = ax.barh(list(df.strategy), vals, color="#4C78A8")
    ax.bar_label(bars, labels=[fmt(v) for v in vals], padding=3, fontsize=8)
    if log:  # bars start at a decade below the smallest value, so short bars stay visible
        ax.set_xscale("log")
        ax.set_xlim(10 ** math.floor(math.log10(max(min(vals), 1)) - 1), max(vals) * 8)
    else:
        ax.set_xlim(0, max(vals) * 1.2 if max(vals) > 0 else 1)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10, loc="left")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def plot_breakdown(df: pd.DataFrame, title: str) -> str:
    """compute + idle = step time (stacked); comm overlaps compute, so it is its own thin bar."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 0.8 + 0.6 * len(df)))
    y = range(len(df))
    ax.barh([i - 0.17 for i in y], df.compute_s, height=0.34, color="#4C78A8", label="compute (s)")
    ax.barh([i - 0.17 for i in y], df.idle_s, left=df.compute_s, height=0.34, color="#E45756",
            label="idle: waiting for comm/data (s)")
    ax.barh([i + 0.17 for i in y], df.comm_s, height=0.34, color="#F58518", hatch="//",
            label="comm in flight (overlaps compute) (s)")
    ax.set_yticks(list(y), df.strategy)
    ax.invert_yaxis()
    ax.set_xlabel("seconds per step (mean per rank)")
    ax.set_title(title, fontsize=10, loc="left")
    ax.grid(axis="x", alpha=0.3)
    _legend_outside(ax)
    return _png(fig)


def plot_memory(runs: list[Run], title: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    width = 0.8 / max(1, len(runs))
    for i, r in enumerate(runs):
        per_rank = r.metrics.groupby("rank").peak_mem_bytes.max()
        ax.bar([k + i * width - 0.4 + width / 2 for k in per_rank.index], per_rank.values / 2**20, width=width,
               label=r.label)
    ranks = sorted({int(k) for r in runs for k in r.metrics["rank"].unique()})
    ax.set_xticks(ranks, [f"rank {k}" for k in ranks])
    ax.set_ylabel("peak memory (MiB)")
    ax.set_title(title, fontsize=10, loc="left")
    ax.grid(axis="y", alpha=0.3)
    _legend_outside(ax)
    return _png(fig)


def plot_gantt(run: Run) -> str:
    """The last step's pipeline actions (timeline.parquet), one lane per rank."""
    title = f"{run.label} x {run.scenario}: measured pipeline step (seconds from its first action)"
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "gantt.png")
        try:
            from strategies.pipeline.gantt import draw_timeline
        except ImportError:
            draw_timeline = None
        if draw_timeline is not None:
            draw_timeline(run.timeline, path, title=title)
            with open(path, "rb") as f:
                return base64.b64encode(f.read()).decode()
    plt = _plt()  # no pipeline package: plain bars
    tl = run.timeline[run.timeline.step == run.timeline.step.max()]
    t0 = tl.start.min()
    fig, ax = plt.subplots(figsize=(9, 0.6 + 0.5 * tl["rank"].nunique()))
    ax.barh(tl["rank"], tl.end - tl.start, left=tl.start - t0, edgecolor="black")
    ax.set_xlabel("seconds")
    ax.set_ylabel("rank")
    ax.set_title(title, fontsize=10, loc="left")
    return _png(fig)


def timeline_events(run: Run) -> pd.DataFrame:
    ev = run.events
    if ev is None or ev.empty:
        return ev
    return ev[ev.kind.astype(str).str.startswith(TIMELINE_KINDS)]


def plot_events(runs: list[Run]) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8.5, 0.9 + 0.5 * len(runs)))
    markers = {"failure": ("X", "#D62728"), "restart": ("^", "#1F77B4"), "recovered": ("o", "#2CA02C"),
               "straggler": ("s", "#FF7F0E"), "evict": ("v", "#9467BD"), "inject": ("*", "#8C564B"),
               "decision": ("D", "#7F7F7F"), "resume": ("P", "#17BECF")}
    seen = set()
    for y, r in enumerate(runs):
        ev = timeline_events(r)
        t0 = run_start(r.metrics)
        for _, e in ev.iterrows():
            kind = str(e.kind).split(":")[0]
            m, c = markers[kind]
            ax.scatter(e.wall_time - t0, y, marker=m, color=c, s=60, label=None if kind in seen else kind, zorder=3)
            seen.add(kind)
    ax.set_yticks(range(len(runs)), [f"{r.label} x {r.scenario}" for r in runs])
    ax.set_ylim(-0.6, len(runs) - 0.4)
    ax.invert_yaxis()
    ax.set_xlabel("wall time since the run began (s)")
    ax.set_title("failures, restarts and stragglers", fontsize=10, loc="left")
    ax.grid(axis="x", alpha=0.3)
    _legend_outside(ax)
    return _png(fig)


def make_plots(report: Report) -> dict[str, list[tuple[str, str]]]:
    """Section name -> [(caption, base64 PNG)]."""
    out: dict[str, list[tuple[str, str]]] = {}
    for sc in report.scenarios:
        runs = [r for r in report.runs if r.scenario == sc]
        if not runs:
            continue
        df = scenario_table(report, sc)
        out[sc] = [
            ("loss vs step", plot_loss(runs, "step", f"{sc}: training loss vs step")),
            ("loss vs wall time", plot_loss(runs, "time_s", f"{sc}: training loss vs wall time")),
            ("throughput", _barh(df, "tokens_per_s", "throughput (tokens/s, steady state)", f"{sc}: throughput",
                                 lambda v: fmt_num(v, 0))),
            ("step-time breakdown", plot_breakdown(df, f"{sc}: where a step's time goes")),
            ("bytes per step", _barh(df.assign(b=df.bytes_per_step.clip(lower=1)), "b",
                                     "bytes sent per rank per step (log scale; 0 shown as 1 B)",
                                     f"{sc}: communication volume", fmt_bytes, log=True)),
            ("peak memory per rank", plot_memory(runs, f"{sc}: peak memory per rank")),
        ]
    gantts = [(f"{r.label} x {r.scenario}", plot_gantt(r)) for r in report.runs
              if r.timeline is not None and len(r.timeline)]
    if gantts:
        out["pipeline Gantt charts"] = gantts
    eventful = [r for r in report.runs if r.events is not None and len(timeline_events(r))]
    if eventful:
        out["failures, restarts and stragglers"] = [("event timeline", plot_events(eventful))]
    return out


# -- HTML --------------------------------------------------------------------

_CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;font-size:13px;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:nth-child(2),th:nth-child(2){text-align:left}"
        "th{background:#f3f3f3}.fail{color:#b00}figure{margin:1em 0}figcaption{font-size:12px;color:#555}")


def render_html(report: Report, plots: dict[str, list[tuple[str, str]]]) -> str:
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>polytrain comparison</title>"
             f"<style>{_CSS}</style></head><body><h1>polytrain comparison report</h1>"]
    for sc in report.scenarios:
        parts.append(f"<h2>Scenario <code>{e(sc)}</code></h2>")
        df = scenario_table(report, sc)
        if len(df):
            parts.append(f"<p>Target loss {df.target_loss.iloc[0]:.4f}; step times are per-step means after "
                         f"{WARMUP_STEPS} warm-up steps; bytes are sent per rank per step.</p>")
            head = "".join(f"<th>{e(h)}</th>" for _, h, _ in COLUMNS)
            body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in cells) + "</tr>" for cells in table_cells(df))
            parts.append(f"<table class='ranking'><tr>{head}</tr>{body}</table>")
        for f in report.failures:
            if f.scenario == sc:
                parts.append(f"<p class='fail'><b>{e(f.label)} failed</b>: {e(f.error)}</p>")
        parts += _figures(plots.get(sc, []))
    for section in ("pipeline Gantt charts", "failures, restarts and stragglers"):
        if section in plots:
            parts.append(f"<h2>{e(section)}</h2>")
            parts += _figures(plots[section])
    parts.append("<h2>Runs</h2><ul>" + "".join(f"<li><code>{e(r.label)}</code> x <code>{e(r.scenario)}</code>: "
                                               f"{e(r.url)}</li>" for r in report.runs) + "</ul></body></html>")
    return "\n".join(parts)


def _figures(items: list[tuple[str, str]]) -> list[str]:
    return [f"<figure><img alt='{html.escape(cap)}' src='data:image/png;base64,{b64}'>"
            f"<figcaption>{html.escape(cap)}</figcaption></figure>" for cap, b64 in items]


def write_report(report: Report, out: str) -> tuple[str, str]:
    """Write report.html and report.md under ``out`` (a path or fsspec URL); returns both URLs."""
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


def report_from_urls(urls: list[str], out: str, *, target_loss: float | None = None) -> tuple[str, str]:
    """`polytrain report RUN_DIR... --out DIR`."""
    if not urls:
        raise ConfigError("report: give at least one run folder")
    found, failures = expand_urls(urls)
    runs = [load_run(u) for u in found]
    return write_report(Report(runs=runs, failures=failures, target_loss=target_loss), out)
