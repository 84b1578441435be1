"""Projection against measurement on this machine: predicted vs measured median step time.

For each method, N and scenario, ``polytrain project``'s model predicts the step
of N workers sharing this machine's cores under the scenario (``Target(cores=C)``),
from one one-rank profile of the workload; then the same jobs run (interleaved
repeats: the machine's load drifts) and the measured step time is the one
definition the comparison uses (``summarize``: the median over steady steps of
the slowest rank's ``step_time_s``), the median over repeats. Target: |error|
within 15 % for every row.

    python benchmarks/projection.py [--methods ddp fsdp ...] [--workers 2 4]
        [--scenarios local internet-1g] [--repeats 3] [--steps 10]

Each replica's batch is the workload's micro-batch x ``--microbatches`` (the
pipeline's micro-batches, else gradient accumulation), as the projection
assumes; PowerSGD runs without its uncompressed warm-up (``warmup_steps=0``) so
that its steady steps are the compressed ones the model describes.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile

from orchestrator import JobSpec, compare
from orchestrator.metrics import summarize
from orchestrator.project import profile
from strategies.projection import Skip, Target, job_for, predict

WORKLOAD = {"name": "gpt-tiny", "seq_len": 64, "micro_batch": 4}
METHODS = ("ddp", "fsdp", "zero2", "pipeline", "sequence", "powersgd", "demo")
OPTIONS = {"powersgd": {"warmup_steps": 0}}


def spec_of(job, *, steps: int, scenario: str, storage: str, micro_batch: int) -> JobSpec:
    """The run the projection of ``job`` describes."""
    L, m = job.layout, job.microbatches
    strategy = {"name": job.strategy, **OPTIONS.get(job.strategy, {})}
    accum = m
    if job.strategy == "pipeline":
        strategy.update(stages=L.pp, microbatches=m)
        accum = 1
    if job.strategy == "sequence":
        strategy.update(ring=L.sp // job.ulysses)
    replicas = L.dp * L.fsdp
    return JobSpec(workload=WORKLOAD, strategy=strategy, workers=L.world, steps=steps, seed=0, storage=storage,
                   batch_size=micro_batch * m * replicas, grad_accum=accum, scenario=scenario)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--workers", nargs="+", type=int, default=[2, 4])
    p.add_argument("--scenarios", nargs="+", default=["local", "internet-1g"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--microbatches", type=int, default=2)
    a = p.parse_args()
    from cluster.network import parse_scenario

    base = JobSpec(workload=WORKLOAD, strategy="single", workers=1, steps=1)
    workload = base.build_workload()
    prof = profile(workload)
    n_blocks = len(prof.blocks)
    cores = os.cpu_count() or 1
    print(f"profile: {prof.seconds:.1f} s, {prof.steps} passes; {cores} cores shared by the N workers")
    rows = []  # (method, N, scenario, prediction, job)
    for sc in a.scenarios:
        target = Target(scenario=parse_scenario(sc), cores=cores)
        for name in a.methods:
            for n in a.workers:
                try:
                    job = job_for(name, OPTIONS.get(name, {}), n, workload, microbatches=a.microbatches,
                                  n_blocks=n_blocks)
                except Skip as e:
                    print(f"skip: {e}")
                    continue
                rows.append((name, n, sc, predict(prof, job, target), job))
    measured: dict[int, list[float]] = {i: [] for i in range(len(rows))}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(a.repeats):  # interleaved: every row once per repeat
            specs = [spec_of(job, steps=a.steps, scenario=sc, storage=tmp, micro_batch=workload.micro_batch)
                     for _, _, sc, _, job in rows]
            for i, run in enumerate(compare(specs, progress=False).runs):
                measured[i].append(summarize(run.metrics)["median_step_s"])
    print(f"{'method':<9} {'N':>2} {'scenario':<12} {'layout':<10} {'predicted':>9} {'(comp':>7} {'comm':>7} "
          f"{'bubble)':>7} {'measured':>9} {'|error|':>8}")
    errors = []
    for i, (name, n, sc, pred, job) in enumerate(rows):
        got = statistics.median(measured[i])
        err = abs(pred.step_s - got) / got
        errors.append(err)
        print(f"{name:<9} {n:>2} {sc:<12} {pred.layout:<10} {pred.step_s:>9.3f} {pred.compute_s:>7.3f} "
              f"{pred.comm_s:>7.3f} {pred.bubble_s:>7.3f} {got:>9.3f} {err:>7.1%}{'' if err <= 0.15 else '  miss'}")
    print(f"median |error| {statistics.median(errors):.1%}; within 15 %: {sum(e <= 0.15 for e in errors)}/{len(errors)}")


if __name__ == "__main__":
    main()
