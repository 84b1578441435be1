"""polytrain's DDP overhead against plain torchrun and Ray Train's TorchTrainer.

The same gpt-tiny DDP job (2 workers, 40 steps, micro-batch 8 per rank, one
thread per worker) three ways, each launched as a fresh process, as a user
would. Prints per launcher: median step time (rank 0, steps 6..N so warm-up
is excluded), time from launch to the end of the first step, total wall time.

    python benchmarks/ddp_overhead.py [--steps 40] [--workers 2] [--repeat 1]

Then, for each built-in workload, polytrain's ddp alone: step time, bytes sent
per rank per step, and time in communication (communication- vs compute-bound).

Ray Train needs `pip install "ray[train]"`; it is skipped if it does not import.
``--isolate`` adds the plain loop in Ray actors (``ray-actor``) and in a child
process of each actor (``ray-child``): a Ray worker process's cost to a step,
apart from Ray Train's and polytrain's.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import pandas as pd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WARMUP = 5


def _run(cmd: list[str], env_extra: dict | None = None) -> float:
    env = {**os.environ, "PYTHONPATH": ROOT, **(env_extra or {})}
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.time() - t0


def bench_polytrain(steps: int, workers: int, tmp: str) -> dict:
    launched = time.time()
    wall = _run([sys.executable, "-m", "orchestrator.cli", "run", "--workload", "gpt-tiny", "--strategy", "ddp",
                 "--workers", str(workers), "--steps", str(steps), "--storage", tmp, "--run-id", "bench", "--quiet"])
    df = pd.read_parquet(os.path.join(tmp, "bench", "metrics.parquet"))
    r0 = df[df["rank"] == 0].sort_values("step")
    return {"median_step_s": statistics.median(r0.step_time_s[WARMUP:]),
            "first_step_s": r0.wall_time.iloc[0] - launched, "wall_s": wall}


def _from_json(path: str, wall: float) -> dict:
    d = json.load(open(path))
    return {"median_step_s": statistics.median(d["step_times"][WARMUP:]),
            "first_step_s": d["first_step_wall"] - d["launched"], "wall_s": wall}


def bench_torchrun(steps: int, workers: int, tmp: str) -> dict:
    out = os.path.join(tmp, "torchrun.json")
    wall = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={workers}",
                 os.path.join(ROOT, "benchmarks", "_baseline.py"), "--steps", str(steps), "--out", out,
                 "--launched", repr(time.time())])
    return _from_json(out, wall)


def bench_ray_train(steps: int, workers: int, tmp: str) -> dict | None:
    try:
        import ray.train.torch  # noqa: F401
    except ImportError:
        return None
    out = os.path.join(tmp, "raytrain.json")
    code = (f"from benchmarks._baseline import ray_train_main; import time; "
            f"ray_train_main({steps}, {out!r}, {time.time()!r}, {workers})")
    wall = _run([sys.executable, "-c", code], {"RAY_TRAIN_V2_ENABLED": "1"})
    return _from_json(out, wall)


def _ray_actors(steps: int, workers: int, tmp: str, child: bool) -> dict:
    out = os.path.join(tmp, "rayactors.json")
    code = (f"from benchmarks._baseline import ray_actors_main; "
            f"ray_actors_main({steps}, {out!r}, {time.time()!r}, {workers}, {child})")
    return _from_json(out, _run([sys.executable, "-c", code]))


def bench_ray_actor(steps: int, workers: int, tmp: str) -> dict:
    return _ray_actors(steps, workers, tmp, child=False)


def bench_ray_child(steps: int, workers: int, tmp: str) -> dict:
    return _ray_actors(steps, workers, tmp, child=True)


def per_workload(steps: int, workers: int) -> None:
    from orchestrator import JobSpec, compare

    with tempfile.TemporaryDirectory() as tmp:
        specs = [JobSpec(workload=w, strategy="ddp", workers=workers, steps=steps, storage=tmp)
                 for w in ("gpt-tiny", "mlp-wide", "resnet-tiny")]
        summary = compare(specs, progress=False).summary
    print(f"\npolytrain ddp per workload ({workers} workers, {steps} steps, steps 4+)")
    print(f"{'workload':<12} {'median step s':>14} {'MB sent/step':>13} {'comm s/step':>12} {'idle s/step':>12}")
    for r in summary.itertuples():
        print(f"{r.workload:<12} {r.median_step_s:>14.4f} {r.bytes_sent_per_step / 1e6:>13.2f} "
              f"{r.comm_s_per_step:>12.4f} {r.idle_s_per_step:>12.4f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1, help="runs per launcher; figures are medians over runs")
    p.add_argument("--no-workloads", action="store_true", help="skip the per-workload table")
    p.add_argument("--isolate", action="store_true",
                   help="also the plain loop in Ray actors (ray-actor) and in a child process of each actor "
                        "(ray-child): what a Ray worker process costs a step, and what running the step "
                        "outside it would give")
    a = p.parse_args()
    results: dict[str, list[dict]] = {}
    for _ in range(a.repeat):
        launchers = [("torchrun", bench_torchrun), ("polytrain", bench_polytrain), ("ray-train", bench_ray_train)]
        if a.isolate:
            launchers += [("ray-actor", bench_ray_actor), ("ray-child", bench_ray_child)]
        for name, fn in launchers:
            with tempfile.TemporaryDirectory() as tmp:
                r = fn(a.steps, a.workers, tmp)
            if r:
                results.setdefault(name, []).append(r)
    print(f"gpt-tiny ddp, {a.workers} workers, {a.steps} steps, {os.cpu_count()} CPUs, medians of {a.repeat} run(s)")
    print(f"{'launcher':<10} {'median step s':>14} {'launch->1st step s':>19} {'total wall s':>13}")
    med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in results.items()}
    for name, m in med.items():
        print(f"{name:<10} {m['median_step_s']:>14.4f} {m['first_step_s']:>19.2f} {m['wall_s']:>13.2f}")
    if "torchrun" in med:
        t, pt = med["torchrun"], med["polytrain"]
        print(f"polytrain / torchrun median step: {pt['median_step_s'] / t['median_step_s']:.3f}x (target <= 1.03)")
        print(f"polytrain - torchrun first step: {pt['first_step_s'] - t['first_step_s']:+.2f} s (target <= 2)")
        for name in ("ray-actor", "ray-child"):  # --isolate: what a Ray worker process costs a step
            if name in med:
                print(f"{name} / torchrun median step: {med[name]['median_step_s'] / t['median_step_s']:.3f}x")
    if "ray-train" in med:
        print(f"polytrain / ray-train first step: {pt['first_step_s'] / med['ray-train']['first_step_s']:.2f}x "
              f"(target <= 0.4)")
    if "ray-train" not in med:
        print("ray-train: skipped (pip install 'ray[train]')")
    for name, rs in results.items():  # the spread behind each median
        print(f"{name:<10} runs: step s " + ", ".join(f"{r['median_step_s']:.4f}" for r in rs)
              + "; first step s " + ", ".join(f"{r['first_step_s']:.2f}" for r in rs))
    if not a.no_workloads:
        per_workload(a.steps, a.workers)


if __name__ == "__main__":
    main()
