"""polytrain command line. Exit codes: 0 success, 1 failed run, 2 invalid input, 130 interrupted
(Ctrl-C; 143 on SIGTERM, 129 on SIGHUP: 128 + the signal's number)."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors are bad input too: exit 2, one line
        self.exit(EXIT_INVALID, f"polytrain: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="polytrain", description="Distributed training on Ray with pluggable parallelism strategies.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    r = sub.add_parser("run", help="run a training job (embedded Ray unless --address)",
                       description="Run a training job. Precedence: --config file < flags < --set overrides.")
    r.add_argument("--workload", help="registered workload name (see `polytrain workloads`)")
    r.add_argument("--strategy", help="registered strategy name (see `polytrain strategies`)")
    r.add_argument("--workers", type=int, help="number of ranks (default 1)")
    r.add_argument("--steps", type=int, help="optimizer steps (default 100)")
    r.add_argument("--storage", help="folder or fsspec URL for run folders (default ~/polytrain_results)")
    r.add_argument("--run-id", dest="run_id", help="run folder name (default: generated)")
    r.add_argument("--checkpoint-every", dest="checkpoint_every", type=int, metavar="N",
                   help="write a sharded checkpoint every N steps (default: never)")
    r.add_argument("--resume", metavar="latest|URL",
                   help="continue from this run's newest committed checkpoint, or from a checkpoint URL")
    r.add_argument("--scenario", help="simulated network: a name from `polytrain scenarios` or "
                   "nodes=2,per_node=2,inter=1gbit,intra=50gbit,latency=200us (default local: none)")
    r.add_argument("--inject", action="append", default=[], metavar="FAULT",
                   help="inject a fault (repeatable): kill:rank=1,step=30[,at=checkpoint]  hang:rank=0,step=20  "
                   "slow:rank=2,factor=3[,from=10,to=50]  nan:step=40  netdelay:rank=1,ms=500")
    r.add_argument("--max-failures", dest="max_failures", type=int, metavar="N",
                   help="restart up to N times after a failure (default 0; see failure.* with --set)")
    r.add_argument("--straggler", metavar="none|rebalance|backup|evict",
                   help="straggler mitigation (default none: detect and report only)")
    r.add_argument("--config", help="YAML or TOML job spec")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any spec field, e.g. strategy.bucket_mb=10, optim.lr=3e-3, workload.d_model=128")
    r.add_argument("--address", help="Ray cluster to join (HOST:PORT, ray://HOST:PORT or auto)")
    r.add_argument("--quiet", action="store_true", help="no progress line")

    _add_matrix_commands(sub)
    _add_cluster_commands(sub)
    _add_pipeline_commands(sub)
    from orchestrator.project import add_parser as _add_project_command  # noqa: E402

    _add_project_command(sub)
    for name, what in (("workloads", "registered workloads and their options"),
                       ("strategies", "registered strategies and their options"),
                       ("scenarios", "simulated network scenarios (--scenario)")):
        sub.add_parser(name, help=f"list {what}", description=f"List {what}.")
    return p


def _add_matrix_commands(sub) -> None:
    c = sub.add_parser("compare", help="run strategies x scenarios and write a comparison report",
                       description="Run every strategy x scenario one after another (same seed and data), keep "
                       "going when one fails, and write the run folders, report.html and report.md under --out.")
    c.add_argument("--workload", help="registered workload name")
    c.add_argument("--strategies", help="comma-separated, options after a colon: ddp,fsdp,powersgd:rank=4")
    c.add_argument("--scenarios", help="comma-separated scenario names (default local)")
    c.add_argument("--workers", type=int, help="ranks per run")
    c.add_argument("--steps", type=int, help="optimizer steps per run")
    c.add_argument("--seed", type=int, help="seed shared by every run (default 0)")
    c.add_argument("--target-loss", dest="target_loss", type=float,
                   help="loss the ranking times runs to: held-out where every run evaluated, else training "
                   "(default: per scenario, the worst final one)")
    c.add_argument("--out", help="folder or fsspec URL for run folders and the report")
    c.add_argument("--repeat", type=int, metavar="N", help="run the whole matrix N times round-robin (default 1); "
                   "time figures become medians with their min-max, rankings inside it are marked within noise")
    c.add_argument("--tune", action="append", default=[], metavar="KEY=v1,v2,...",
                   help="tune each strategy over these values of a --set-able key (repeatable: the cartesian grid) "
                   "on a short budget, then compare each at its best by final held-out loss, e.g. optim.lr=1e-3,3e-3")
    c.add_argument("--tune-steps", dest="tune_steps", type=int, metavar="N",
                   help="steps of each tuning run (default: a quarter of --steps, rounded up)")
    c.add_argument("--config", help="YAML/TOML: any job spec keys plus strategies: and scenarios: lists "
                   "(and repeat:, tune: {KEY: [values]}, tune_steps:; a strategy may carry its own tune:)")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a job spec field for every run, e.g. workload.d_model=64")
    c.add_argument("--address", help="Ray cluster to join (HOST:PORT, ray://HOST:PORT or auto)")
    c.add_argument("--quiet", action="store_true", help="no per-run progress line")
    _add_project_on(c)

    r = sub.add_parser("report", help="render a report from existing run folders",
                       description="Render report.html and report.md from run folders (paths or fsspec URLs; "
                       "a compare --out folder stands for all its runs).")
    r.add_argument("runs", nargs="+", metavar="RUN_DIR")
    r.add_argument("--out", required=True, help="folder or fsspec URL for report.html and report.md")
    r.add_argument("--target-loss", dest="target_loss", type=float, help="loss the ranking times runs to")
    _add_project_on(r)


def _add_project_on(p) -> None:
    p.add_argument("--project-on", dest="project_on", metavar="SCENARIO",
                   help="the report's projection section: the runs projected on 8, 64 and 1024 workers of this "
                   "scenario (default: the first scenario; none: no section)")
    p.add_argument("--project-speed", dest="project_speed", type=float, metavar="X",
                   help="with --project-on: each worker computes X times one core of this machine")


def _project_on(args: argparse.Namespace, base: dict | None = None):
    """--project-on/--project-speed (over a compare file's project_on:, project_speed:)."""
    import math

    from orchestrator.config import ConfigError, ProjectOn

    base = base if base is not None else {}
    scenario, speed = base.pop("project_on", None), base.pop("project_speed", None)  # the flags win
    scenario = args.project_on if args.project_on is not None else scenario
    speed = args.project_speed if args.project_speed is not None else speed
    if speed is not None and not (isinstance(speed, (int, float)) and math.isfinite(speed) and speed > 0):
        raise ConfigError(f"--project-speed {speed!r}: must be a number > 0 (a worker's speed relative to one core "
                          f"here)")
    if scenario not in (None, "none"):
        from orchestrator.project import parse_target

        try:
            parse_target(str(scenario), speed, [8])
        except ValueError as e:
            raise ConfigError(f"--project-on {scenario!r}: {e}") from None
    return ProjectOn(scenario=None if scenario is None else str(scenario), speed=speed)


def _add_dashboard(p) -> None:
    p.add_argument("--dashboard", help="Ray dashboard, e.g. http://HEAD:8265 (default: $RAY_ADDRESS)")
    # the old name, which `run` uses for the Ray cluster itself: still taken, with a note (_dashboard)
    p.add_argument("--address", dest="old_address", help=argparse.SUPPRESS)


def _add_cluster_commands(sub) -> None:
    s = sub.add_parser("submit", help="submit a job to a Ray cluster (job submission API)",
                       description="Submit a job to a Ray cluster. Takes the `run` options; --storage must be "
                       "a location the cluster can write and you can read (shared filesystem or object store).")
    for a in ("--workload", "--strategy", "--storage", "--run-id", "--scenario", "--straggler", "--resume", "--config"):
        s.add_argument(a, dest=a[2:].replace("-", "_"), help="as in `polytrain run`")
    for a in ("--workers", "--steps", "--checkpoint-every", "--max-failures"):
        s.add_argument(a, dest=a[2:].replace("-", "_"), type=int, help="as in `polytrain run`")
    s.add_argument("--inject", action="append", default=[], metavar="FAULT", help="as in `polytrain run`")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="as in `polytrain run`")
    s.add_argument("--exclude", dest="excludes", action="append", default=[], metavar="PATTERN",
                   help="leave files matching this gitignore pattern out of the upload (repeatable); secrets, "
                   "environments, checkpoints and runs/ are always left out")
    _add_dashboard(s)
    s.add_argument("--wait", action="store_true", help="follow the job to its end; exit 1 if it fails")
    s.add_argument("--follow", action="store_true", help="with --wait: print its logs as they come")
    for name, what in (("status", "a submitted job's state (exit 1 if it failed or was stopped)"),
                       ("logs", "a submitted job's logs"), ("stop", "stop a submitted job")):
        p = sub.add_parser(name, help=what, description=what[0].upper() + what[1:] + ".")
        p.add_argument("job_id", metavar="JOB")
        _add_dashboard(p)
        if name == "logs":
            p.add_argument("--follow", action="store_true", help="keep printing until the job ends")


