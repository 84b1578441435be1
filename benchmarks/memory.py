"""Per-rank model-state memory and step time: ddp, fsdp, zero1/2/3 at 1, 2 and 4 workers.

gpt-tiny widened to d_model 512, 8 layers (25 M parameters), micro-batch 4,
sequence 128. All jobs run on one embedded Ray instance. Prints per rank:
parameter, gradient and optimizer bytes as the strategy holds them (measured on
the tensors at the second step; zero* also hold an fp32 master copy of their
partition, shown apart), peak process memory, and median step time.

    python benchmarks/memory.py [--steps 5] [--workers 1 2 4]
"""
from __future__ import annotations

import argparse
import tempfile

from orchestrator import JobSpec, compare

WORKLOAD = {"name": "gpt-tiny", "d_model": 512, "n_layers": 8, "n_heads": 8, "micro_batch": 4}
STRATEGIES = ("ddp", "fsdp", "zero1", "zero2", "zero3")
MB = 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        specs = [JobSpec(workload=WORKLOAD, strategy=s, workers=w, steps=a.steps, storage=tmp)
                 for w in a.workers for s in STRATEGIES]
        runs = compare(specs, progress=False).runs
        rows = []
        for spec, run in zip(specs, runs):
            m = run.metrics
            last = m[m.step == m.step.max()].iloc[0]  # rank 0
            state = {k: float(last.get(k, float("nan"))) / MB for k in
                     ("param_bytes", "grad_bytes", "optim_bytes", "master_bytes")}
            step_s = m[m.step > 1].groupby("step").step_time_s.max().median()
            rows.append((spec.strategy.name, spec.workers, state, float(m.peak_mem_bytes.max()) / MB, step_s))
    base = {w: next(r[2] for r in rows if r[0] == "ddp" and r[1] == w) for w in a.workers}
    print(f"gpt-tiny d_model 512, 8 layers; MiB per rank (rank 0); step time: slowest rank, median of steps 2+")
    print(f"{'strategy':<8} {'workers':>7} {'params':>8} {'grads':>8} {'optim':>8} {'p+g+o':>8} "
          f"{'vs ddp':>7} {'master':>8} {'peak RSS':>9} {'step s':>7}")
    for name, w, s, peak, step_s in rows:
        total = s["param_bytes"] + s["grad_bytes"] + s["optim_bytes"]
        ddp_total = sum(base[w][k] for k in ("param_bytes", "grad_bytes", "optim_bytes"))
        master = "-" if s["master_bytes"] != s["master_bytes"] else f"{s['master_bytes']:.1f}"
        print(f"{name:<8} {w:>7} {s['param_bytes']:>8.1f} {s['grad_bytes']:>8.1f} {s['optim_bytes']:>8.1f} "
              f"{total:>8.1f} {total / ddp_total:>7.2f} {master:>8} {peak:>9.0f} {step_s:>7.3f}")
    print("target: fsdp and zero3 p+g+o <= 1/N + 10% of ddp's; zero1 shards optimizer state, zero2 also gradients")


if __name__ == "__main__":
    main()
