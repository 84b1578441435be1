"""The projection's measured inputs: one rank of the workload, one thread, a few
seconds (see docs/projection.md, *Measured inputs*)."""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Self

if TYPE_CHECKING:
    from strategies.projection import Profile
    from workloads import Workload


@contextmanager
def _one_thread():
    """A worker alone on one core: what the projection's speed factor is relative to."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def profile(workload: Workload, *, seed: int = 0, repeats: int = 5, sequence: bool = True) -> Profile:
    """Measure ``workload`` on this rank (seconds and steps of the run are in the result).

    The blocks' F/B/W, timed apart, are scaled so that they add up to what one
    micro-batch costs in the real training step (``single`` on one rank, with 1
    and 2 micro-batches: the difference is one micro-batch, the rest a step's
    fixed cost). Real steps and the methods' own compute are the median of their
    repeats, the statistic of the measured step time a projection is checked against:
    this machine's speed drifts between identical steps, whose fastest of 4 was
    10-33 % below their median. ``sequence``: also a sequence rank's compute
    (``_sequence_shares``), which only a projection that shards the sequence needs."""
    import numpy as np
    import torch
    from torch import nn

    from strategies.pipeline.stages import boundary_shapes, measure_blocks
    from strategies.projection import Profile

    t0 = time.perf_counter()
    with _one_thread(), torch.random.fork_rng(), RunQueue() as others:
        torch.manual_seed(seed)
        blocks = workload.blocks()
        source = workload.train_source()
        k = min(workload.micro_batch, len(source))
        probe = tuple(source.gather(np.arange(k)))
        shapes = boundary_shapes(blocks, probe)
        measured = measure_blocks(blocks, workload, probe, repeats=repeats)
        model = nn.Sequential(*blocks)
        attention = {id(m) for m in (workload.attention_layers(blocks) or [])}
        outer = _outer_seconds(model, seed)
        one, per_mb, drift = _real_step_seconds(workload, seed, repeats)
        shard = _shard_seconds(workload, seed, repeats)
        shares, shares_steps = _sequence_shares(workload, seed, repeats, per_mb) if sequence and attention else ((), 0)
        gloo = gloo_links()
    calibrated, fixed = calibrate(measured, one, one + per_mb, outer["adamw"])
    return Profile(
        workload=workload.name, micro_batch=k, blocks=calibrated,
        shapes=tuple(tuple(tuple(p.shape) for p in b.parameters()) for b in blocks),
        param_bytes=tuple(sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks),
        act_bytes=tuple(k * math.prod(s) * torch.empty((), dtype=d).element_size() for s, d in shapes),
        attention=tuple(i for i, b in enumerate(blocks) if any(id(m) in attention for m in b.modules())),
        optim_s=outer["adamw"], outer_s={n: outer[n] for n in ("demo", "powersgd")},
        fixed_s=fixed, shard_s=shard, sequence=shares, gloo=gloo, others=others.mean, drift=drift,
        seconds=time.perf_counter() - t0, steps=repeats + 1 + 4 * (repeats + 1) + shares_steps)


def calibrate(blocks: list, one: float, two: float, optim_s: float) -> tuple[tuple, float]:
    """Blocks scaled to the real step's cost of a micro-batch (``two - one``: steps of 2
    and 1 micro-batches) and the step's fixed cost beyond it and the optimizer; the
    blocks as measured when the difference is not positive (noise)."""
    from strategies.pipeline.stages import BlockProfile

    per_mb, summed = two - one, sum(b.total for b in blocks)
    if per_mb <= 0 or summed <= 0:
        return tuple(blocks), 0.0
    scale = per_mb / summed
    return (tuple(BlockProfile(b.f * scale, b.b * scale, b.w * scale, b.params) for b in blocks),
            max(0.0, one - per_mb - optim_s))


def _trainer(workload: Workload, strategy: str, world: int, *, seed: int, steps: int, accum: int = 1,
             replicas: int | None = None):
    """Rank 0 of ``strategy`` on ``world`` ranks, the workload's micro-batch x ``accum`` per replica
    (``world`` replicas unless said: a sequence group of ``world`` ranks is one)."""
    import torch

    from orchestrator.config import JobSpec
    from orchestrator.trainer import RankTrainer

    spec = JobSpec(workload={"name": workload.name, **workload.model_dump()}, strategy=strategy, workers=world,
                   steps=steps, seed=seed, batch_size=workload.micro_batch * accum * (replicas or world),
                   grad_accum=accum)
    return RankTrainer(spec, rank=0, world=world, device=torch.device("cpu"), workload=workload)


def _real_step_seconds(workload: Workload, seed: int, repeats: int) -> tuple[float, float, tuple[float, float]]:
    """Real training steps of ``single`` (the job's own loop, data, loss and clipping)
    on 1 and on 2 micro-batches, alternated after a warm-up step of each: (the median
    step on 1, the median of the paired differences 2 - 1, one micro-batch's cost, and
    the fastest and slowest step on 1 over their median: ``Profile.drift``).
    Paired neighbours see the same machine speed; this machine's drifts
    within minutes, and the difference of two medians taken apart varied 3-fold."""
    import statistics

    ones, diffs = _paired_steps(*(_trainer(workload, "single", 1, seed=seed, steps=repeats + 1, accum=g)
                                  for g in (1, 2)), repeats)
    mid = statistics.median(ones)
    return mid, statistics.median(diffs), (min(ones) / mid, max(ones) / mid)


def _paired_steps(first, second, repeats: int) -> tuple[list[float], list[float]]:
    """``repeats`` real steps of each trainer, alternated after an untimed warm-up step of
    each: the first's step times and the paired differences second - first."""
    firsts, diffs = [], []
    for i in range(repeats + 1):
        one, two = (t.train_step()["step_time_s"] for t in (first, second))
        if i:
            firsts.append(one)
            diffs.append(two - one)
    return firsts, diffs


def _can_fake() -> bool:
    """Whether this process may take a fake process group (``_fake_group``): not while it
    has a real one, which the fake one would replace."""
    import importlib.util

    import torch.distributed as dist

    fake = importlib.util.find_spec("torch.testing._internal.distributed.fake_pg")
    return fake is not None and not dist.is_initialized()


@contextmanager
def _fake_group(world: int):
    """This process as rank 0 of a fake group of ``world`` ranks (torch's ``fake`` backend:
    every collective and point-to-point call returns at once), gone after."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _shard_seconds(workload: Workload, seed: int, repeats: int) -> float:
    """FSDP2's own compute per micro-batch when it shards (copies into and out of its
    gather and reduce-scatter buffers, DTensor bookkeeping) beyond ``single``'s step:
    the median of paired differences of real steps, fsdp on a fake 2-rank group (its
    collectives return at once; their time is the network model's and gloo's) against
    single. At world 1 FSDP2 does none of it, and a rank's step at world 2 was 9-36 %
    above the blocks it runs. 0 where this process already has a process group (the
    fake one would replace it) or the workload does not run under fsdp."""
    import statistics

    if not _can_fake():
        return 0.0
    single = _trainer(workload, "single", 1, seed=seed, steps=repeats + 1)  # before the fake group: world 1
    try:
        with _fake_group(2):
            sharded = _trainer(workload, "fsdp", 2, seed=seed, steps=repeats + 1)
            _, diffs = _paired_steps(single, sharded, repeats)
    except Exception:  # noqa: BLE001 (a workload fsdp cannot shard: nothing to measure)
        return 0.0
    return max(0.0, statistics.median(diffs))


SEQUENCE_DEGREES = (2, 4, 8, 16, 32)  # the ring degrees the profile measures (those the length allows; fitted between)


def _sequence_shares(workload: Workload, seed: int, repeats: int, per_mb: float) -> tuple[tuple, int]:
    """A sequence rank's compute per micro-batch at ring degree s, as (a, b, c) in
    ``per_mb x (a + b / s + c x s)`` (``per_mb``: single's micro-batch): not ``1 / s``,
    because a rank's blocks on L / s tokens keep every operator's fixed cost (a), and
    the ring's s steps per attention layer each cost their own (c). Measured as
    ``_shard_seconds`` measures FSDP2's copies: sequence on a fake group of s ranks
    (its point-to-point calls return at once; their time is the network model's and
    gloo's), the median of paired differences of real steps on 2 and 1 micro-batches,
    at each s of ``SEQUENCE_DEGREES`` the workload's length allows, then the
    non-negative least-squares fit, and the real steps that took. () where the
    workload has no sequence parallelism (the caller asks only for one with
    attention layers), this process already has a process group, or nothing was
    measured."""
    import statistics

    if per_mb <= 0 or not _can_fake():
        return (), 0
    points = []
    for s in SEQUENCE_DEGREES:
        try:
            with _fake_group(s):
                one, two = (_trainer(workload, "sequence", s, seed=seed, steps=repeats + 1, accum=g, replicas=1)
                            for g in (1, 2))
                _, diffs = _paired_steps(one, two, repeats)
        except Exception:  # noqa: BLE001 (a length that s does not divide: the other degrees still fit)
            continue
        points.append((s, statistics.median(diffs) / per_mb))
    return fit_shares(points), 2 * (repeats + 1) * len(points)


def fit_shares(points: list[tuple[int, float]]) -> tuple[float, float, float]:
    """(a, b, c) >= 0 of ``y = a + b / s + c x s`` through ``points`` (s, y), least squares
    over the terms the points can fix (three points for all three; fewer: b alone, then
    a and b), the best fit whose terms are all non-negative. () without points, or where
    none is (noise that made every measured share negative: the model's 1 / s)."""
    import itertools

    import numpy as np

    s = np.array([p[0] for p in points], dtype=float)
    y = np.array([p[1] for p in points], dtype=float)
    columns = {"a": np.ones_like(s), "b": 1 / s, "c": s}
    best, best_err = (), math.inf
    for k in range(1, min(3, len(points)) + 1):
        for terms in itertools.combinations("abc", k):
            if "b" not in terms:
                continue
            x = np.stack([columns[t] for t in terms], axis=1)
            coef = np.linalg.lstsq(x, y, rcond=None)[0]
            err = float(np.sum((x @ coef - y) ** 2))
            if (coef >= 0).all() and err < best_err - 1e-15:
                got = dict(zip(terms, coef.tolist()))
                best, best_err = (got.get("a", 0.0), got.get("b", 0.0), got.get("c", 0.0)), err
    return best


def median_seconds(fn, repeats: int = 5) -> float:
    """The median of ``repeats`` timed calls of ``fn``, after one untimed (state allocation)."""
    import statistics

    fn()
    took = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        took.append(time.perf_counter() - t)
    return statistics.median(took)


def _outer_seconds(model, seed: int) -> dict[str, float]:
    """One step's own compute of AdamW, DeMo and PowerSGD on the whole model, one rank
    (their collectives at world 1 cost nothing)."""
    import torch

    from cluster import Comm
    from strategies.base import OptimConfig
    from strategies.compression.base import Wire
    from strategies.compression.powersgd import PowerSGDCompressor
    from strategies.decentralized.demo import DeMo
    from strategies.optim import build_optimizer

    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    opt, _ = build_optimizer(model, OptimConfig(), 100)
    demo = DeMo(params, Comm(), topk=32, chunk=64, decay=0.999, value_dtype=torch.bfloat16,
                decays=[p.dim() > 1 for p in params])
    names = [f"p{i}" for i in range(len(params))]
    psgd = PowerSGDCompressor(Wire(Comm()), {n: p.shape for n, p in zip(names, params)}, rank=4,
                              min_compression_rate=2.0, seed=seed)
    grads = lambda: [(n, p.grad.clone()) for n, p in zip(names, params)]
    with torch.no_grad():
        out = {"adamw": median_seconds(opt.step), "demo": median_seconds(lambda: demo.step(1e-3, 0.0)),
               "powersgd": median_seconds(lambda: psgd.reduce(grads(), 100))}
    for p in params:
        p.grad = None
    return out


GLOO_OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send")  # what the model charges
GLOO_BYTES = (64 * 2**10, 4 * 2**20)  # sent per rank: the small call fixes alpha, the large one beta


def _gloo_call(pg, op: str, nbytes: int, rank: int):
    """One call of ``op`` in which a rank sends ``nbytes`` at 2 ranks (cluster.comm's
    formulas), through the process-group method its Comm call reaches."""
    import torch

    a, b = torch.ones(nbytes // 4), torch.ones(nbytes // 2)  # fp32: one rank's share, both ranks'
    if op == "all_reduce":
        return lambda: pg.allreduce([a])
    if op == "all_gather":
        return lambda: pg._allgather_base(b, a)
    if op == "reduce_scatter":
        return lambda: pg._reduce_scatter_base(a, b)
    if op == "all_to_all":
        out = torch.empty_like(b)
        return lambda: pg.alltoall_base(out, b, [], [])
    return lambda: pg.send([a], 1, 0) if rank == 0 else pg.recv([a], 0, 0)


def gloo_links(repeats: int = 8) -> dict:
    """gloo's own time for each collective kind on this machine, two ranks (threads of
    this process over loopback, the library calls a run makes), fitted as alpha per
    round + beta per byte sent: ``{op: Link}``. On cores the workers share it is CPU
    time the call takes from compute (see ``strategies.projection.model.Net``). The
    mean of the calls, not the median: a step pays every call it makes, the ones
    where a rank was descheduled on a loaded machine included."""
    import datetime
    import statistics

    import torch.distributed as dist

    from cluster.network import rounds

    store = dist.HashStore()
    pgs: list = [None, None]

    def connect(r: int) -> None:
        pgs[r] = dist.ProcessGroupGloo(dist.PrefixStore("projection", store), r, 2, datetime.timedelta(seconds=60))

    _on_both(connect)
    links = {}
    for op in GLOO_OPS:
        means = []
        for n in GLOO_BYTES:
            took: list[list[float]] = [[], []]
            _on_both(_time_call, pgs, op, n, repeats, took)
            means.append(statistics.fmean(max(a, b) for a, b in zip(*took)))  # a call ends for both ranks
        links[op] = _fit(means, rounds(op, 2))
    return links


def _time_call(r: int, pgs: list, op: str, nbytes: int, repeats: int, took: list[list[float]]) -> None:
    """Rank ``r``'s side of ``repeats`` calls (after a warm-up: connections, buffers), times in ``took[r]``."""
    call = _gloo_call(pgs[r], op, nbytes, r)
    call().wait()
    for _ in range(repeats):
        t = time.perf_counter()
        call().wait()
        took[r].append(time.perf_counter() - t)


def _fit(seconds: list[float], n_rounds: int):
    """Link(alpha, beta) through the small and the large call's times (beta > 0)."""
    from cluster.network import Link

    (s1, s2), (t1, t2) = GLOO_BYTES, seconds
    per_byte = (t2 - t1) / (s2 - s1) if t2 > t1 else t2 / s2
    return Link(gbit_s=8 / (per_byte * 1e9), latency_s=max(0.0, t1 - s1 * per_byte) / n_rounds)


def _on_both(fn, *args) -> None:
    """``fn(0, *args)`` and ``fn(1, *args)`` at once: the two ranks of a call."""
    import threading

    threads = [threading.Thread(target=fn, args=(r, *args)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


class RunQueue:
    """Other jobs' runnable threads on this machine while the block runs: the kernel's
    ``procs_running`` (/proc/stat) sampled every 20 ms by a thread, less the profile's
    own two (the sampler, the measuring thread). 0 where /proc/stat is not there."""

    def __init__(self, every: float = 0.02):
        import threading

        self.every, self.samples, self._stop = every, [], threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mean(self) -> float:
        return max(0.0, sum(self.samples) / len(self.samples) - 2) if self.samples else 0.0

    def _sample(self) -> None:
        while not self._stop.wait(self.every):
            try:
                with open("/proc/stat") as f:
                    line = next(x for x in f if x.startswith("procs_running"))
            except (OSError, StopIteration):
                return
            self.samples.append(int(line.split()[1]))
