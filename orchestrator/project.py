"""`polytrain project`: the predicted cost of each strategy on N workers of a
target cluster, from a short profiling run on this machine.

``profile`` (``project_profile.py``) measures the workload on one rank, one
thread (see docs/projection.md, *Measured inputs*); ``project`` turns it into ``strategies.projection`` predictions
by the stated layout rules; ``curves_from`` reads measured loss curves;
``write`` stores projection.parquet and the step-time-against-N picture.
``report_section`` is the comparison report's part.
"""
from __future__ import annotations

import base64
import math
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the parser is built on every `polytrain` call: torch is imported only to project
    from strategies.projection import Prediction, Profile, Target
    from workloads import Workload

from orchestrator.project_plot import crossovers, plot  # noqa: F401  (the picture; re-exported)
from orchestrator.project_profile import calibrate, profile  # noqa: F401  (the measured inputs; re-exported)

SWEEP = tuple(2 ** i for i in range(11))  # the picture's N: 1 .. 1024
COLUMNS = ("strategy", "workers", "scenario", "layout", "predicted_step_s", "predicted_step_low_s",
           "predicted_step_high_s", "predicted_compute_s", "predicted_comm_s", "predicted_bubble_s", "bytes_intra",
           "bytes_inter", "param_bytes_per_rank", "state_bytes_per_rank", "steps_to_target", "time_to_target_s")


def parse_strategies(text: str) -> list[tuple[str, dict]]:
    """``ddp,pipeline:schedule=zb-h1`` -> [(name, options)] (compare's spelling)."""
    from orchestrator.compare import parse_strategies as parse

    return [(s["name"], {k: v for k, v in s.items() if k != "name"}) for s in parse(text)]


def project(prof: Profile, workload: Workload, strategies: list[tuple[str, dict]], workers: list[int],
            target: Target, *, microbatches: int = 4) -> tuple[list[Prediction], list[str]]:
    """Every (strategy, N) row the layout rules allow, and a note for each that they do not.
    A row's ``strategy`` is its label with options (``powersgd:rank=4``, as compare spells
    it), so two settings of one strategy stay two rows, series and curves."""
    from orchestrator.compare import strategy_label
    from strategies.projection import Skip, job_for, predict

    rows, notes = [], []
    for name, options in strategies:
        label = strategy_label({"name": name, **options})
        for n in workers:
            try:
                job = job_for(name, options, n, workload, microbatches=microbatches, n_blocks=len(prof.blocks))
            except Skip as e:
                if str(e) not in notes:  # a strategy with no model says so once, not once per N
                    notes.append(str(e))
                continue
            rows.append(replace(predict(prof, job, target), strategy=label))
            own = f"{label}: {job.microbatches} micro-batches a replica a step (its own option), not {microbatches}"
            if "microbatches" in options and job.microbatches != microbatches and own not in notes:
                notes.append(own)
    return rows, notes


# -- measured loss curves ----------------------------------------------------------------------
def loss_curve(metrics) -> list[tuple[int, float]]:
    """(step, loss) of one run: the held-out loss where it was evaluated, else the
    training loss (samples-weighted over ranks)."""
    from orchestrator.metrics import samples_mean

    if "val_loss" in metrics and metrics.val_loss.notna().any():
        held = metrics[metrics.val_loss.notna()].groupby("step").val_loss.mean()
        return [(int(s), float(v)) for s, v in held.items()]
    return [(int(s), samples_mean(g.loss, g.samples)) for s, g in metrics.groupby("step")]


def curves_from(urls: list[str]) -> dict[str, list[tuple[int, float]]]:
    """Each strategy's measured curve from run folders or comparison folders (its first
    run's), by its label with options (``powersgd:rank=4``)."""
    from orchestrator.report import expand_urls, load_run

    found = [url for url, _, _ in expand_urls(urls).runs]
    curves: dict[str, list[tuple[int, float]]] = {}
    for url in found:
        run = load_run(url)
        curves.setdefault(run.label, loss_curve(run.metrics))
    return curves


