"""``polytrain pipeline show``: a schedule as a text grid and a Gantt PNG."""
from __future__ import annotations

from strategies.pipeline.auto import auto_schedule
from strategies.pipeline.gantt import draw_schedule, text_grid
from strategies.pipeline.generators import generate
from strategies.pipeline.simulate import StageCost, simulate, uniform_costs


def show(schedule: str, stages: int, microbatches: int, *, costs: tuple[float, float, float] | None = None,
         comm: float = 0.0, chunks: int = 2, memory_limit: float | None = None, out: str | None = None,
         echo: bool = True) -> str:
    """Simulate ``schedule`` on ``stages`` ranks with ``microbatches`` micro-batches
    at per-rank costs (T_F, T_B, T_W) (default 1, 1, 1; a rank holding v stages
    spends 1/v of them on each) and ``comm`` per cross-rank transfer; print the
    per-rank grid (if ``echo``), write the Gantt chart to ``out`` when given
    (nothing is written otherwise) and return the text."""
    f, b, w = costs or (1.0, 1.0, 1.0)
    if schedule == "auto":
        flat = [StageCost(f=f, b=b, w=w, comm=comm)] * stages
        v = [StageCost(f=f / 2, b=b / 2, w=w / 2, comm=comm, mem=0.5)] * (2 * stages)
        found = auto_schedule(stages, microbatches, flat, v_costs=v,
                              memory_limit=memory_limit if memory_limit is not None else float(stages))
        result, origin = found.result, f" (found: {found.origin})"
    else:
        sched = generate(schedule, stages, microbatches, chunks=chunks)
        result, origin = simulate(sched, uniform_costs(sched, f, b, w, comm)), ""
    if out:
        draw_schedule(result, out)
    s = result.schedule
    lines = [
        f"{schedule}{origin}: p={stages}, m={microbatches}, {s.n_stages} stages, costs F={f:g} B={b:g} W={w:g}"
        + (f" comm={comm:g}" if comm else ""),
        f"makespan {result.makespan:g} (time 0 to the last action of a flushed step); "
        f"per-rank span {result.max_span:g}; ideal m(F+B+W) = {microbatches * (f + b + w):g}",
        "bubble per rank: " + " ".join(f"{x:.1%}" for x in result.bubble),
        "peak activations per rank (micro-batches of its share): " + " ".join(f"{x:g}" for x in result.peak_memory),
        "",
        text_grid(result),
        "",
        s.format(),
    ] + ([f"chart: {out}"] if out else [])
    text = "\n".join(lines)
    if echo:
        print(text)
    return text


def show_run(run_url: str, *, out: str, step: int | None = None) -> str:
    """Draw the Gantt chart of a measured run from ``<run>/timeline.parquet`` (columns
    step, rank, action, start, end), for ``step`` (default: the last), to ``out``; returns it.
    A run folder without a timeline is a one-line ValueError."""
    import fsspec
    import pandas as pd

    from strategies.pipeline.gantt import draw_timeline

    url = f"{run_url.rstrip('/')}/timeline.parquet"
    try:
        with fsspec.open(url, "rb") as f:
            rows = pd.read_parquet(f)
    except FileNotFoundError:
        raise ValueError(f"--run {run_url!r}: no timeline.parquet (only pipeline runs record one)") from None
    if step is None:
        step = int(rows["step"].max())
    return draw_timeline(rows, out, step=step)
