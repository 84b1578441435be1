"""Pipeline schedules measured on this machine, then simulated deeper.

1. Measured: gpt-tiny with 8 layers (default width 256, sequence 128) on 2
   pipeline ranks (one gloo process each, one thread each), m micro-batches per
   step. Every schedule's job is built first; then ``--rounds`` rounds run
   ``--steps`` steps of each in turn (round-robin, so the load of a shared
   machine drifts over all of them alike), dropping the first ``--warmup`` of
   each round. Blocks are cut by parameter count (balance=params), so every
   schedule runs the same cut (measured-time cuts move with the noise of a
   shared machine). Per schedule: median step time (the slower rank), median
   idle fraction per rank (idle_s / step_time_s: blocked receives, sends and
   the gradient-norm all-reduce), the idle fraction the simulator predicts from
   one set of measured block costs, and step time relative to 1F1B.
2. Simulated: the per-stage F/B/W costs measured above (mean over the two
   stages) and the measured time to send one activation, for p = 8, 16, 32
   identical stages and m = 4p: the bubble fraction (mean over ranks of
   1 - busy / makespan) of every schedule; ``auto`` under 1F1B's memory (p).

    python benchmarks/pipeline.py [--rounds 3] [--steps 3] [--microbatches 8] [--batch 32] [--sim-p 8 16 32]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid

import torch
import torch.multiprocessing as mp

SCHEDULES = ("gpipe", "1f1b", "zb-h1", "zb-h2", "zb-v", "interleaved-1f1b", "auto")
WORKLOAD = {"name": "gpt-tiny", "n_layers": 8}


def _rank(rank: int, world: int, store: str, args: dict, queue) -> None:
    torch.set_num_threads(1)
    from cluster.dist import destroy_process_group, init_process_group
    from orchestrator.config import JobSpec
    from orchestrator.trainer import RankTrainer

    init_process_group(rank=rank, world=world, init_method=f"file://{store}", device=torch.device("cpu"),
                       timeout_s=900)
    try:
        out = {"comm_s": _activation_transfer_s(rank, args["batch"] // args["microbatches"])}
        workload = {**WORKLOAD, "micro_batch": args["batch"] // args["microbatches"]}  # the probe's size
        trainers = {}
        for name in args["schedules"]:
            spec = JobSpec(workload=workload, strategy={"name": "pipeline", "schedule": name, "balance": "params",
                                                        "microbatches": args["microbatches"]},
                           workers=world, steps=args["rounds"] * args["steps"], batch_size=args["batch"], seed=0)
            trainers[name] = RankTrainer(spec, rank=rank, world=world, device=torch.device("cpu"))
        rows = {name: [] for name in trainers}
        for _ in range(args["rounds"]):  # round-robin, so a shared machine's load drifts over every schedule
            for name, t in trainers.items():
                rows[name] += [t.train_step() for _ in range(args["steps"])][args["warmup"]:]
        for name, t in trainers.items():
            s = t.strategy.pp  # the pipeline part: schedule, cut, measured block costs
            out[name] = {"rows": [{k: v for k, v in r.items() if k != "timeline"} for r in rows[name]],
                         "schedule": s.schedule, "bounds": s.bounds, "profiles": s.profiles,
                         "origin": s.auto.origin if s.auto else name}
        queue.put((rank, out, None))
    except BaseException as e:  # report, then let the parent fail
        import traceback

        queue.put((rank, None, f"{e}\n{traceback.format_exc()}"))
    finally:
        destroy_process_group()


def _predicted(results: dict, name: str, first: str) -> list[float]:
    """Per-rank idle the simulator predicts for ``name`` from one set of block costs
    (those the first schedule's set-up measured), so predictions are comparable."""
    from strategies.pipeline import simulate
    from strategies.pipeline.stages import stage_costs

    profiles = results[0][first]["profiles"]
    run = results[0][name]
    per_rank = run["schedule"].n_stages // run["schedule"].n_ranks
    return simulate(run["schedule"], stage_costs(profiles, run["bounds"], per_rank=per_rank)).bubble


def _activation_transfer_s(rank: int, samples: int, repeats: int = 20) -> float:
    """Median one-way time of one boundary activation (samples x 128 x 256 fp32), ping-pong."""
    import torch.distributed as dist

    buf = torch.zeros(samples, 128, 256)
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        if rank == 0:
            dist.send(buf, 1)
            dist.recv(buf, 1)
        else:
            dist.recv(buf, 0)
            dist.send(buf, 0)
        times.append((time.perf_counter() - t0) / 2)
    return statistics.median(times)


def measure(args: dict) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, f"store-{uuid.uuid4().hex}")
        procs = [ctx.Process(target=_rank, args=(r, 2, store, args, queue)) for r in range(2)]
        for p in procs:
            p.start()
        results = {}
        for _ in procs:
            rank, out, err = queue.get()
            if err:
                raise RuntimeError(f"rank {rank}: {err}")
            results[rank] = out
        for p in procs:
            p.join()
    return results