def steps_to_target(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((s for s, v in curve if v <= target), None)


def default_target(curves: dict[str, list[tuple[int, float]]]) -> float:
    """The loss every measured run reaches: the highest of their best losses."""
    return max(min(v for _, v in c if math.isfinite(v)) for c in curves.values())


def table(rows: list[Prediction], curves: dict[str, list[tuple[int, float]]] | None = None,
          target_loss: float | None = None):
    """projection.parquet's rows; time to the target where the strategy has a curve
    (quality per step is the measured one: the cluster changes only time)."""
    import pandas as pd

    out = []
    for r in rows:
        d = {k: v for k, v in asdict(r).items() if k not in ("compute_s", "comm_s", "bubble_s", "low_s", "high_s")}
        d.update(predicted_step_s=r.step_s, predicted_step_low_s=r.low_s, predicted_step_high_s=r.high_s,
                 predicted_compute_s=r.compute_s, predicted_comm_s=r.comm_s,
                 predicted_bubble_s=r.bubble_s, steps_to_target=math.nan, time_to_target_s=math.nan)
        if curves and r.strategy in curves and target_loss is not None:
            steps = steps_to_target(curves[r.strategy], target_loss)
            if steps is not None:
                d.update(steps_to_target=steps, time_to_target_s=steps * r.step_s)
        out.append(d)
    return pd.DataFrame(out, columns=list(COLUMNS))


def render(df, notes: list[str], prof: Profile, target: Target, target_loss: float | None, *,
           microbatches: int = 4) -> str:
    """The printed answer: the profiling cost, one line per row, the notes."""
    sw = max([10, *map(len, df.strategy)])  # labels with options, mesh layouts: columns as wide as they need
    lw = max([16, *map(len, df.layout)])
    lines = [f"profiled {prof.workload} on one rank in {prof.seconds:.1f} s ({prof.steps} timed block passes and "
             f"real steps; {len(prof.blocks)} blocks, micro-batch {prof.micro_batch}); target {target.name}, "
             f"speed x{target.speed:g}" + (f", {target.cores} cores shared (and with {prof.others:.1f} other jobs' "
                                            f"runnable threads, as profiled)" if target.cores else ""),
             (f"the global batch grows with N: N x {microbatches} x {prof.micro_batch} samples a step at every row (a "
              f"replica of r ranks, a pipeline's stages or a sequence's shards, takes r x {microbatches} micro-batches; "
              f"the dataset-size check is skipped); bytes are one rank's sent per step, state = params + grads + "
              f"optimizer state"),
             (f"range: the step again with compute as fast and as slow as the profile's fastest and slowest real step "
              f"(x{prof.drift[0]:.2f} and x{prof.drift[1]:.2f} of their median: how far this machine's speed moved "
              f"while profiling); the model's own error is not in it (docs/projection.md, Validation)"),
             (f"{'strategy':<{sw}} {'N':>5} {'layout':<{lw}} {'step s':>9} {'range s':>15} {'compute':>9} {'comm':>9} "
              f"{'bubble':>9} {'MB intra':>9} {'MB inter':>9} {'MB params':>9} {'MB state':>9} {'to target s':>11}")]
    for r in df.itertuples():
        ttt = "-" if math.isnan(r.time_to_target_s) else f"{r.time_to_target_s:.1f}"
        lines.append(f"{r.strategy:<{sw}} {r.workers:>5} {r.layout:<{lw}} {r.predicted_step_s:>9.4f} {_span(r):>15} "
                     f"{r.predicted_compute_s:>9.4f} {r.predicted_comm_s:>9.4f} {r.predicted_bubble_s:>9.4f} "
                     f"{r.bytes_intra / 1e6:>9.2f} {r.bytes_inter / 1e6:>9.2f} {r.param_bytes_per_rank / 1e6:>9.2f} "
                     f"{r.state_bytes_per_rank / 1e6:>9.2f} {ttt:>11}")
    if target_loss is not None:
        lines.append(f"time to target: loss {target_loss:.4f} at the measured run's step count x predicted step time")
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)