def _add_pipeline_commands(sub) -> None:
    pl = sub.add_parser("pipeline", help="pipeline schedules: simulate and draw one, or chart a run's timeline",
                        description="Pipeline schedules.")
    show = pl.add_subparsers(dest="pipeline_command", required=True, parser_class=_Parser).add_parser(
        "show", help="a schedule as a per-rank grid and a Gantt chart (or --run: a measured step)",
        description="Simulate a schedule and print its per-rank grid, makespan, bubble and peak activations, and "
                    "with --out draw its Gantt chart there; with --run and --out, draw a measured step of a "
                    "pipeline run instead. Nothing is written without --out.")
    show.add_argument("--schedule", default="zb-h1", help="gpipe, 1f1b, interleaved-1f1b, zb-h1, zb-h2, zb-v or auto")
    show.add_argument("--stages", type=int, default=4, help="pipeline ranks (default 4)")
    show.add_argument("--microbatches", type=int, default=8, help="micro-batches per step (default 8)")
    show.add_argument("--costs", default="1,1,1", metavar="F,B,W", help="per-rank F, B, W times (default 1,1,1)")
    show.add_argument("--comm", type=float, default=0.0, help="time of one cross-rank transfer (default 0)")
    show.add_argument("--chunks", type=int, default=2, help="stages per rank for interleaved (default 2)")
    show.add_argument("--memory-limit", type=float, default=None,
                      help="auto: the most micro-batches of activations a rank may hold")
    show.add_argument("--run", default=None, metavar="RUN_FOLDER", help="chart this run's measured timeline")
    show.add_argument("--step", type=int, default=None, help="with --run: the step (default the last)")
    show.add_argument("--out", default=None, help="write the Gantt chart PNG here (nothing is written without it)")


