"""The report's plots: matplotlib (Agg) PNGs, base64 for embedding, drawn from
the same tables and curves as the report's numbers (``orchestrator.report``)."""
from __future__ import annotations

import base64
import io
import math
import os
import tempfile

import pandas as pd

from orchestrator.metrics import quality_curve, run_start
from orchestrator.report import Report, Run, display_label, fmt_bytes, fmt_num, scenario_table, throughput

# event kinds drawn on the failure timeline (prefix match)
TIMELINE_KINDS = ("failure", "restart", "recovered", "straggler", "evict", "inject", "decision", "resume")


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
    """Training loss as lines, held-out loss (where evaluated) as filled markers of the same colour."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    for i, r in enumerate(runs):  # equal curves (ddp vs fsdp) stay distinguishable by line style
        c = quality_curve(r.metrics)
        line, = ax.plot(c[x], c.loss, linestyle=LINESTYLES[i % len(LINESTYLES)],
                        marker="os^vD*"[i % 6] if len(c) < 30 else None, markersize=4, label=display_label(r),
                        alpha=0.85)
        val = c[c.val_loss.notna()]
        if len(val):
            ax.plot(val[x], val.val_loss, linestyle="none", marker="os^vD*"[i % 6], markersize=7,
                    color=line.get_color(), label=f"{display_label(r)} (held-out)")
    ax.set_xlabel("step" if x == "step" else "training time since the run began, evaluation excluded (s)")
    ax.set_ylabel("loss (nats/token)")
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
    """compute + idle = step (stacked, by DEFINITIONS); comm overlaps compute, so it is its own bar."""
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
    ax.set_xlabel("seconds per step (the slowest rank's, median over steady steps)")
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
               label=display_label(r))
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
    ax.set_yticks(range(len(runs)), [f"{display_label(r)} x {r.scenario}" for r in runs])
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
        runs = [r for r in report.runs if r.scenario == sc and r.repeat == 0]  # curves: the first repeat
        if not runs:
            continue
        df = scenario_table(report, sc)
        key, unit = throughput(df)
        out[sc] = [
            ("loss vs step", plot_loss(runs, "step", f"{sc}: loss vs step")),
            ("loss vs training time", plot_loss(runs, "time_s", f"{sc}: loss vs training time")),
            ("throughput", _barh(df, key, f"throughput ({unit}, steady state)", f"{sc}: throughput",
                                 lambda v: fmt_num(v, 0))),
            ("step-time breakdown", plot_breakdown(df, f"{sc}: where a step's time goes")),
            ("bytes per step", _barh(df.assign(b=df.bytes_per_step.clip(lower=1)), "b",
                                     "bytes sent per rank per steady step (log scale; 0 shown as 1 B)",
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