def _span(r) -> str:
    """A table row's predicted range, low-high seconds."""
    return f"{r.predicted_step_low_s:.4f}-{r.predicted_step_high_s:.4f}"


def sweep(prof: Profile, workload: Workload, strategies: list[tuple[str, dict]], target: Target, *,
          microbatches: int = 4) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[tuple[int, float, float]]]]:
    """Predicted step time per strategy at N = 1, 2, 4 .. 1024 (rows the rules skip are
    left out), and its range at each N (``Prediction.low_s``, ``high_s``)."""
    rows, _ = project(prof, workload, strategies, list(SWEEP), target, microbatches=microbatches)
    series: dict[str, list[tuple[int, float]]] = {}
    ranges: dict[str, list[tuple[int, float, float]]] = {}
    for r in rows:
        series.setdefault(r.strategy, []).append((r.workers, r.step_s))
        ranges.setdefault(r.strategy, []).append((r.workers, r.low_s, r.high_s))
    return series, ranges


def write(out: str, df, png: bytes) -> tuple[str, str]:
    """projection.parquet and projection.png under ``out`` (a folder or fsspec URL)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(out)
    fs.makedirs(path, exist_ok=True)
    with fs.open(f"{path}/projection.parquet", "wb") as f:
        df.to_parquet(f, index=False)
    fs.pipe_file(f"{path}/projection.png", png)
    return f"{out.rstrip('/')}/projection.parquet", f"{out.rstrip('/')}/projection.png"


# -- the command -------------------------------------------------------------------------------
def add_parser(sub) -> None:
    """`polytrain project` (called from orchestrator.cli)."""
    p = sub.add_parser("project", help="predict each strategy's step time, bytes and memory on N workers of a "
                       "target cluster from a short profiling run here",
                       description="Project strategies to a cluster you do not have: per strategy and N, the "
                       "predicted step split into compute / exposed communication / bubble, bytes per step per "
                       "link class and memory per rank. Without --scenario or --speed: this machine as it is "
                       "(loopback, the workers sharing its cores). Nothing is written without --out.")
    p.add_argument("--workload", required=True, help="registered workload name")
    p.add_argument("--strategies", required=True, help="e.g. ddp,fsdp,pipeline:schedule=zb-h1")
    p.add_argument("--workers", default="2,4,64", help="comma-separated N (default 2,4,64)")
    p.add_argument("--scenario", default=None, help="target network: a name from `polytrain scenarios` or "
                   "nodes=..,per_node=..,inter=..,intra=..,latency=..")
    p.add_argument("--speed", type=float, default=None,
                   help="a target worker's compute speed against one worker alone on one core here (default 1)")
    p.add_argument("--microbatches", type=int, default=4, help="micro-batches per replica per step (default 4)")
    p.add_argument("--from", dest="from_", default=None, metavar="RUN_OR_COMPARE_DIR",
                   help="measured loss curves (held-out where evaluated): time to --target-loss")
    p.add_argument("--target-loss", dest="target_loss", type=float, default=None,
                   help="with --from: the loss to reach (default: the highest of the runs' best losses)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="workload.KEY=VALUE",
                   help="workload options (repeatable)")
    p.add_argument("--out", default=None, help="write projection.parquet and projection.png here")


def parse_workers(text: str) -> list[int]:
    try:
        ns = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        ns = []
    if not ns or min(ns) < 1:
        raise ValueError(f"--workers {text!r}: comma-separated whole numbers >= 1 (e.g. 2,4,64)")
    return ns


def parse_target(scenario: str | None, speed: float | None, workers: list[int]) -> Target:
    """No scenario and no speed: this machine as it is (loopback, its cores shared)."""
    import os

    from cluster.network import parse_scenario
    from strategies.projection import Target

    if speed is not None and not (math.isfinite(speed) and speed > 0):
        raise ValueError(f"--speed {speed!r}: must be a number > 0 (a target worker's speed against one core here)")
    if scenario is None and speed is None:
        return Target(cores=os.cpu_count() or 1)
    try:
        sc = parse_scenario(scenario or "local")
    except ValueError as e:
        raise ValueError(f"--scenario {scenario!r}: {e}") from None
    for n in workers:
        if sc is not None and n > sc.per_node and n % sc.per_node:
            raise ValueError(f"--workers {n}: not a multiple of the scenario's {sc.per_node} workers per node")
        if sc is not None:
            sc.check(n)
    return Target(scenario=sc, speed=1.0 if speed is None else speed)


def run_cli(args) -> int:
    """`polytrain project`; bad input raises ConfigError (one line, exit 2) before any profiling."""
    from orchestrator.config import ConfigError, load_spec

    try:
        workers = parse_workers(args.workers)
        target = parse_target(args.scenario, args.speed, workers)
        if args.microbatches < 1:
            raise ValueError(f"--microbatches {args.microbatches}: must be >= 1")
        if args.target_loss is not None and not math.isfinite(args.target_loss):
            raise ValueError(f"--target-loss {args.target_loss!r}: must be a finite number")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    strategies = parse_strategies(args.strategies)
    spec = load_spec(workload=args.workload, strategy="single", workers=1, overrides=args.overrides)
    workload = spec.build_workload()
    _check_runnable(strategies, workers, workload, args.microbatches)
    curves = curves_from([args.from_]) if args.from_ else None
    if args.out:
        from orchestrator.storage import check_writable

        check_writable(args.out, "--out")
    prof = profile(workload, seed=spec.seed,
                   sequence=splits_sequence(strategies, workload, workers, args.microbatches))
    rows, notes = project(prof, workload, strategies, workers, target, microbatches=args.microbatches)
    if curves:  # a curve is a strategy's with its options: say which have none, and what --from holds
        notes += [f"{label}: no run of it in --from (which has {', '.join(sorted(curves))}): no time to target"
                  for label in dict.fromkeys(r.strategy for r in rows) if label not in curves]
    target_loss = args.target_loss if args.target_loss is not None or not curves else default_target(curves)
    df = table(rows, curves, target_loss)
    print(render(df, notes, prof, target, target_loss, microbatches=args.microbatches))
    if args.out:
        png = plot(*sweep(prof, workload, strategies, target, microbatches=args.microbatches),
                   f"{prof.workload} on {target.name} (speed x{target.speed:g})")
        for url in write(args.out, df, png):
            print(f"wrote {url}")
    return 0


def _check_runnable(strategies: list[tuple[str, dict]], workers: list[int], workload: Workload, m: int) -> None:
    """Bad input: an unknown strategy, invalid options, or one with no row at any of the N."""
    from orchestrator.config import ConfigError
    from strategies.pipeline.part import count_blocks
    from strategies.projection import Skip, job_for

    n_blocks = count_blocks(workload)
    for name, options in strategies:
        skips = []
        for n in workers:
            try:
                job_for(name, options, n, workload, microbatches=m, n_blocks=n_blocks)
            except Skip as e:
                skips.append(str(e))
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if len(skips) == len(workers):
            raise ConfigError(f"strategy={name!r} cannot run workload={workload.name!r} at any of "
                              f"--workers {','.join(map(str, workers))}: {skips[0]}")


def splits_sequence(strategies: list[tuple[str, dict]], workload: Workload, workers, m: int) -> bool:
    """Whether a row of ``strategies`` at ``workers`` or on the picture's N shards the
    sequence: only then does the profile measure a sequence rank's compute (seconds
    of fake-group steps, minutes for a wide model)."""
    from strategies.pipeline.part import count_blocks
    from strategies.projection import Skip, job_for

    n_blocks = count_blocks(workload)
    for name, options in strategies:
        for n in sorted({*workers, *SWEEP}):
            try:
                if job_for(name, options, n, workload, microbatches=m, n_blocks=n_blocks).layout.sp > 1:
                    return True
            except (Skip, ValueError):
                continue
    return False


# -- the comparison report's section -----------------------------------------------------------
def _run_spec(url: str) -> dict:
    import yaml

    from orchestrator.storage import RunFolder

    folder = RunFolder.from_url(url)
    with folder.fs.open(f"{folder.path}/spec.yaml", "rb") as f:
        return yaml.safe_load(f.read()) or {}


def report_section(runs: list[str], scenario: str | None = None, *, speed: float | None = None,
                   workers: tuple[int, ...] = (8, 64, 1024)) -> "Section":
    """The comparison report's projection: its own runs' workload and strategies (with
    their options) projected on ``scenario``/``speed`` (neither: this machine), time to
    the loss every run reached from their measured curves. ConfigError for a target
    that cannot be parsed."""
    from orchestrator.compare import strategy_label
    from orchestrator.config import ConfigError, JobSpec
    from orchestrator.report import expand_urls, load_run

    found = [url for url, _, _ in expand_urls(runs).runs]
    specs = [_run_spec(u) for u in found]
    strategies: dict[str, tuple[str, dict]] = {}  # by label: two settings of one strategy are two rows
    curves: dict[str, list[tuple[int, float]]] = {}
    for url, spec in zip(found, specs):
        s = spec["strategy"] if isinstance(spec["strategy"], dict) else {"name": spec["strategy"]}
        strategies.setdefault(strategy_label(s), (s["name"], {k: v for k, v in s.items() if k != "name"}))
        curves.setdefault(strategy_label(s), loss_curve(load_run(url).metrics))
    ns = sorted({int(s["workers"]) for s in specs} | set(workers))
    try:
        target = parse_target(scenario, speed, ns)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    first = JobSpec(**specs[0])
    workload = first.build_workload()
    # each worker's share of the runs' global batch, in micro-batches: the rows at the runs' N take their batch
    m = max(1, round(first.batch_size / (workload.micro_batch * first.workers)))
    chosen = list(strategies.values())
    prof = profile(workload, sequence=splits_sequence(chosen, workload, ns, m))
    rows, notes = project(prof, workload, chosen, ns, target, microbatches=m)
    target_loss = default_target(curves)
    df = table(rows, curves, target_loss)
    png = plot(*sweep(prof, workload, chosen, target, microbatches=m),
               f"{prof.workload} on {target.name} (speed x{target.speed:g})")
    rows = []
    for r in df.itertuples():
        ttt = "-" if math.isnan(r.time_to_target_s) else f"{r.time_to_target_s:.1f}"
        rows.append([r.strategy, str(r.workers), r.layout, f"{r.predicted_step_s:.4f}",
                     _span(r), f"{r.predicted_compute_s:.4f}",
                     f"{r.predicted_comm_s:.4f}", f"{r.predicted_bubble_s:.4f}", f"{r.bytes_inter / 1e6:.2f}",
                     f"{r.state_bytes_per_rank / 1e6:.2f}", ttt])
    intro = (f"Predicted on `{target.name}` (speed x{target.speed:g}) from a one-rank profile ({prof.seconds:.1f} s); "
             f"global batch N x {m} x {prof.micro_batch} samples a step (the runs' at their N); "
             f"time to loss {target_loss:.4f} = the run's steps to it x the predicted step. The range: compute as "
             f"fast and as slow as the profile's fastest and slowest step (x{prof.drift[0]:.2f}, x{prof.drift[1]:.2f} "
             f"of their median). See docs/projection.md for what is modelled.")
    return Section(intro=intro, header=list(SECTION_HEADER), rows=rows, notes=list(notes),
                   plots=[(f"Predicted step time against N on {target.name}", base64.b64encode(png).decode())])


SECTION_HEADER = ("strategy", "N", "layout", "step s", "range s", "compute s", "exposed comm s", "bubble s", "MB inter",
                  "MB/rank state", "to target s")


@dataclass(frozen=True, kw_only=True)
class Section:
    """The comparison report's projection: text, one table, notes and the picture."""

    intro: str
    header: list[str]
    rows: list[list[str]]
    notes: list[str]
    plots: list[tuple[str, str]]  # (title, PNG as base64)

    def markdown(self) -> str:
        lines = ["## Projection", "", self.intro, "", "| " + " | ".join(self.header) + " |",
                 "|" + "---|" * len(self.header)] + ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(lines + [""] + [f"- {n}" for n in self.notes])
