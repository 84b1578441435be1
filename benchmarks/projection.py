"""Projection against measurement on this machine: predicted vs measured median step time.

For each method, N and scenario, ``polytrain project``'s model predicts the step
of N workers sharing this machine's cores under the scenario (``Target(cores=C)``),
from a one-rank profile of the workload; then the same jobs run (interleaved
repeats: the machine's load drifts) and the measured step time is the one
definition the comparison uses (``summarize``: the median over steady steps of
the slowest rank's ``step_time_s``), the median over repeats. Target: |error|
within 15 % for every row.

    python benchmarks/projection.py [--methods ddp fsdp ...] [--workers 2 4]
        [--scenarios local internet-1g] [--repeats 3] [--steps 10] [--record FILE]
    python benchmarks/projection.py --table FILE
    python benchmarks/projection.py --at-scale
    python benchmarks/projection.py --without-ray [--methods ddp sequence] [--scenarios local]

``--without-ray`` runs every row twice, interleaved: as ``polytrain`` runs it
(Ray actors) and as N forked processes over gloo running the same
``RankTrainer`` steps (no Ray, no driver), and prints, per row, the prediction
(from a profile taken just before), a forked rank's median step (what the model
describes: one plain process), the forked slowest-rank statistic (the measured
figure's definition, ``summarize``'s ``slowest_ranks`` over ``steady`` steps)
and the polytrain run's, and a forked rank's CPU seconds a step (its median):
what of a row's miss is the model's, what the statistic's (the slowest of N
ranks each step) and what the ranks' being Ray worker processes.

``--at-scale`` projects gpt-tiny widened to 1 B parameters on 64 workers
(8 nodes x 8, 400 Gbit/s in a node, 25 Gbit/s between) and on 2 islands x 32
over 1 Gbit/s, every strategy with a model. A 1 B model's profile does not fit
this machine's memory, so the profile is taken at the target width with 2 of
its 20 blocks and the middle block repeated (``deepen``: blocks of one shape
cost the same; the optimizer's and the methods' own step scale with the
parameters).

Every row is predicted from profiles taken just before and just after its run
(the mean of the two predictions), so a prediction and the run it describes see
the machine's load of the same minute (other jobs share it, and this machine's
speed drifts: single steps had medians of 0.32-0.47 s within 20 minutes); a
row's predicted figure is the median of its repeats' predictions. ``--record``
appends each repeat's rows (and ``uptime``) to a JSON-lines file, so the
validation can be split into short invocations (a scenario or a repeat at a
time) whose rows ``--table`` then gathers into one table.

Each replica's batch is the workload's micro-batch x ``--microbatches`` (the
pipeline's micro-batches, else gradient accumulation), as the projection
assumes; PowerSGD runs without its uncompressed warm-up (``warmup_steps=0``) so
that its steady steps are the compressed ones the model describes.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # benchmarks._baseline and tests.ranks (--without-ray)

from orchestrator import JobSpec  # noqa: E402
from orchestrator.metrics import summarize  # noqa: E402
from orchestrator.project import profile  # noqa: E402
from strategies.projection import Skip, Target, job_for, predict  # noqa: E402

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


def plan(workload, methods, workers, scenarios, microbatches: int) -> list:
    """(method, N, scenario, job) of every row the layout rules make."""
    from strategies.pipeline.part import count_blocks

    rows = []
    for sc in scenarios:
        for name in methods:
            for n in workers:
                try:
                    job = job_for(name, OPTIONS.get(name, {}), n, workload, microbatches=microbatches,
                                  n_blocks=count_blocks(workload))
                except Skip as e:
                    print(f"skip: {e}")
                    continue
                rows.append((name, n, sc, job))
    return rows


def here(scenario: str) -> Target:
    """This machine under ``scenario``: its cores shared by the workers."""
    from cluster.network import parse_scenario

    return Target(scenario=parse_scenario(scenario), cores=os.cpu_count() or 1)


def repeat(workload, a, record=lambda r: None) -> list[dict]:
    """One repeat: every row run once, each predicted from a profile taken just before
    its run (the machine's load drifts by the minute), each handed to ``record`` as it
    ends (an invocation cut short keeps its finished rows)."""
    from cluster import runtime as ray_runtime
    from orchestrator import run

    out = []
    runtime = ray_runtime.start(address=None)  # one Ray instance for the repeat, as compare() does
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rows = plan(workload, a.methods, a.workers, a.scenarios, a.microbatches)
            # a throwaway run first: Ray's own start-up (its workers, dashboard) takes the cores for a while
            run(spec_of(rows[0][3], steps=3, scenario=rows[0][2], storage=tmp, micro_batch=workload.micro_batch),
                progress=False)
            sequence = any(job.layout.sp > 1 for *_, job in rows)
            after = profile(workload, sequence=sequence)
            for name, n, sc, job in rows:
                # profiled just before and just after the run (the one after is the next row's before):
                # the machine's speed drifts within minutes, and the run lies between the two
                before = after
                load = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
                result = run(spec_of(job, steps=a.steps, scenario=sc, storage=tmp, micro_batch=workload.micro_batch),
                             progress=False)
                after = profile(workload, sequence=sequence)
                pred = bracketed([predict(p, job, here(sc)) for p in (before, after)])
                out.append({"method": name, "workers": n, "scenario": sc, "layout": pred["layout"],
                            **{k: pred[k] for k in ("predicted", "compute", "comm", "bubble", "low", "high")},
                            "measured": summarize(result.metrics)["median_step_s"],
                            "profile_s": after.seconds, "uptime": load,
                            "profiles": [base64.b64encode(pickle.dumps(p)).decode() for p in (before, after)]})
                print(f"{name} {n} {sc}: predicted {out[-1]['predicted']:.3f} measured {out[-1]['measured']:.3f} "
                      f"(profile {after.seconds:.1f} s; {load})", flush=True)
                record(out[-1])
    finally:
        runtime.shutdown()
    return out


def forked(spec) -> dict:
    """``spec`` on its workers as forked processes over gloo, no Ray (``tests.ranks``, the
    distributed tests' launcher): a rank's median steady step (the median over ranks),
    the slowest-rank statistic and a rank's median CPU seconds a step."""
    import pandas as pd

    from benchmarks._baseline import trainer_steps
    from orchestrator.metrics import slowest_ranks, steady
    from tests.ranks import run_ranks

    with tempfile.TemporaryDirectory() as tmp:
        got = run_ranks(trainer_steps, spec.workers, tmp, spec)
    rows = steady(pd.DataFrame([r for g in got for r in g]))
    return {"rank_median": float(rows.groupby("rank").step_time_s.median().median()),
            "slowest": float(slowest_ranks(rows).step_time_s.median()),
            "cpu": float(rows.groupby("rank").cpu_s.median().median())}


def without_ray(workload, a) -> None:
    """Every row as polytrain runs it and as forked processes, interleaved, ``a.repeats`` times."""
    from cluster import runtime as ray_runtime
    from orchestrator import run

    got: dict[tuple, list[tuple[dict, float]]] = {}
    runtime = ray_runtime.start(address=None)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rows = plan(workload, a.methods, a.workers, a.scenarios, a.microbatches)
            for _ in range(a.repeats):
                for name, n, sc, job in rows:
                    spec = spec_of(job, steps=a.steps, scenario=sc, storage=tmp, micro_batch=workload.micro_batch)
                    alone = {"predicted": predict(profile(workload, sequence=job.layout.sp > 1), job, here(sc)).step_s,
                             **forked(spec)}
                    ray_s = summarize(run(spec, progress=False).metrics)["median_step_s"]
                    got.setdefault((name, n, sc), []).append((alone, ray_s))
                    print(f"{name} {n} {sc}: predicted {alone['predicted']:.3f}; forked rank "
                          f"{alone['rank_median']:.3f} slowest {alone['slowest']:.3f}; polytrain {ray_s:.3f}", flush=True)
    finally:
        runtime.shutdown()
    med = statistics.median
    print(f"\n{'method':<9} {'N':>2} {'scenario':<12} {'predicted':>9} {'forked rank':>11} {'forked slowest':>14} "
          f"{'polytrain':>9} {'rank/predicted':>14} {'slowest/rank':>12} {'polytrain/slowest':>17} "
          f"{'rank CPU':>8}  (medians of {a.repeats})")
    for (name, n, sc), rs in got.items():
        pred, rank, slow, ray_s, cpu = (med(r[0]["predicted"] for r in rs), med(r[0]["rank_median"] for r in rs),
                                        med(r[0]["slowest"] for r in rs), med(r[1] for r in rs),
                                        med(r[0]["cpu"] for r in rs))
        print(f"{name:<9} {n:>2} {sc:<12} {pred:>9.3f} {rank:>11.3f} {slow:>14.3f} {ray_s:>9.3f} "
              f"{rank / pred:>13.3f}x {slow / rank:>11.3f}x {ray_s / slow:>16.3f}x {cpu:>8.3f}")


def bracketed(preds: list) -> dict:
    """A row's prediction: the mean of those from the profiles around its run."""
    mean = lambda key: statistics.fmean(getattr(p, key) for p in preds)
    return {"layout": preds[0].layout, "predicted": mean("step_s"), "compute": mean("compute_s"),
            "comm": mean("comm_s"), "bubble": mean("bubble_s"),
            "low": min(p.low_s for p in preds), "high": max(p.high_s for p in preds)}  # either profile's range


def repredict(r: dict, microbatches: int) -> dict:
    """Row ``r`` predicted again from its recorded profiles (one in records made before the bracketing)."""
    profiles = [pickle.loads(base64.b64decode(b)) for b in r.get("profiles", [r.get("profile")])]  # this benchmark's own file
    workload = JobSpec(workload=WORKLOAD, strategy="single", workers=1, steps=1).build_workload()
    job = job_for(r["method"], OPTIONS.get(r["method"], {}), r["workers"], workload, microbatches=microbatches,
                  n_blocks=len(profiles[0].blocks))
    return {**r, **bracketed([predict(p, job, here(r["scenario"])) for p in profiles])}


def table(records: list[dict]) -> str:
    """Predicted (median of the repeats' predictions) against measured (median of the
    repeats' runs) per row, |error|, the verdict against 15 %, and whether the measured
    median lies in the predicted range (the medians of the repeats' ends; records made
    before the range existed show none)."""
    rows: dict[tuple, list[dict]] = {}
    for r in records:
        rows.setdefault((r["scenario"], r["method"], r["workers"]), []).append(r)
    lines = [(f"{'method':<9} {'N':>2} {'scenario':<12} {'layout':<12} {'predicted':>9} {'(comp':>7} {'comm':>7} "
              f"{'bubble)':>7} {'range':>13} {'measured':>9} {'(min':>6} {'max)':>6} {'repeats':>7} {'|error|':>8}")]
    errors, inside = [], []
    for (sc, name, n), rs in rows.items():
        med = {key: statistics.median(r[key] for r in rs) for key in ("measured", "predicted", "compute", "comm",
                                                                          "bubble")}
        got, pred = med["measured"], med["predicted"]
        err = abs(pred - got) / got
        errors.append(err)
        span = "-"
        if all("low" in r for r in rs):
            low, high = (statistics.median(r[k] for r in rs) for k in ("low", "high"))
            inside.append(low <= got <= high)
            span = f"{low:.3f}-{high:.3f}{'' if inside[-1] else '*'}"
        lines.append(f"{name:<9} {n:>2} {sc:<12} {rs[0]['layout']:<12} {pred:>9.3f} {med['compute']:>7.3f} "
                     f"{med['comm']:>7.3f} {med['bubble']:>7.3f} {span:>13} {got:>9.3f} {min(r['measured'] for r in rs):>6.3f} "
                     f"{max(r['measured'] for r in rs):>6.3f} {len(rs):>7} {err:>7.1%}"
                     f"{'' if err <= 0.15 else '  miss'}")
    lines.append(f"median |error| {statistics.median(errors):.1%}; within 15 %: "
                 f"{sum(e <= 0.15 for e in errors)}/{len(errors)}"
                 + (f"; measured within the predicted range (* outside): {sum(inside)}/{len(inside)}" if inside else ""))
    return "\n".join(lines)


SCALE = {"name": "gpt-tiny", "d_model": 2048, "n_heads": 16, "n_layers": 2, "seq_len": 128, "micro_batch": 1}
LAYERS = 20  # blocks of width 2048 (12 d^2 parameters each): 1.0 B parameters
CLUSTERS = ("nodes=8,per_node=8,intra=400gbit,inter=25gbit,latency=10us",
            "nodes=2,per_node=32,intra=400gbit,inter=1gbit,latency=10ms")
AT_SCALE = "ddp,fsdp,zero1,zero2,zero3,pipeline,pipeline:schedule=zb-h1,sequence,powersgd,demo,gossip"
MICROBATCHES = 8  # per data-parallel rank per step (a replica of r ranks takes r x 8: the same global batch)
GPU_FLOPS = 150e12  # an accelerator's sustained rate the projection assumes (H100-class bf16 at ~40 % of peak)


def deepen(prof, layers: int):
    """``prof`` (embedding, 2 transformer blocks, head) with its transformer block repeated
    to ``layers``; the optimizer's and the methods' own per-step time scaled with the parameters."""
    from dataclasses import replace

    first, last = prof.blocks[:1], prof.blocks[-1:]
    pick = lambda t: (t[0], *[t[1]] * layers, t[-1])
    scale = (sum(pick(prof.param_bytes))) / sum(prof.param_bytes)
    return replace(prof, blocks=(*first, *[prof.blocks[1]] * layers, *last), shapes=pick(prof.shapes),
                   param_bytes=pick(prof.param_bytes), act_bytes=pick(prof.act_bytes),
                   attention=tuple(range(1, layers + 1)), optim_s=prof.optim_s * scale,
                   outer_s={k: v * scale for k, v in prof.outer_s.items()})


def core_flops() -> float:
    """One core's fp32 matmul rate here (what --speed is relative to)."""
    import time

    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    a = torch.randn(1024, 1024)
    a @ a
    t = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.set_num_threads(before)
    return 10 * 2 * 1024**3 / (time.perf_counter() - t)


def at_scale() -> None:
    """gpt-tiny at 1 B parameters on 8 nodes x 8 and on 2 islands x 32: every strategy's
    predicted step (``polytrain project``'s model, the table it prints) and who wins."""
    from cluster.network import parse_scenario
    from orchestrator.project import parse_strategies, project, render, table

    workload = JobSpec(workload=SCALE, strategy="single", workers=1, steps=1).build_workload()
    prof = deepen(profile(workload), LAYERS)
    flops = core_flops()
    speed = GPU_FLOPS / flops
    print(f"{sum(prof.param_bytes) / 4e9:.2f} B parameters; one core here {flops / 1e9:.1f} GFLOP/s fp32: "
          f"--speed {speed:.0f} for {GPU_FLOPS / 1e12:g} TFLOP/s a worker")
    for sc in CLUSTERS:
        target = Target(scenario=parse_scenario(sc), speed=speed)
        rows, notes = project(prof, workload, parse_strategies(AT_SCALE), [64], target, microbatches=MICROBATCHES)
        df = table(rows)  # a row is named by its label; a pipeline by its schedule
        df = df.assign(strategy=df.strategy.str.replace("pipeline:schedule=", "")).sort_values("predicted_step_s")
        print(render(df, notes, prof, target, None, microbatches=MICROBATCHES))
        best, second = df.iloc[0], df.iloc[1]
        print(f"wins: {best.strategy} ({best.layout}) {best.predicted_step_s:.3f} s, "
              f"{second.predicted_step_s / best.predicted_step_s:.2f}x ahead of {second.strategy}\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--workers", nargs="+", type=int, default=[2, 4])
    p.add_argument("--scenarios", nargs="+", default=["local", "internet-1g"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--microbatches", type=int, default=2)
    p.add_argument("--record", default=None, help="append each repeat's rows to this JSON-lines file")
    p.add_argument("--table", default=None, help="print the table of the rows recorded in this file, run nothing")
    p.add_argument("--repredict", action="store_true", help="with --table: predict every row again from the "
                   "profile its repeat recorded (the model as it is now; the measurements stay)")
    p.add_argument("--at-scale", action="store_true", help="project gpt-tiny at 1 B parameters on 64 workers")
    p.add_argument("--without-ray", action="store_true", help="each row as polytrain runs it and as forked "
                   "processes without Ray: what of a miss is the slowest-rank statistic, what Ray's processes")
    a = p.parse_args()
    if a.without_ray:
        return without_ray(JobSpec(workload=WORKLOAD, strategy="single", workers=1, steps=1).build_workload(), a)
    if a.at_scale:
        return at_scale()
    if a.table:
        with open(a.table) as f:
            records = [json.loads(line) for line in f if line.strip()]
        if a.repredict:  # rows recorded without their profile cannot be predicted again: left out
            records = [repredict(r, a.microbatches) for r in records if "profile" in r or "profiles" in r]
        print(table(records))
        return
    workload = JobSpec(workload=WORKLOAD, strategy="single", workers=1, steps=1).build_workload()
    records = []
    def record(row: dict) -> None:
        if a.record:
            with open(a.record, "a") as f:
                f.write(json.dumps(row) + "\n")

    for _ in range(a.repeats):  # interleaved: every row once per repeat
        records += repeat(workload, a, record)
    print(table(records))


if __name__ == "__main__":
    main()
