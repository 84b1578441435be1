"""Failure recovery and straggler mitigation, measured on gpt-tiny with 4 workers.

(a) recovery from a worker killed mid-run: detection (kill -> failure noticed),
    recovery (failure noticed -> first step completed after the restore) and
    steps lost, restoring from an in-memory snapshot and from a checkpoint;
(b) throughput with one worker slowed 3x, with each mitigation, as a fraction
    of a clean run's, and the final loss.

    python benchmarks/faults.py [--steps 60] [--workers 4] [--every 5]

Prints Markdown tables (docs/benchmarks.md records them). Runs on one embedded
Ray instance started once.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster import runtime as ray_runtime  # noqa: E402
from orchestrator import JobSpec, run  # noqa: E402
from orchestrator.metrics import final_attempt, samples_mean  # noqa: E402


def _spec(args, storage: str, run_id: str, **kw) -> JobSpec:
    return JobSpec(workload="gpt-tiny", strategy="ddp", workers=args.workers, steps=args.steps, seed=1,
                   storage=storage, run_id=run_id, **kw)


def throughput(result, wall: bool = False) -> float:
    """Tokens per second: over the steady second half of the steps (median step
    time), or over the whole run's wall time."""
    df = final_attempt(result.metrics)
    per_step = df.groupby("step").agg(t=("step_time_s", "max"), tokens=("tokens", "sum"))
    if wall:
        return float(per_step.tokens.sum() / result.wall_s)
    half = per_step[per_step.index > per_step.index.max() // 2]
    return float(half.tokens.median() / half.t.median())


def final_loss(result) -> float:
    df = final_attempt(result.metrics)
    last = df[df.step > df.step.max() - 5]  # mean of the last 5 steps: less noise than one
    return statistics.mean(samples_mean(g.loss, g.samples) for _, g in last.groupby("step"))


def recovery(args, storage: str) -> list[str]:
    kill_at = args.steps // 2 + 2  # two steps after a snapshot/checkpoint boundary
    rows = ["| restore from | detection s | recovery s | steps redone | interval |", "|---|---|---|---|---|"]
    for mode in ("snapshot", "checkpoint"):
        failure = {"max_failures": 1, "backoff_s": 0.0, "snapshot_every": args.every, "snapshots": mode == "snapshot"}
        spec = _spec(args, storage, f"kill-{mode}", inject=[f"kill:rank=1,step={kill_at}"], failure=failure,
                     checkpoint_every=args.every if mode == "checkpoint" else 0)
        result = run(spec, progress=False)
        ev = result.events.set_index("kind")
        # the kill fires as step kill_at starts, right after step kill_at - 1 ended (the
        # killed worker's own report of it usually dies with it)
        df = result.metrics
        killed_t = df[(df.step == kill_at - 1) & (df.attempt == 0)].wall_time.max()
        fail_t = ev.loc["failure:died", "wall_time"]
        rec = ev.loc["recovered"]
        redone = int(rec["detail"].split(";")[1].split()[0])
        rows.append(f"| {mode} | {fail_t - killed_t:.1f} | {rec['seconds']:.1f} | {redone} | {args.every} |")
        print(rows[-1], flush=True)
    return rows


def stragglers(args, storage: str) -> list[str]:
    clean = run(_spec(args, storage, "clean"), progress=False)
    base, base_wall = throughput(clean), throughput(clean, wall=True)
    rows = ["| mitigation | steady tokens/s | of clean | end-to-end of clean | final loss |", "|---|---|---|---|---|",
            f"| clean (no straggler) | {base:,.0f} | 1.00 | 1.00 | {final_loss(clean):.3f} |"]
    print(rows[-1], flush=True)
    for mitigation in args.mitigations.split(","):
        spec = _spec(args, storage, f"slow-{mitigation}", inject=["slow:rank=2,factor=3"],
                     straggler={"mitigation": mitigation, "patience": 3, "window": 5},
                     failure={"snapshot_every": args.every})
        result = run(spec, progress=False)
        tp = throughput(result)
        rows.append(f"| {mitigation} | {tp:,.0f} | {tp / base:.2f} | {throughput(result, wall=True) / base_wall:.2f} "
                    f"| {final_loss(result):.3f} |")
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--every", type=int, default=5, help="snapshot / checkpoint interval")
    p.add_argument("--only", choices=["recovery", "stragglers"])
    p.add_argument("--mitigations", default="none,rebalance,backup,evict", help="straggler runs (besides the clean one)")
    args = p.parse_args(argv)
    runtime = ray_runtime.start(address=None)  # every run below joins it
    try:
        with tempfile.TemporaryDirectory() as storage:
            out = []
            if args.only in (None, "recovery"):
                out += recovery(args, storage) + [""]
            if args.only in (None, "stragglers"):
                out += stragglers(args, storage)
            print("\n".join(out))
    finally:
        runtime.shutdown()


if __name__ == "__main__":
    main()
