"""Per-rank activation memory and step time of sequence parallelism versus sequence length.

gpt-tiny (default width: d_model 256, 4 layers, 4 heads), one sample per step,
sequence lengths 1k..16k, for sp = 1 (strategy `single`, torch's own SDPA) and
sp = 2, 4 with ulysses, ring (zig-zag) and usp (2 x 2, zig-zag). Each
configuration runs in fresh processes (gloo, one torch thread each). Per rank:

- saved: bytes autograd holds for backward at the end of forward, measured with
  ``torch.autograd.graph.saved_tensors_hooks`` (every saved tensor's storage,
  counted once; parameters excluded): the activation memory.
- peak: the highest total of bytes allocated by torch's CPU allocator during a
  whole step (forward, backward, optimizer) above what was allocated when it
  began, from the allocation events of ``torch.profiler`` (profile_memory):
  activations plus every transient buffer (attention workspaces, all-to-all and
  ring buffers, gradients, optimizer temporaries). Frees of blocks allocated
  before the step are not reported by the profiler, so this is an upper bound.
- step time: the median of the timed steps (no hooks, no profiler), slowest rank.

Step 1 warms up (and creates optimizer state), step 2 is measured for memory,
the rest are timed. The longest trainable length under ``--cap-mib`` is the
longest length measured whose peak fits.

    python benchmarks/sequence.py [--lengths 1024 2048 ...] [--configs sp1 ring2 ...] [--cap-mib 512]
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

MIB = 2**20
CONFIGS = {  # name: (strategy options or None for single, workers)
    "sp1": (None, 1),
    "ulysses2": ({"ulysses": 2, "ring": 1}, 2),
    "ring2": ({"ulysses": 1, "ring": 2}, 2),
    "ulysses4": ({"ulysses": 4, "ring": 1}, 4),
    "ring4": ({"ulysses": 1, "ring": 4}, 4),
    "usp2x2": ({"ulysses": 2, "ring": 2}, 4),
}


def saved_bytes_hooks(params: set[int]):
    """A saved_tensors_hooks context counting the storages autograd saves."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), seen


def peak_allocated(prof) -> int:
    """Highest running total of allocation events (bytes, above the start)."""
    from torch._C._profiler import _EventType

    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation:
            events.append((e.start_time_ns, e.extra_fields.alloc_size))
        stack.extend(e.children)
    total = peak = 0
    for _, size in sorted(events):
        total += size
        peak = max(peak, total)
    return peak


def rank_main(rank: int, world: int, store: str, options, seq_len: int, steps: int, queue) -> None:
    torch.set_num_threads(1)
    from cluster import Comm
    from cluster.dist import destroy_process_group, init_process_group
    from strategies import STRATEGIES, OptimConfig, StrategyContext
    from workloads import WORKLOADS

    init_process_group(rank=rank, world=world, init_method=f"file://{store}", device=torch.device("cpu"), timeout_s=1800)
    try:
        workload = WORKLOADS.get("gpt-tiny")(seq_len=seq_len, micro_batch=1)
        cls = STRATEGIES.get("single" if options is None else "sequence")
        strategy = cls(cls.Options(**(options or {})))
        torch.manual_seed(0)
        strategy.setup(workload, StrategyContext(rank=rank, world=world, device=torch.device("cpu"), comm=Comm(),
                                                 optim=OptimConfig(), total_steps=steps))
        g = torch.Generator().manual_seed(1)  # the same sample on every rank
        tokens = torch.randint(0, workload.vocab_size, (1, seq_len + 1), generator=g)
        batch = [(tokens[:, :-1], tokens[:, 1:])]
        strategy.train_step(batch)  # warm-up; optimizer state exists from here on
        hooks, seen = saved_bytes_hooks({p.untyped_storage().data_ptr() for p in strategy.module.parameters()})
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof, hooks:
            strategy.train_step(batch)
        saved, peak = sum(seen.values()), peak_allocated(prof)
        times = []
        for _ in range(steps - 2):
            t0 = time.perf_counter()
            strategy.train_step(batch)
            times.append(time.perf_counter() - t0)
        queue.put((rank, saved, peak, times, None))
    except BaseException as e:  # noqa: BLE001 (reported by the parent)
        queue.put((rank, 0, 0, [], f"{type(e).__name__}: {e}"))
    finally:
        destroy_process_group()


def measure(name: str, seq_len: int, steps: int) -> dict:
    options, world = CONFIGS[name]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, f"store-{uuid.uuid4().hex}")
        procs = [ctx.Process(target=rank_main, args=(r, world, store, options, seq_len, steps, queue))
                 for r in range(world)]
        for p in procs:
            p.start()
        got = [queue.get() for _ in range(world)]
        for p in procs:
            p.join()
    errors = [e for *_, e in got if e]
    if errors:
        return {"error": errors[0]}
    times = [max(t) for t in zip(*(g[3] for g in got))]  # slowest rank per step
    return {"saved": max(g[1] for g in got), "peak": max(g[2] for g in got), "step_s": statistics.median(times)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--steps", type=int, default=4, help="per run: 1 warm-up, 1 memory, the rest timed")
    p.add_argument("--cap-mib", type=float, default=512, help="per-rank memory cap for the longest-length table")
    a = p.parse_args()
    # the profiler warns once per rank about blocks allocated before it started (not counted: see peak)
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    if a.steps < 3:
        p.error("--steps must be at least 3 (warm-up, memory, timed)")
    results: dict[tuple[str, int], dict] = {}
    print(f"{'config':<9} {'sp':>2} {'seq_len':>7} {'saved MiB':>9} {'vs sp1':>6} {'peak MiB':>8} {'vs sp1':>6} "
          f"{'target':>6} {'step s':>7}", flush=True)
    for n in a.lengths:
        for name in a.configs:
            res = results[(name, n)] = measure(name, n, a.steps)
            sp = CONFIGS[name][1]
            if "error" in res:
                print(f"{name:<9} {sp:>2} {n:>7} failed: {res['error']}", flush=True)
                continue
            base = results.get(("sp1", n), {})
            ratio = lambda k: f"{res[k] / base[k]:.3f}" if k in base else "-"  # noqa: E731
            print(f"{name:<9} {sp:>2} {n:>7} {res['saved'] / MIB:>9.1f} {ratio('saved'):>6} {res['peak'] / MIB:>8.1f} "
                  f"{ratio('peak'):>6} {1 / sp + 0.15:>6.2f} {res['step_s']:>7.2f}", flush=True)
    print(f"\nlongest measured length whose per-rank peak fits in {a.cap_mib:.0f} MiB:")
    for name in a.configs:
        fits = [n for n in a.lengths if results[(name, n)].get("peak", float("inf")) <= a.cap_mib * MIB]
        print(f"{name:<9} sp={CONFIGS[name][1]}: {max(fits) if fits else 'none'}")


if __name__ == "__main__":
    main()
