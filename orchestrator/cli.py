"""polytrain command line. Exit codes: 0 success, 1 failed run, 2 invalid input, 130 interrupted."""
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
    r.add_argument("--storage", help="folder or fsspec URL for run folders (default ./runs)")
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

    for name, what in (("workloads", "registered workloads and their options"),
                       ("strategies", "registered strategies and their options"),
                       ("scenarios", "simulated network scenarios (--scenario)")):
        sub.add_parser(name, help=f"list {what}", description=f"List {what}.")
    return p


def _options_lines(model_cls) -> list[str]:
    """One line per typed option of a pydantic model: name, type, default, description."""
    lines = []
    for name, f in model_cls.model_fields.items():
        t = getattr(f.annotation, "__name__", None) or str(f.annotation).replace("typing.", "")
        lines.append(f"      {name:<16} {t:<10} default {f.default!r:<10} {f.description or ''}")
    return lines or ["      (no options)"]


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
    from orchestrator.driver import run

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
    result = run(spec, progress=not args.quiet)
    print(f"done: {result.steps} steps in {result.wall_s:.1f} s, final loss {result.final_loss:.4f}\n"
          f"run folder: {result.url}" + (f"\nlast checkpoint: {result.checkpoint}" if result.checkpoint else ""))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cluster.runtime import ClusterError
    from orchestrator.config import ConfigError
    from orchestrator.driver import RunFailed

    try:
        if args.command == "workloads":
            return cmd_workloads()
        if args.command == "strategies":
            return cmd_strategies()
        if args.command == "scenarios":
            return cmd_scenarios()
        return cmd_run(args)
    except (ConfigError, ClusterError) as e:
        print(f"polytrain: error: {e}", file=sys.stderr)
        return EXIT_INVALID
    except RunFailed as e:
        print(f"polytrain: run failed: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("polytrain: interrupted; workers stopped", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