def cmd_compare(args: argparse.Namespace) -> int:
    from orchestrator.compare import parse_strategies, run_matrix
    from orchestrator.config import ConfigError, apply_overrides, read_config_file

    _check_target_loss(args.target_loss)
    base = read_config_file(args.config) if args.config else {}
    strategies = base.pop("strategies", None)
    scenarios = base.pop("scenarios", None)
    repeat, make_tuning = _repeat_and_tuning(args, base)
    project_on = _project_on(args, base)
    if args.strategies is not None:
        strategies = args.strategies
    if isinstance(strategies, str):
        strategies = parse_strategies(strategies)
    strategies = [{"name": s} if isinstance(s, str) else dict(s) for s in (strategies or [])]
    if not strategies:
        raise ConfigError("--strategies: empty (give e.g. --strategies ddp,fsdp or strategies: in --config)")
    tuning = make_tuning(strategies)
    if args.scenarios is not None:
        scenarios = args.scenarios
    if isinstance(scenarios, str):
        scenarios = [s.strip() for s in scenarios.split(",") if s.strip()]
        if not scenarios:
            raise ConfigError(f"--scenarios {args.scenarios!r}: empty (give e.g. local,internet-1g)")
    scenarios = scenarios or ["local"]
    for key in ("workload", "workers", "steps", "seed"):
        if getattr(args, key) is not None:
            base[key] = getattr(args, key)
    apply_overrides(base, args.overrides)
    if "workload" not in base:
        raise ConfigError("--workload: required (or workload: in --config)")
    out = args.out or base.pop("out", None)
    if not out:
        raise ConfigError("--out: required (a folder or fsspec URL for the run folders and the report)")
    combos, html_url, md_url = run_matrix(base, strategies, scenarios, out, address=args.address,
                                          target_loss=args.target_loss, progress=not args.quiet, repeat=repeat,
                                          tuning=tuning, project_on=project_on)
    failed = [c for c in combos if c.status != "ok"]
    print(f"{len(combos) - len(failed)}/{len(combos)} runs succeeded\nreport: {html_url}\n        {md_url}")
    return EXIT_FAILED if len(failed) == len(combos) else EXIT_OK


