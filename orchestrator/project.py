"""`polytrain project`: the predicted cost of each strategy on N workers of a
target cluster, from a short profiling run on this machine.

``profile`` measures the workload on one rank (one thread): every block's F, B
and W on a real micro-batch (``strategies.pipeline.stages.measure_blocks``), the
tensors' sizes, one AdamW step and the per-step compute of DeMo and PowerSGD on
the real model; ``project`` turns it into ``strategies.projection`` predictions
by the stated layout rules; ``time_to_target`` reads measured loss curves;
``write`` stores projection.parquet and the step-time-against-N picture.
``report_section`` is the comparison report's part.
"""
from __future__ import annotations

import base64
import math
import time
from contextlib import contextmanager
from dataclasses import asdict
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the parser is built on every `polytrain` call: torch is imported only to project
    from strategies.projection import Prediction, Profile, Target
    from workloads import Workload

from orchestrator.project_plot import crossovers, plot  # noqa: F401  (the picture; re-exported)

SWEEP = tuple(2 ** i for i in range(11))  # the picture's N: 1 .. 1024
COLUMNS = ("strategy", "workers", "scenario", "layout", "predicted_step_s", "predicted_compute_s", "predicted_comm_s",
           "predicted_bubble_s", "bytes_intra", "bytes_inter", "param_bytes_per_rank", "state_bytes_per_rank",
           "steps_to_target", "time_to_target_s")


@contextmanager
def _one_thread():
    """A worker alone on one core: what the projection's speed factor is relative to."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def profile(workload: Workload, *, seed: int = 0, repeats: int = 3) -> Profile:
    """Measure ``workload`` on this rank (seconds and steps of the run are in the result).

    The blocks' F/B/W, timed apart, are scaled so that they add up to what one
    micro-batch costs in the real training step (``single`` on one rank, with 1
    and 2 micro-batches: the difference is one micro-batch, the rest a step's
    fixed cost)."""
    import numpy as np
    import torch
    from torch import nn

    from strategies.pipeline.stages import boundary_shapes, measure_blocks
    from strategies.projection import Profile

    t0 = time.perf_counter()
    with _one_thread(), torch.random.fork_rng():
        torch.manual_seed(seed)
        blocks = workload.blocks()
        source = workload.train_source()
        k = min(workload.micro_batch, len(source))
        probe = tuple(source.gather(np.arange(k)))
        shapes = boundary_shapes(blocks, probe)
        measured = measure_blocks(blocks, workload, probe, repeats=repeats)
        model = nn.Sequential(*blocks)
        attention = {id(m) for m in (workload.attention_layers(blocks) or [])}
        outer = _outer_seconds(model, seed)
        one, two = (_real_step_seconds(workload, g, seed, repeats) for g in (1, 2))
    calibrated, fixed = calibrate(measured, one, two, outer["adamw"])
    return Profile(
        workload=workload.name, micro_batch=k, blocks=calibrated,
        shapes=tuple(tuple(tuple(p.shape) for p in b.parameters()) for b in blocks),
        param_bytes=tuple(sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks),
        act_bytes=tuple(k * math.prod(s) * torch.empty((), dtype=d).element_size() for s, d in shapes),
        attention=tuple(i for i, b in enumerate(blocks) if any(id(m) in attention for m in b.modules())),
        optim_s=outer["adamw"], outer_s={n: outer[n] for n in ("demo", "powersgd")},
        fixed_s=fixed,
        seconds=time.perf_counter() - t0, steps=repeats + 1 + 2 * (repeats + 1))


def calibrate(blocks: list, one: float, two: float, optim_s: float) -> tuple[tuple, float]:
    """Blocks scaled to the real step's cost of a micro-batch (``two - one``: steps of 2
    and 1 micro-batches) and the step's fixed cost beyond it and the optimizer; the
    blocks as measured when the difference is not positive (noise)."""
    from strategies.pipeline.stages import BlockProfile

    per_mb, summed = two - one, sum(b.total for b in blocks)
    if per_mb <= 0 or summed <= 0:
        return tuple(blocks), 0.0
    scale = per_mb / summed
    return (tuple(BlockProfile(b.f * scale, b.b * scale, b.w * scale, b.params) for b in blocks),
            max(0.0, one - per_mb - optim_s))


def _real_step_seconds(workload: Workload, micro_batches: int, seed: int, repeats: int) -> float:
    """The fastest of ``repeats`` real training steps (after one) of ``single`` on
    ``micro_batches`` micro-batches: the job's own loop, data, loss and clipping."""
    import torch

    from orchestrator.config import JobSpec
    from orchestrator.trainer import RankTrainer

    spec = JobSpec(workload={"name": workload.name, **workload.model_dump()}, strategy="single", workers=1, steps=repeats + 1, seed=seed,
                   batch_size=workload.micro_batch * micro_batches, grad_accum=micro_batches)
    trainer = RankTrainer(spec, rank=0, world=1, device=torch.device("cpu"), workload=workload)
    return min(trainer.train_step()["step_time_s"] for _ in range(repeats + 1))


