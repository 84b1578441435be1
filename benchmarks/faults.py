"""Failure recovery and straggler mitigation, measured on gpt-tiny with 4 workers.

(a) recovery from one lost worker: a kill under ddp and fsdp, healed in place
    and with a full restart (failure.heal=false), a hang, and a SIGKILL from
    outside; the gap from the last step row before the failure to the first
    after it, each healing phase's seconds (detect, the survivors' settle,
    replace the actor (settle included), re-form the process group, transfer
    the state, first step) and the steps redone;
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


def _spec(args, storage: str, run_id: str, strategy: str = "ddp", **kw) -> JobSpec:
    return JobSpec(workload="gpt-tiny", strategy=strategy, workers=args.workers, steps=args.steps, seed=1,
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


def gap_s(result) -> float:
    """Seconds from the last step row before the failure (attempt 0) to the first
    completed step after it (every rank's row of the next attempt's first step):
    detection, healing or restart, and one step."""
    df = result.metrics
    before = df[df.attempt == 0].wall_time.max()
    after = df[df.attempt == 1]
    first = after[after.step == after.step.min()]
    return float(first.wall_time.max() - before)


def _phase(ev, kind: str) -> float:
    """Seconds of a phase, the slowest rank's where every rank reports it; nan if absent."""
    rows = ev[ev.kind == kind]
    return float(rows.seconds.max()) if len(rows) else float("nan")


def _kill_from_outside(folder: Path, after_step: int, killed: list) -> None:
    """SIGKILL one RankWorker of this Ray session once rank rows past ``after_step`` are stored."""
    import os
    import signal
    import time

    import pandas as pd
    from ray._private import state

    deadline = time.time() + 300
    while time.time() < deadline and not killed:
        time.sleep(0.2)
        try:
            if pd.read_parquet(folder / "metrics.parquet").step.max() < after_step:
                continue
        except (OSError, ValueError):
            continue
        pids = sorted(a["Pid"] for a in state.actors().values()
                      if a["ActorClassName"] == "RankWorker" and a["State"] == "ALIVE")
        if pids:
            os.kill(pids[-1], signal.SIGKILL)
            killed.append(pids[-1])


def recovery(args, storage: str) -> list[str]:
    """One lost worker of ``--workers``: kill (injected) under ddp and fsdp, healed in
    place and, for comparison, with a full restart (failure.heal=false); a hang; a
    SIGKILL from outside. The gap is from the last step row before the failure to
    the first step row after it."""
    import threading

    kill_at = args.steps // 2 + 2  # two steps after a snapshot/checkpoint boundary
    cases = [("ddp", "kill", True), ("ddp", "kill", False), ("fsdp", "kill", True), ("fsdp", "kill", False),
             ("ddp", "hang", True), ("ddp", "outside", True)]
    if args.cases:  # e.g. "ddp-kill-heal,fsdp-kill-restart"
        cases = [c for c in cases if f"{c[0]}-{c[1]}-{'heal' if c[2] else 'restart'}" in args.cases.split(",")]
    rows = [("| strategy | fault | recovery | gap s | detect s | settle s | replace s | re-form s | transfer s "
             "| first step s | steps redone |"), "|---|---|---|---|---|---|---|---|---|---|---|"]
    for strategy, fault, heal in cases:
        mode = "heal" if heal else "restart"
        run_id = f"{fault}-{strategy}-{mode}"
        failure = {"max_failures": 1, "backoff_s": 0.0, "snapshot_every": args.every, "heal": heal,
                   "hang_floor_s": 5}
        inject = {"kill": [f"kill:rank=1,step={kill_at}"], "hang": [f"hang:rank=1,step={kill_at}"],
                  "outside": ["slow:rank=0,factor=3"]}[fault]  # outside: slowed so the kill lands mid-run
        killed: list = []
        if fault == "outside":
            # rows are stored in batches: the first stored one is the sign, rank 0 slowed 3x leaves time
            threading.Thread(target=_kill_from_outside, args=(Path(storage) / run_id, 1, killed),
                             daemon=True).start()
        result = run(_spec(args, storage, run_id, strategy=strategy, inject=inject, failure=failure),
                     progress=False)
        ev = result.events
        if not (ev.kind == "recovered").any():  # the run ended before an outside kill landed
            rows.append(f"| {strategy} | {fault} | {mode} | no failure (killed: {killed}) |")
            print(rows[-1], flush=True)
            continue
        if args.events:
            cols = ["kind", "rank", "step", "seconds", "detail"]
            print(ev[ev.kind.str.startswith(("heal", "phase", "failure", "recovered"))][cols].to_string(), flush=True)
            steps = result.metrics.groupby(["attempt", "step"]).step_time_s.max()
            print(f"median step s (attempt 0): {steps.loc[0.0].median():.2f}; first step after: "
                  f"{steps.loc[1.0].iloc[0]:.2f}", flush=True)
        rec = ev[ev.kind == "recovered"].iloc[0]
        redone = int(rec["detail"].split(";")[1].split()[0])
        if heal:
            phases = [_phase(ev, k) for k in ("heal:detect", "heal:settle", "heal:replace", "heal:reform",
                                              "heal:transfer", "heal:first_step")]
        else:
            phases = [float("nan")] * 6
        rows.append(f"| {strategy} | {fault} | {mode} | {gap_s(result):.1f} | "
                    + " | ".join(f"{p:.2f}" for p in phases) + f" | {redone} |")
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
    p.add_argument("--cases", default="", help="recovery cases to run, e.g. ddp-kill-heal,ddp-kill-restart (default: all)")
    p.add_argument("--events", action="store_true", help="print each recovery run's heal and phase events")
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