def _repeat_and_tuning(args: argparse.Namespace, base: dict):
    """--repeat and --tune (flags over the compare file's repeat:, tune:, tune_steps:):
    the repeat count and a function of the strategies (whose own tune: it takes out)
    returning the Tuning, or None."""
    from orchestrator.compare import Tuning, file_tune, parse_tune
    from orchestrator.config import ConfigError

    repeat, steps = base.pop("repeat", 1), base.pop("tune_steps", None)  # the flags win
    repeat = repeat if args.repeat is None else args.repeat
    steps = steps if args.tune_steps is None else args.tune_steps
    if not isinstance(repeat, int) or isinstance(repeat, bool) or repeat < 1:
        raise ConfigError(f"--repeat {repeat!r}: must be an integer >= 1 (passes of the whole matrix)")
    common = file_tune(base.pop("tune", None), "tune") | parse_tune(args.tune)
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise ConfigError(f"--tune-steps {steps!r}: must be an integer >= 1 (steps of each tuning run)")

    def tuning(strategies: list[dict]) -> Tuning | None:
        grids = [common | file_tune(s.pop("tune", None), f"strategies.{s.get('name')}.tune") for s in strategies]
        if steps is not None and not any(grids):
            raise ConfigError(f"--tune-steps {steps}: given without a grid (add --tune KEY=v1,v2,...)")
        return Tuning(grids=grids, steps=steps) if any(grids) else None

    return repeat, tuning


def _check_target_loss(target: float | None) -> None:
    import math

    from orchestrator.config import ConfigError

    if target is not None and not math.isfinite(target):
        raise ConfigError(f"--target-loss {target!r}: must be a finite number (a loss the runs reach)")


def cmd_report(args: argparse.Namespace) -> int:
    from orchestrator.config import ConfigError, check_protocol
    from orchestrator.report import report_from_urls

    _check_target_loss(args.target_loss)
    urls = [("--out", args.out)] + [("RUN_DIR", u) for u in args.runs]
    for flag, url in [(f, u) for f, u in urls if "://" in u]:  # a typo'd protocol: one line, not fsspec's trace
        try:
            check_protocol(url)
        except ValueError as e:
            raise ConfigError(f"{flag} {url!r}: {e}") from None
    html_url, md_url = report_from_urls(args.runs, args.out, target_loss=args.target_loss,
                                        project_on=_project_on(args))
    print(f"report: {html_url}\n        {md_url}")
    return EXIT_OK


def _dashboard(args: argparse.Namespace) -> str | None:
    """The dashboard of submit, status, logs and stop: --dashboard, or its deprecated
    name --address (one note on stderr)."""
    from orchestrator.errors import ConfigError

    if args.old_address is None:
        return args.dashboard
    if args.dashboard is not None:
        raise ConfigError(f"--address {args.old_address!r}: give the dashboard once, as --dashboard "
                          f"(--address is its deprecated name)")
    print(f"polytrain: note: `polytrain {args.command} --address` is deprecated, use --dashboard "
          f"(--address names the Ray cluster in `polytrain run`)", file=sys.stderr)
    return args.old_address