def _best_of(fn, repeats: int = 3) -> float:
    fn()  # warm-up: state allocation
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _outer_seconds(model, seed: int) -> dict[str, float]:
    """One step's own compute of AdamW, DeMo and PowerSGD on the whole model, one rank
    (their collectives at world 1 cost nothing)."""
    import torch

    from cluster import Comm
    from strategies.base import OptimConfig
    from strategies.compression.base import Wire
    from strategies.compression.powersgd import PowerSGDCompressor
    from strategies.decentralized.demo import DeMo
    from strategies.optim import build_optimizer

    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    opt, _ = build_optimizer(model, OptimConfig(), 100)
    demo = DeMo(params, Comm(), topk=32, chunk=64, decay=0.999, value_dtype=torch.bfloat16,
                decays=[p.dim() > 1 for p in params])
    names = [f"p{i}" for i in range(len(params))]
    psgd = PowerSGDCompressor(Wire(Comm()), {n: p.shape for n, p in zip(names, params)}, rank=4,
                              min_compression_rate=2.0, seed=seed)
    grads = lambda: [(n, p.grad.clone()) for n, p in zip(names, params)]
    with torch.no_grad():
        out = {"adamw": _best_of(opt.step), "demo": _best_of(lambda: demo.step(1e-3, 0.0)),
               "powersgd": _best_of(lambda: psgd.reduce(grads(), 100))}
    for p in params:
        p.grad = None
    return out


def parse_strategies(text: str) -> list[tuple[str, dict]]:
    """``ddp,pipeline:schedule=zb-h1`` -> [(name, options)] (compare's spelling)."""
    from orchestrator.compare import parse_strategies as parse

    return [(s["name"], {k: v for k, v in s.items() if k != "name"}) for s in parse(text)]


def project(prof: Profile, workload: Workload, strategies: list[tuple[str, dict]], workers: list[int],
            target: Target, *, microbatches: int = 4) -> tuple[list[Prediction], list[str]]:
    """Every (strategy, N) row the layout rules allow, and a note for each that they do not."""
    from strategies.projection import Skip, job_for, predict

    rows, notes = [], []
    for name, options in strategies:
        for n in workers:
            try:
                job = job_for(name, options, n, workload, microbatches=microbatches, n_blocks=len(prof.blocks))
            except Skip as e:
                notes.append(str(e))
                continue
            rows.append(predict(prof, job, target))
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
    """Each strategy's measured curve from run folders or comparison folders (its first run's)."""
    from orchestrator.report import expand_urls, load_run

    found, _ = expand_urls(urls)
    curves: dict[str, list[tuple[int, float]]] = {}
    for url in found:
        run = load_run(url)
        curves.setdefault(str(run.metrics.strategy.iloc[0]), loss_curve(run.metrics))
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
        d = {k: v for k, v in asdict(r).items() if k not in ("compute_s", "comm_s", "bubble_s")}
        d.update(predicted_step_s=r.step_s, predicted_compute_s=r.compute_s, predicted_comm_s=r.comm_s,
                 predicted_bubble_s=r.bubble_s, steps_to_target=math.nan, time_to_target_s=math.nan)
        if curves and r.strategy in curves and target_loss is not None:
            steps = steps_to_target(curves[r.strategy], target_loss)
            if steps is not None:
                d.update(steps_to_target=steps, time_to_target_s=steps * r.step_s)
        out.append(d)
    return pd.DataFrame(out, columns=list(COLUMNS))


def render(df, notes: list[str], prof: Profile, target: Target, target_loss: float | None) -> str:
    """The printed answer: the profiling cost, one line per row, the notes."""
    lines = [f"profiled {prof.workload} on one rank in {prof.seconds:.1f} s ({prof.steps} timed block passes and real steps; "
             f"{len(prof.blocks)} blocks, micro-batch {prof.micro_batch}); target {target.name}, "
             f"speed x{target.speed:g}" + (f", {target.cores} cores shared" if target.cores else ""),
             (f"{'strategy':<10} {'N':>5} {'layout':<16} {'step s':>9} {'compute':>9} {'comm':>9} {'bubble':>9} "
             f"{'MB intra':>9} {'MB inter':>9} {'MB params':>9} {'MB state':>9} {'to target s':>11}")]
    for r in df.itertuples():
        ttt = "-" if math.isnan(r.time_to_target_s) else f"{r.time_to_target_s:.1f}"
        lines.append(f"{r.strategy:<10} {r.workers:>5} {r.layout:<16} {r.predicted_step_s:>9.4f} "
                     f"{r.predicted_compute_s:>9.4f} {r.predicted_comm_s:>9.4f} {r.predicted_bubble_s:>9.4f} "
                     f"{r.bytes_intra / 1e6:>9.2f} {r.bytes_inter / 1e6:>9.2f} {r.param_bytes_per_rank / 1e6:>9.2f} "
                     f"{r.state_bytes_per_rank / 1e6:>9.2f} {ttt:>11}")
    if target_loss is not None:
        lines.append(f"time to target: loss {target_loss:.4f} at the measured run's step count x predicted step time")
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)