def report_measured(results: dict, args: dict) -> dict[str, float]:
    print(f"\n## measured: gpt-tiny 8 layers, 2 stage ranks, m={args['microbatches']}, batch {args['batch']}; "
          f"{args['rounds']} rounds of {args['steps']} steps per schedule, round-robin, first {args['warmup']} "
          f"of each round dropped; medians")
    print(f"{'schedule':<18} {'step s':>7} {'vs 1f1b':>8} {'idle r0':>8} {'idle r1':>8} "
          f"{'pred r0':>8} {'pred r1':>8}  cut / chosen")
    step_of = {}
    for name in args["schedules"]:
        per_rank = [results[r][name]["rows"] for r in (0, 1)]
        step = statistics.median(max(a["step_time_s"], b["step_time_s"]) for a, b in zip(*per_rank))
        idle = [statistics.median(x["idle_s"] / x["step_time_s"] for x in rows) for rows in per_rank]
        pred = _predicted(results, name, args["schedules"][0])
        step_of[name] = step
        base = step_of.get("1f1b")
        ratio = f"{step / base:.3f}" if base else "-"
        print(f"{name:<18} {step:>7.3f} {ratio:>8} {idle[0]:>8.1%} {idle[1]:>8.1%} {pred[0]:>8.1%} {pred[1]:>8.1%}"
              f"  {results[0][name]['bounds']} {results[0][name]['origin']}")
    return step_of


def report_simulated(results: dict, args: dict) -> None:
    from strategies.pipeline import auto_schedule, generate, simulate
    from strategies.pipeline.simulate import StageCost

    from strategies.pipeline.stages import stage_costs

    first = results[0][args["schedules"][0]]
    costs = stage_costs(first["profiles"], first["bounds"], per_rank=1)
    f, b, w = (statistics.mean(getattr(c, k) for c in costs) for k in "fbw")
    comm = statistics.mean(results[r]["comm_s"] for r in (0, 1))
    print(f"\n## simulated: p identical stages of the measured cost T_F={f * 1e3:.1f} ms, T_B={b * 1e3:.1f} ms, "
          f"T_W={w * 1e3:.1f} ms, T_comm={comm * 1e3:.2f} ms; m = 4p; bubble = mean over ranks of 1 - busy/makespan")
    names = [n for n in SCHEDULES]
    print(f"{'p':>3} {'m':>4} " + " ".join(f"{n:>16}" for n in names))
    for p in args["sim_p"]:
        m = 4 * p
        flat = [StageCost(f=f, b=b, w=w, comm=comm)] * p
        v = [StageCost(f=f / 2, b=b / 2, w=w / 2, comm=comm, mem=0.5)] * (2 * p)
        cells = []
        for name in names:
            if name == "auto":
                res = auto_schedule(p, m, flat, v_costs=v, memory_limit=float(p)).result
            else:
                sched = generate(name, p, m)
                res = simulate(sched, v if sched.n_stages == 2 * p else flat)
            cells.append(f"{statistics.mean(res.bubble):>15.1%} ")
        print(f"{p:>3} {m:>4} " + " ".join(cells), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="steps per schedule per round")
    ap.add_argument("--warmup", type=int, default=1, help="steps dropped at the start of each round")
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32, help="global batch (samples per step)")
    ap.add_argument("--schedules", nargs="+", default=list(SCHEDULES))
    ap.add_argument("--sim-p", type=int, nargs="+", default=[8, 16, 32])
    a = ap.parse_args()
    args = {"rounds": a.rounds, "steps": a.steps, "warmup": a.warmup, "microbatches": a.microbatches,
            "batch": a.batch, "schedules": a.schedules, "sim_p": a.sim_p}
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    t0 = time.time()
    results = measure(args)
    report_measured(results, args)
    print(f"(measured part: {time.time() - t0:.0f} s)")
    print(f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    report_simulated(results, args)


if __name__ == "__main__":
    main()