def cmd_submit(args: argparse.Namespace) -> int:
    from orchestrator.config import ConfigError, load_spec, read_config_file

    dashboard = _dashboard(args)
    overrides = list(args.overrides)
    if args.max_failures is not None:
        overrides.insert(0, f"failure.max_failures={args.max_failures}")
    if args.straggler:
        overrides.insert(0, f"straggler.mitigation={args.straggler}")
    if not args.storage and not (args.config and "storage" in read_config_file(args.config)) and \
            not any(o.startswith("storage=") for o in overrides):
        raise ConfigError("--storage: required for submit (a shared path or object store URL the cluster "
                          "writes and you read)")
    spec = load_spec(config=args.config, overrides=overrides, workload=args.workload, strategy=args.strategy,
                     workers=args.workers, steps=args.steps, storage=args.storage, run_id=args.run_id,
                     checkpoint_every=args.checkpoint_every, resume=args.resume, scenario=args.scenario,
                     inject=args.inject or None)
    from orchestrator import submit as sub  # imports Ray: only for a valid spec

    job = sub.submit(spec, address=dashboard, excludes=args.excludes)
    print(f"job: {job.job_id}\nrun folder: {job.run_url}\nfollow: polytrain logs {job.job_id} --follow "
          f"--dashboard {job.dashboard}", flush=True)
    if not args.wait:
        return EXIT_OK
    st = sub.wait(job.job_id, address=dashboard, follow_logs=args.follow)
    return _print_state(st)


def _print_state(st) -> int:
    print(f"{st.job_id}: {st.status}" + (f"\nrun folder: {st.run_url}" if st.run_url else ""))
    if st.status == "FAILED":
        print(f"polytrain: job failed: {st.error}", file=sys.stderr)
    return EXIT_FAILED if st.status in ("FAILED", "STOPPED") else EXIT_OK


def cmd_job(args: argparse.Namespace) -> int:
    dashboard = _dashboard(args)
    from orchestrator import submit as sub

    if args.command == "status":
        return _print_state(sub.status(args.job_id, address=dashboard))
    if args.command == "stop":
        st = sub.stop(args.job_id, address=dashboard)
        print(f"{st.job_id}: {st.status}")
        return EXIT_OK if st.status in sub.TERMINAL else EXIT_FAILED
    if args.follow:
        sub.follow(args.job_id, address=dashboard)
    else:
        sys.stdout.write(sub.logs(args.job_id, address=dashboard))
    return EXIT_OK


def _type_text(annotation) -> str:
    import typing

    if typing.get_origin(annotation) is typing.Literal:
        return "choice"  # the description lists the values
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _default_text(f) -> str:
    """A field's default as a user would write it: ``required`` when it has none,
    a default factory's value (``{}``), else the value."""
    if f.is_required():
        return "required"
    return repr(f.get_default(call_default_factory=True, validated_data={}))


