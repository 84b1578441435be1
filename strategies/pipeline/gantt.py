"""Gantt charts (PNG, matplotlib's Agg backend) of a simulated schedule or a
measured timeline; and the same picture as text for a terminal."""
from __future__ import annotations

from typing import Iterable

from strategies.pipeline.actions import parse_action
from strategies.pipeline.simulate import SimResult

COLOURS = {"F": "#4C78A8", "B": "#F58518", "W": "#54A24B", "BW": "#E45756"}

# one bar: (label, op, start, end, later chunk of this rank?)
Bar = tuple[str, str, float, float, bool]


def draw_schedule(result: SimResult, path: str, *, title: str | None = None) -> str:
    """The simulated times of ``result``, one lane per rank; returns ``path``."""
    sched = result.schedule
    lanes = {r: [_bar(str(a), s, e, sched.local_stages(r)) for a, s, e in times]
             for r, times in enumerate(result.times)}
    head = title or (f"{sched.name}: p={sched.n_ranks}, m={sched.microbatches}, makespan {result.makespan:g}, "
                     f"bubble {max(result.bubble):.1%}")
    return _draw(lanes, path, head, "time (cost units)")


def draw_timeline(rows: Iterable, path: str, *, step: int | None = None, title: str | None = None) -> str:
    """A measured run: ``rows`` of (step, rank, action, start, end) — tuples, dicts
    or a DataFrame with those columns (``<run>/timeline.parquet``) — for one step
    (default: the last), seconds from that step's first action; returns ``path``."""
    if hasattr(rows, "to_dict"):
        rows = rows.to_dict("records")
    recs = [r if isinstance(r, dict) else dict(zip(("step", "rank", "action", "start", "end"), r)) for r in rows]
    if not recs:
        raise ValueError("timeline: no rows")
    step = max(r["step"] for r in recs) if step is None else step
    recs = [r for r in recs if r["step"] == step]
    if not recs:
        raise ValueError(f"timeline: no rows for step {step}")
    t0 = min(r["start"] for r in recs)
    stages: dict[int, set[int]] = {}
    for r in recs:
        stages.setdefault(int(r["rank"]), set()).add(parse_action(r["action"]).stage)
    lanes: dict[int, list[Bar]] = {}
    for r in sorted(recs, key=lambda r: r["start"]):
        rank = int(r["rank"])
        lanes.setdefault(rank, []).append(
            _bar(r["action"], r["start"] - t0, r["end"] - t0, sorted(stages[rank])))
    end = max(r["end"] for r in recs) - t0
    return _draw(lanes, path, title or f"measured step {step}: {end:.3f} s", "seconds")


def _bar(action: str, start: float, end: float, local: list[int]) -> Bar:
    a = parse_action(action)
    many = len(local) > 1
    label = f"{a.stage}{a.op.value}{a.mb}" if many else f"{a.op.value}{a.mb}"
    return label, a.op.value, start, end, many and a.stage != local[0]


def _draw(lanes: dict[int, list[Bar]], path: str, title: str, xlabel: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    ranks = sorted(lanes)
    end = max((b[3] for bars in lanes.values() for b in bars), default=1.0)
    fig, ax = plt.subplots(figsize=(max(8.0, min(24.0, 0.25 * sum(len(b) for b in lanes.values()) / len(ranks))),
                                    0.5 + 0.6 * len(ranks)))
    for row, rank in enumerate(ranks):
        for label, op, s, e, later in lanes[rank]:
            ax.barh(row, e - s, left=s, height=0.8, color=COLOURS[op], alpha=0.55 if later else 1.0,
                    edgecolor="black", linewidth=0.4)
            if (e - s) / end > 0.012:
                ax.text((s + e) / 2, row, label, ha="center", va="center", fontsize=6, color="white")
    ax.set_yticks(range(len(ranks)), [f"rank {r}" for r in ranks])
    ax.invert_yaxis()
    ax.set_xlim(0, end)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9, loc="left")
    ax.legend(handles=[Patch(color=c, label=k) for k, c in COLOURS.items()], loc="lower right",
              bbox_to_anchor=(1.0, 1.0), fontsize=7, ncol=4, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def text_grid(result: SimResult, *, max_width: int = 160) -> str:
    """The simulated schedule as text: one row per rank, time left to right, the
    shortest action a few characters wide; '.' is idle."""
    bars = {r: [_bar(str(a), s, e, result.schedule.local_stages(r)) for a, s, e in t]
            for r, t in enumerate(result.times)}
    shortest = min((e - s for t in result.times for _, s, e in t if e > s), default=1.0)
    width = max(len(b[0]) for lane in bars.values() for b in lane) + 1
    scale = min(width / shortest, max_width / result.makespan) if result.makespan else 1.0
    total = round(result.makespan * scale)
    rows = []
    for r, lane in bars.items():
        cells = ["."] * total
        for label, _, s, e, later in lane:
            a = round(s * scale)
            if a >= total:
                continue
            b = min(total, max(a + 1, round(e * scale)))
            text = (label.lower() if later else label).ljust(b - a, "-")[: b - a]
            cells[a:b] = list(text[:-1] + ("|" if b - a > len(label) else text[-1]))
        rows.append(f"rank {r:>2} |" + "".join(cells) + "|")
    return "\n".join(rows)