def sweep(prof: Profile, workload: Workload, strategies: list[tuple[str, dict]], target: Target, *,
          microbatches: int = 4) -> dict[str, list[tuple[int, float]]]:
    """Predicted step time per strategy at N = 1, 2, 4 .. 1024 (rows the rules skip are left out)."""
    rows, _ = project(prof, workload, strategies, list(SWEEP), target, microbatches=microbatches)
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        series.setdefault(r.strategy, []).append((r.workers, r.step_s))
    return series


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
    prof = profile(workload, seed=spec.seed)
    rows, notes = project(prof, workload, strategies, workers, target, microbatches=args.microbatches)
    target_loss = args.target_loss if args.target_loss is not None or not curves else default_target(curves)
    df = table(rows, curves, target_loss)
    print(render(df, notes, prof, target, target_loss))
    if args.out:
        png = plot(sweep(prof, workload, strategies, target, microbatches=args.microbatches),
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


# -- the comparison report's section -----------------------------------------------------------
def _run_spec(url: str) -> dict:
    import yaml

    from orchestrator.storage import RunFolder

    folder = RunFolder.from_url(url)
    with folder.fs.open(f"{folder.path}/spec.yaml", "rb") as f:
        return yaml.safe_load(f.read()) or {}


def report_section(runs: list[str], scenario: str | None = None, *, speed: float | None = None,
                   workers: tuple[int, ...] = (8, 64, 1024)) -> tuple[str, list[tuple[str, str]]]:
    """The comparison report's projection: its own runs' workload and strategies (with
    their options) projected on ``scenario``/``speed`` (neither: this machine), time to
    the loss every run reached from their measured curves. Returns (Markdown, [(title,
    PNG as base64)]). ConfigError for a target that cannot be parsed."""
    from orchestrator.config import ConfigError, JobSpec
    from orchestrator.report import expand_urls, load_run

    found, _ = expand_urls(runs)
    specs = [_run_spec(u) for u in found]
    strategies: dict[str, dict] = {}
    curves: dict[str, list[tuple[int, float]]] = {}
    for url, spec in zip(found, specs):
        s = spec["strategy"] if isinstance(spec["strategy"], dict) else {"name": spec["strategy"]}
        strategies.setdefault(s["name"], {k: v for k, v in s.items() if k != "name"})
        curves.setdefault(s["name"], loss_curve(load_run(url).metrics))
    ns = sorted({int(s["workers"]) for s in specs} | set(workers))
    try:
        target = parse_target(scenario, speed, ns)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    workload = JobSpec(**specs[0]).build_workload()
    prof = profile(workload)
    chosen = list(strategies.items())
    rows, notes = project(prof, workload, chosen, ns, target)
    target_loss = default_target(curves)
    df = table(rows, curves, target_loss)
    png = plot(sweep(prof, workload, chosen, target), f"{prof.workload} on {target.name} (speed x{target.speed:g})")
    md = ["## Projection", "", (f"Predicted on `{target.name}` (speed x{target.speed:g}) from a one-rank profile "
          f"({prof.seconds:.1f} s); time to loss {target_loss:.4f} = the run's steps to it x the predicted step. "
          "See docs/projection.md for what is modelled."), "",
          ("| strategy | N | layout | step s | compute s | exposed comm s | bubble s | MB inter | MB/rank state | "
          "to target s |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for r in df.itertuples():
        ttt = "-" if math.isnan(r.time_to_target_s) else f"{r.time_to_target_s:.1f}"
        md.append(f"| {r.strategy} | {r.workers} | {r.layout} | {r.predicted_step_s:.4f} | {r.predicted_compute_s:.4f} "
                  f"| {r.predicted_comm_s:.4f} | {r.predicted_bubble_s:.4f} | {r.bytes_inter / 1e6:.2f} | "
                  f"{r.state_bytes_per_rank / 1e6:.2f} | {ttt} |")
    md += [""] + [f"- {n}" for n in notes]
    return "\n".join(md), [(f"Predicted step time against N on {target.name}", base64.b64encode(png).decode())]