def _options_lines(model_cls) -> list[str]:
    """One line per typed option of a pydantic model, in aligned columns: name, type, default, description."""
    rows = [(name, _type_text(f.annotation), f"default {_default_text(f)}", f.description or "")
            for name, f in model_cls.model_fields.items()]
    if not rows:
        return ["      (no options)"]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return ["      " + "  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]


def cmd_workloads() -> int:
    from workloads import WORKLOADS

    for name in WORKLOADS.names():
        cls = WORKLOADS.get(name)
        print(f"{name:<14} {(cls.__doc__ or '').strip().splitlines()[0]}")
        print(*_options_lines(cls), sep="\n")
    return EXIT_OK


def cmd_strategies() -> int:
    from strategies import STRATEGIES
    from workloads import WORKLOADS

    workloads = {n: WORKLOADS.get(n) for n in WORKLOADS.names()}
    for name in STRATEGIES.names():
        cls = STRATEGIES.get(name)
        print(f"{name:<14} {(cls.__doc__ or '').strip().splitlines()[0]}")
        print(*_options_lines(cls.Options), sep="\n")
        why_not = {w: cls.unsupported(wcls) for w, wcls in workloads.items()}
        print(f"      trains: {', '.join(w for w, why in why_not.items() if not why) or '-'}")
        for w, why in why_not.items():
            if why:
                print(f"      not {w}: {why}")
    return EXIT_OK


def cmd_scenarios() -> int:
    from cluster.network import describe

    for name, line in describe():
        print(f"{name:<16} {line}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from orchestrator.config import load_spec

    overrides = list(args.overrides)
    if args.address:
        overrides.insert(0, f"cluster.address={args.address}")
    if args.max_failures is not None:
        overrides.insert(0, f"failure.max_failures={args.max_failures}")
    if args.straggler:
        overrides.insert(0, f"straggler.mitigation={args.straggler}")
    spec = load_spec(
        config=args.config, overrides=overrides, workload=args.workload, strategy=args.strategy,
        workers=args.workers, steps=args.steps, storage=args.storage, run_id=args.run_id,
        checkpoint_every=args.checkpoint_every, resume=args.resume, scenario=args.scenario,
        inject=args.inject or None,
    )
    from orchestrator.driver import run  # imports torch: only for a valid spec

    result = run(spec, progress=not args.quiet)
    print(f"done: {result.steps} steps in {result.wall_s:.1f} s, final loss {result.final_loss:.4f}\n"
          f"run folder: {result.url}" + (f"\nlast checkpoint: {result.checkpoint}" if result.checkpoint else ""))
    return EXIT_OK


def cmd_pipeline_show(args: argparse.Namespace) -> int:
    import os

    from orchestrator.config import ConfigError
    from orchestrator.storage import check_writable
    from strategies.pipeline.show import show, show_run

    if args.out:  # a local PNG (matplotlib writes it): its folder must take it
        check_writable(os.path.dirname(os.path.abspath(args.out)), "--out", shown=args.out)

    if args.run:  # a measured timeline has no text form: it is drawn, and only where --out says
        if not args.out:
            raise ConfigError(f"--run {args.run!r}: needs --out FILE.png (where to draw the measured step)")
        try:
            print(f"chart: {show_run(args.run, step=args.step, out=args.out)}")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return EXIT_OK
    try:
        costs = tuple(float(x) for x in args.costs.split(","))
        if len(costs) != 3 or min(costs) < 0:
            raise ValueError
    except ValueError:
        print(f"polytrain: error: --costs={args.costs!r}: three non-negative numbers F,B,W (e.g. 1,1,1)",
              file=sys.stderr)
        return EXIT_INVALID
    try:
        show(args.schedule, args.stages, args.microbatches, costs=costs, comm=args.comm, chunks=args.chunks,
             memory_limit=args.memory_limit, out=args.out)
    except ValueError as e:
        print(f"polytrain: error: {e}", file=sys.stderr)
        return EXIT_INVALID
    return EXIT_OK


def _cluster_error(e: BaseException) -> bool:
    """A ClusterError (bad input about the cluster), told apart without importing
    Ray: it is raised only by cluster.runtime, which is imported if it was."""
    runtime = sys.modules.get("cluster.runtime")
    return runtime is not None and isinstance(e, runtime.ClusterError)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from orchestrator.errors import ConfigError, RunFailed

    try:
        if args.command == "workloads":
            return cmd_workloads()
        if args.command == "strategies":
            return cmd_strategies()
        if args.command == "scenarios":
            return cmd_scenarios()
        if args.command == "compare":
            return cmd_compare(args)
        if args.command == "report":
            return cmd_report(args)
        if args.command == "submit":
            return cmd_submit(args)
        if args.command in ("status", "logs", "stop"):
            return cmd_job(args)
        if args.command == "pipeline":
            return cmd_pipeline_show(args)
        if args.command == "project":
            from orchestrator.project import run_cli

            return run_cli(args)
        return cmd_run(args)
    except ConfigError as e:
        print(f"polytrain: error: {e}", file=sys.stderr)
        return EXIT_INVALID
    except RunFailed as e:
        print(f"polytrain: run failed: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", None)  # driver.Interrupted: SIGTERM or SIGHUP
        print(f"polytrain: interrupted{f' ({e})' if signum else ''}; workers stopped", file=sys.stderr)
        return 128 + signum if signum else EXIT_INTERRUPTED
    except Exception as e:
        if not _cluster_error(e):
            raise
        print(f"polytrain: error: {e}", file=sys.stderr)
        return EXIT_INVALID


if __name__ == "__main__":
    sys.exit(main())
