"""What lockstep costs on this machine's cores, beyond processor sharing.

The projection of this machine (``docs/projection.md``) takes N workers on C
cores to compute N/C times slower, together (processor sharing). Workers that
wait for each other at every call do not: a rank blocks for a peer the
scheduler has not run yet and, while too few are runnable, a core idles. This
measures it apart from polytrain, torch.distributed and Ray: N forked
processes pass a token round a ring (a pipe each) after every chunk of compute
(one matmul, one thread), against the chunk's time alone x max(1, N/C), and
N independent processes (no ring): the slowest of them, which a step that
ends in a collective waits for.

    python benchmarks/lockstep.py [--workers 2 4] [--chunks-ms 0.2 2 20] [--repeats 3]

Prints per (N, chunk): the slowest rank's median extra time per pass over processor sharing,
as milliseconds and as a fraction of the ideal, with the range of the repeats.
Repeats are interleaved over the rows (this machine's speed drifts by the minute).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from orchestrator.project_profile import median_seconds


def _matrix_for(chunk_s: float) -> torch.Tensor:
    """A square matrix whose product with itself takes about ``chunk_s`` here."""
    n = 64
    while True:
        a = torch.randn(n, n)
        a @ a
        t = time.perf_counter()
        for _ in range(5):
            a @ a
        took = (time.perf_counter() - t) / 5
        if took >= chunk_s or n >= 4096:
            return a
        n = int(n * max(1.1, min(2.0, (chunk_s / took) ** (1 / 3))))


def _pass_loop(rank: int, n: int, pipes: list, a: torch.Tensor, passes: int, start: float, ring: bool) -> float:
    time.sleep(max(0.0, start - time.perf_counter()))
    t = time.perf_counter()
    for _ in range(passes):
        a @ a
        if ring:
            os.write(pipes[(rank + 1) % n][1], b"x")  # to the next rank
            os.read(pipes[rank][0], 1)  # from the previous one
    return time.perf_counter() - t


def per_pass(a: torch.Tensor, n: int, passes: int, *, ring: bool) -> float:
    """Seconds per pass of the slowest of ``n`` processes (this one and n - 1 forked):
    a step that ends in a collective ends with it."""
    pipes = [os.pipe() for _ in range(n)]
    results = os.pipe()
    start = time.perf_counter() + 0.05
    kids = []
    for r in range(1, n):
        pid = os.fork()
        if pid == 0:
            try:
                os.write(results[1], f"{_pass_loop(r, n, pipes, a, passes, start, ring):.9f}\n".encode())
            finally:
                os._exit(0)
        kids.append(pid)
    took = [_pass_loop(0, n, pipes, a, passes, start, ring)]
    for pid in kids:
        os.waitpid(pid, 0)
    os.close(results[1])
    with os.fdopen(results[0]) as f:
        took += [float(x) for x in f.read().split()]
    for r, w in pipes:
        os.close(r)
        os.close(w)
    return max(took) / passes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", nargs="+", type=int, default=[2, 4])
    p.add_argument("--chunks-ms", nargs="+", type=float, default=[0.2, 2.0, 20.0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seconds", type=float, default=0.5, help="length of one measurement")
    a = p.parse_args()
    torch.set_num_threads(1)
    cores = os.cpu_count() or 1
    mats = {c: _matrix_for(c / 1e3) for c in a.chunks_ms}
    rows = [(n, c, ring) for n in a.workers for c in a.chunks_ms for ring in (True, False)]
    extra: dict = {r: [] for r in rows}
    ideal_of: dict = {r: [] for r in rows}
    for _ in range(a.repeats):
        for n, c, ring in rows:
            alone = median_seconds(lambda: mats[c] @ mats[c], 20)
            ideal = alone * max(1.0, n / cores)
            passes = max(5, int(a.seconds / ideal))
            extra[(n, c, ring)].append(per_pass(mats[c], n, passes, ring=ring) - ideal)
            ideal_of[(n, c, ring)].append(ideal)
    print(f"{cores} cores; extra seconds per pass over processor sharing (median of {a.repeats}, range)")
    print(f"{'N':>3} {'chunk ms':>9} {'kind':<12} {'ideal ms':>9} {'extra ms':>9} {'extra %':>8}  range %")
    for n, c, ring in rows:
        e, i = extra[(n, c, ring)], statistics.median(ideal_of[(n, c, ring)])
        pct = [100 * x / y for x, y in zip(e, ideal_of[(n, c, ring)])]
        print(f"{n:>3} {c:>9.1f} {'ring' if ring else 'independent':<12} {i * 1e3:>9.2f} "
              f"{statistics.median(e) * 1e3:>9.2f} {statistics.median(pct):>7.1f}%  {min(pct):.0f}..{max(pct):.0f}")


if __name__ == "__main__":
    main()
