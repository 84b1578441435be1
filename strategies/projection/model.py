"""Projected cost of one training step of a strategy on N workers of a target cluster.

Pure arithmetic over measured inputs (``Profile``: per-block F/B/W seconds and
tensor sizes from a one-rank profiling run, see ``orchestrator.project``), the
network model of ``cluster.network`` (the same ``Scenario.seconds`` that delays
every simulated call, so a projection of a scenario is what a run under it
would be floored at) and each strategy's own structure:

- data-parallel gradients (ddp, sequence's and a pipeline's dp axis): buckets in
  reverse block order, each all-reduced once the last micro-batch's backward
  has produced it, overlapping the rest of that backward;
- FSDP: per block, an all-gather before its forward and again before its
  backward for every micro-batch, the next block's gather prefetched under the
  current block's compute (not on this machine's CPU ranks, where FSDP2's calls
  block), a reduce-scatter after the last backward; zero3:
  one gather per block and micro-batch, a reduce-scatter after each backward;
- zero1/zero2: DeepSpeed's all-reduce of the gradients (zero2: after every
  micro-batch) and an all-gather of the updated shard after the step, not
  overlapped (``overlap_comm`` is off by default);
- pipeline: the schedule through ``strategies.pipeline.simulate`` with the
  measured per-stage costs, once without transfers (the bubble) and once with
  the point-to-point time of each boundary (the exposed transfers), then the dp
  all-reduce of each stage from the moment its last W ends;
- sequence: Ulysses' four all-to-alls per attention layer forward and backward,
  the ring's k/v passes (and dk/dv back), on the block activations' bytes; a
  rank's compute is the share of a micro-batch the profile measured at a few
  ring degrees (``Profile.sequence``), not 1 / sp;
- powersgd: the dense and P all-reduce then the Q all-reduce after backward;
  demo: one all-gather of the packed top-k payload (``demo_bytes_per_step``);
  gossip: one exchange of the parameters with each neighbour (hidden under
  the next step's compute with ``overlap``).

On this machine's shared cores every call also costs gloo's measured time for
its kind and bytes (``Profile.gloo``), CPU that nothing hides: it is compute,
and only the network's time beyond it may overlap (``Net``). FSDP2's own copies
in and out of its buffers (``Profile.shard_s``, measured at world 2) are compute
of every micro-batch of a rank that shards.

Not modelled: contention between ranks on a link, bucket re-ordering and
DDP's small first bucket, the memory of activations, the warm-up steps of
PowerSGD (uncompressed), gossip's consensus measurement, the CPU of the copies
around a call beyond gloo's own time (FSDP2's excepted).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from cluster.comm import (
    all_gather_bytes,
    all_to_all_bytes,
    reduce_scatter_bytes,
    ring_allreduce_bytes,
)
from cluster.mesh import Layout, nodes_from_per_node
from cluster.network import Link, Scenario, rounds
from strategies.pipeline.stages import BlockProfile

# gloo over loopback on the development machine (2 ranks, 1 KiB and 16 MiB all-reduces:
# 0.6 ms and 19 ms), the link a run without a scenario has between its workers
LOOPBACK = Link(gbit_s=7.0, latency_s=300e-6)
BUCKET_BYTES = 25 * 2**20  # DDP's bucket_cap_mb default
ADAM_STATE = 2  # AdamW keeps two fp32 moments per parameter


@dataclass(frozen=True, kw_only=True)
class Profile:
    """What one rank measured of a workload (one thread, one micro-batch)."""

    workload: str
    micro_batch: int  # samples in the measured micro-batch
    blocks: tuple[BlockProfile, ...]  # F/B/W seconds of each block on that micro-batch
    shapes: tuple[tuple[tuple[int, ...], ...], ...]  # each block's parameter shapes
    param_bytes: tuple[int, ...]  # each block's parameter bytes
    act_bytes: tuple[int, ...]  # each block's output bytes for the micro-batch (a stage boundary's message)
    attention: tuple[int, ...] = ()  # blocks that hold an attention layer (sequence parallelism)
    optim_s: float = 0.0  # one AdamW step over the whole model
    fixed_s: float = 0.0  # the real step's cost beyond its micro-batches and the optimizer (loss, clipping, metrics)
    shard_s: float = 0.0  # FSDP2's own compute per micro-batch when it shards (its copies, DTensor bookkeeping)
    # a sequence rank's compute per micro-batch at ring degree s over the blocks' total: a + b / s + c x s
    # (measured at a few s on a fake group, ``project_profile._sequence_shares``); () is 1 / s
    sequence: tuple[float, ...] = ()
    outer_s: dict[str, float] = field(default_factory=dict)  # a method's own per-step compute (demo's DCT, ...)
    gloo: dict[str, Link] = field(default_factory=dict)  # gloo's own time per call kind here (2 ranks; alpha-beta)
    others: float = 0.0  # other jobs' runnable threads on this machine while it was profiled (mean)
    # the fastest and the slowest of the profile's real steps over their median: how far this
    # machine's compute speed moved while it was measured (the predicted range, ``predict``)
    drift: tuple[float, float] = (1.0, 1.0)
    seconds: float = 0.0  # the profiling run's cost
    steps: int = 0


@dataclass(frozen=True, kw_only=True)
class Target:
    """Where the projection runs: a scenario (None: this machine's loopback), a
    compute speed factor against one worker alone on one core here, and
    ``cores`` when the workers share this machine's cores (a worker then
    computes max(1, N / cores) times slower; with ``others``, other jobs'
    runnable threads, the N workers and they share the cores alike: max(1,
    (N + others) / cores) against the profile's max(1, (1 + others) / cores))."""

    scenario: Scenario | None = None
    speed: float = 1.0
    cores: int | None = None
    others: float = 0.0

    @property
    def name(self) -> str:
        return "local" if self.scenario is None else str(self.scenario)

    def network(self, workers: int) -> Scenario:
        if self.scenario is not None:
            return self.scenario
        return Scenario(name="local", description="loopback", per_node=max(1, workers), intra=LOOPBACK, inter=LOOPBACK)

    def slowdown(self, workers: int) -> float:
        c, d = self.cores, self.others
        share = max(1.0, (workers + d) / c) / max(1.0, (1 + d) / c) if c else 1.0
        return share / self.speed


@dataclass(frozen=True, kw_only=True)
class Prediction:
    strategy: str
    workers: int
    scenario: str
    layout: str
    compute_s: float
    comm_s: float  # exposed: not hidden under compute
    bubble_s: float
    bytes_intra: int  # sent per rank per step, by link class
    bytes_inter: int
    param_bytes_per_rank: int
    state_bytes_per_rank: int  # parameters + gradients + optimizer state
    low_s: float = math.nan  # the step with compute as fast as the profile's fastest step (``Profile.drift``)
    high_s: float = math.nan  # and as slow as its slowest

    @property
    def step_s(self) -> float:
        return self.compute_s + self.comm_s + self.bubble_s


@dataclass(frozen=True, kw_only=True)
class Job:
    """One strategy at one size: the plan's degrees plus what the plan does not say."""

    strategy: str
    layout: Layout
    microbatches: int  # per replica per step (a pipeline's m, else gradient accumulation)
    shards: bool = False  # the fsdp axis shards the model (fsdp)
    outer: str = "none"
    zero: int = 0  # DeepSpeed stage, 0: not ZeRO
    schedule: str = "1f1b"
    chunks: int = 1  # stages per pipeline rank
    ulysses: int = 1  # of sp: the all-to-all degree; the rest is the ring
    options: dict = field(default_factory=dict)  # the outer method's or compressor's options


class Net:
    """Call times and per-link byte tallies for one rank of a layout.

    On this machine's shared cores (``Target.cores``) a call also costs gloo's own
    CPU time (``Profile.gloo``, timed on 2 ranks, slowed like compute by sharing
    among more): with every core
    busy computing, nothing hides it, so it is tallied in ``cpu_s`` (the caller adds it
    to compute) and only the network time beyond it (the scenario's floor while the
    rank sleeps) is waiting the strategy's structure may overlap."""

    def __init__(self, target: Target, layout: Layout, gloo: dict[str, Link] | None = None):
        self.scenario, self.layout = target.network(layout.world), layout
        self.nodes = nodes_from_per_node(layout.world, self.scenario.per_node)
        self.bytes = {"intra": 0, "inter": 0}
        self.gloo = (gloo or {}) if target.cores else {}
        self.share = target.slowdown(layout.world) / target.slowdown(2)  # gloo was timed on 2 ranks at once
        self.cpu_s = 0.0

    def group(self, *axes: str) -> tuple[int, ...]:
        """Rank 0's group over ``axes`` (the groups of an axis are alike under node-major placement)."""
        L, coords = self.layout, {a: 0 for a in ("dp", "pp", "fsdp", "sp")}
        ranks = [0]
        for axis in axes:
            ranks = [r + L.rank_of({**coords, axis: i}) for r in ranks for i in range(getattr(L, axis))]
        return tuple(sorted(ranks))

    def call(self, op: str, sent: int, ranks: tuple[int, ...], times: int = 1) -> float:
        """Seconds of ``times`` calls of ``op`` sending ``sent`` bytes each; their bytes tallied."""
        if len(ranks) <= 1 or times == 0:
            return 0.0
        self.tally(sent, ranks, times)
        cpu = self.cpu(op, sent, ranks)
        self.cpu_s += times * cpu
        return times * max(0.0, self.scenario.seconds(op, sent, sent, ranks) - cpu)

    def tally(self, sent: int, ranks: tuple[int, ...], times: int = 1) -> None:
        """Bytes of ``times`` calls sending ``sent`` each, on the link class ``ranks`` span."""
        link = "inter" if len({self.nodes[r] for r in ranks}) > 1 else "intra"
        self.bytes[link] += sent * times

    def cpu(self, op: str, sent: int, ranks: tuple[int, ...]) -> float:
        """gloo's own time for one call here (0 for a target that is not this machine)."""
        link = self.gloo.get("send" if op == "exchange" else op)
        return 0.0 if link is None or len(ranks) <= 1 else link.seconds(sent, rounds(op, len(ranks))) * self.share

    def wall(self, op: str, sent: int, ranks: tuple[int, ...]) -> float:
        """One call's duration: the network's time, and at least gloo's own."""
        return max(self.scenario.seconds(op, sent, sent, ranks), self.cpu(op, sent, ranks))


def overlap(ready: list[float], durations: list[float], start: float = 0.0) -> float:
    """End of serial calls on one channel, call i starting once ready[i] and its predecessor end."""
    t = start
    for r, d in zip(ready, durations):
        t = max(t, r) + d
    return t


def buckets(sizes: list[int], cap: int = BUCKET_BYTES) -> list[list[int]]:
    """Block indices per gradient bucket, in the order backward fills them (last block first)."""
    out: list[list[int]] = [[]]
    held = 0
    for i in reversed(range(len(sizes))):
        if out[-1] and held + sizes[i] > cap:
            out.append([])
            held = 0
        out[-1].append(i)
        held += sizes[i]
    return out


def allreduce_tail(net: Net, profile: Profile, blocks: list[int], ranks: tuple[int, ...], *, bwd_end: float,
                   bwd_start: float, scale: float, divide: int = 1) -> float:
    """End of the bucketed gradient all-reduce of ``blocks`` whose last backward runs
    bwd_start..bwd_end: each bucket starts once its blocks' backward is done."""
    sizes = [profile.param_bytes[i] // divide for i in blocks]
    t, ready, durs = bwd_start, [], []
    for bucket in buckets(sizes):
        t += sum((profile.blocks[blocks[j]].b + profile.blocks[blocks[j]].w) * scale for j in bucket)
        ready.append(min(t, bwd_end))
        durs.append(net.call("all_reduce", ring_allreduce_bytes(sum(sizes[j] for j in bucket), len(ranks)), ranks))
    return overlap(ready, durs, bwd_start)


def predict(profile: Profile, job: Job, target: Target) -> Prediction:
    """The projected step of ``job`` on ``target`` (one rank's view; a pipeline's slowest
    rank), with its range: the same job predicted again with every measured compute
    time at the profile's fastest and at its slowest step (``Profile.drift``: the
    target's speed divided by it), so what hides under compute or waits for it moves
    as it would; gloo's own call times stay as measured."""
    p = _predict(profile, job, target)
    lo, hi = profile.drift
    low = p.step_s if lo == 1 else _predict(profile, job, replace(target, speed=target.speed / lo)).step_s
    high = p.step_s if hi == 1 else _predict(profile, job, replace(target, speed=target.speed / hi)).step_s
    return replace(p, low_s=low, high_s=high)


def _predict(profile: Profile, job: Job, target: Target) -> Prediction:
    if target.cores and profile.others:  # this machine: as loaded as when it was profiled
        target = replace(target, others=profile.others)
    net = Net(target, job.layout, profile.gloo)
    if job.layout.pp > 1:
        from strategies.projection.pipeline import pipeline_step

        compute, comm, bubble, held = pipeline_step(profile, job, target, net)
    else:
        compute, comm, held = _flat(profile, job, target, net)
        bubble = 0.0
    comm += _scalars(job, net)
    compute += net.cpu_s  # the calls' own CPU time on shared cores (see Net)
    return Prediction(strategy=job.strategy, workers=job.layout.world, scenario=target.name, layout=str(job.layout),
                      compute_s=compute, comm_s=comm, bubble_s=bubble, bytes_intra=net.bytes["intra"],
                      bytes_inter=net.bytes["inter"], **_memory(job, held))


def _scalars(job: Job, net: Net) -> float:
    """The blocking all-reduces of one number a step: the squared gradient norm over
    the axes that split the model (clipping; fp32), a sequence's loss shares (fp64),
    DeepSpeed's two.
    Few bytes, but 2(p-1) latencies each: on a slow network they count."""
    L, t = job.layout, 0.0
    split = tuple(a for a in ("pp", "fsdp") if getattr(L, a) > 1 and (a == "pp" or job.shards))
    if split:
        group = net.group(*split)
        t += net.call("all_reduce", ring_allreduce_bytes(4, len(group)), group)
    if L.sp > 1:
        group = net.group("sp")
        t += net.call("all_reduce", ring_allreduce_bytes(8, len(group)), group)
    if job.zero:  # DeepSpeed's overflow check and gradient norm (fp32; fp64 at stage 3)
        group = net.group("dp")
        t += net.call("all_reduce", ring_allreduce_bytes(8 if job.zero == 3 else 4, len(group)), group, times=2)
    return t


def _memory(job: Job, held: int) -> dict[str, int]:
    """Parameters, gradients and AdamW state this rank holds (``held``: its parameters' full bytes)."""
    n = job.layout.world
    params = held // job.layout.fsdp if job.shards else held // n if job.zero == 3 else held
    grads = held // n if job.zero >= 2 else params
    moments = 1 if job.outer == "demo" or job.options.get("optimizer") == "sgd" else ADAM_STATE  # sign step, momentum SGD
    optim = (held // n if job.zero else params) * moments
    return {"param_bytes_per_rank": params, "state_bytes_per_rank": params + grads + optim}


def _flat(profile: Profile, job: Job, target: Target, net: Net) -> tuple[float, float, int]:
    """A step without pipeline stages: (compute, exposed communication, parameter bytes held)."""
    L, m, k = job.layout, job.microbatches, target.slowdown(job.layout.world) * sequence_share(profile, job)
    blocks = list(range(len(profile.blocks)))
    fwd = sum(b.f for b in profile.blocks) * k
    bwd = sum(b.b + b.w for b in profile.blocks) * k
    total = sum(profile.param_bytes)
    sharded = job.shards or job.zero == 3
    ways = L.fsdp if job.shards else L.world if job.zero == 3 else 1
    # the optimizer steps the shard a rank holds (ZeRO: every stage shards it); demo's step replaces AdamW
    step_s = profile.outer_s.get("demo", profile.optim_s) if job.outer == "demo" else profile.optim_s
    optim = step_s * target.slowdown(L.world) / (L.world if job.zero else ways)
    # a compressor's own compute (not demo's again: its step is the one above), and the step's
    # cost beyond micro-batches and optimizer
    own = profile.outer_s.get(job.strategy, 0.0) if job.strategy != job.outer else 0.0
    optim += (own + profile.fixed_s) * target.slowdown(L.world)
    compute = m * (fwd + bwd) + optim
    if job.shards:  # FSDP2's copies into and out of its buffers, on the thread that computes
        compute += m * profile.shard_s * target.slowdown(L.world)
    comm = _sequence_comm(profile, job, net) if L.sp > 1 else 0.0
    if sharded:
        end = _gathered_step(profile, job, net, k, ways, overlapped=not target.cores)
        if job.shards and L.dp > 1 and job.outer == "none":  # HSDP: the shards all-reduced across dp after
            group = net.group("dp")
            end += net.call("all_reduce", ring_allreduce_bytes(total // ways, L.dp), group)
        comm += end - m * (fwd + bwd)
    else:
        comm += _grad_sync(profile, job, net, blocks, bwd_start=(m - 1) * (fwd + bwd) + fwd, k=k) - m * (fwd + bwd)
    if job.zero in (1, 2):  # DeepSpeed's bucketed all-reduce (stage 2: every micro-batch), the new shards gathered
        group = net.group("dp")
        comm += net.call("all_reduce", ring_allreduce_bytes(total, L.world), group, times=m if job.zero == 2 else 1)
        comm += net.call("all_gather", all_gather_bytes(total // L.world, L.world), group)
    comm = max(comm, 0.0)
    if job.outer == "gossip":
        comm = _gossip(profile, job, net, compute)
    return compute, comm, total


def _grad_sync(profile: Profile, job: Job, net: Net, blocks: list[int], *, bwd_start: float, k: float) -> float:
    """End of the gradient synchronisation after the last micro-batch's backward (from the step's start)."""
    L = job.layout
    bwd_end = bwd_start + sum(profile.blocks[i].b + profile.blocks[i].w for i in blocks) * k
    if job.zero:
        return bwd_end
    if job.outer == "demo":
        from strategies.decentralized.demo import demo_bytes_per_step

        o = job.options
        shapes = [s for i in blocks for s in profile.shapes[i]]
        sent = demo_bytes_per_step(shapes, o.get("topk", 32), o.get("chunk", 64), o.get("value_dtype", "bfloat16"),
                                   L.dp)
        return bwd_end + net.call("all_gather", sent, net.group("dp"))
    if job.outer == "gossip":
        return bwd_end
    axes = tuple(a for a in ("dp", "fsdp", "sp") if getattr(L, a) > 1)
    group = net.group(*axes)
    if job.strategy == "powersgd":
        return bwd_end + _powersgd(profile, job, net, blocks, group)
    return allreduce_tail(net, profile, blocks, group, bwd_end=bwd_end, bwd_start=bwd_start, scale=k)


def _powersgd(profile: Profile, job: Job, net: Net, blocks: list[int], group: tuple[int, ...]) -> float:
    """Two all-reduces after backward (its hook hands over every bucket at the last):
    the dense tensors and every P, then every Q (fp32)."""
    from strategies.compression.base import matrix_shape
    from strategies.compression.powersgd import compresses

    r, rate = job.options.get("rank", 4), job.options.get("min_compression_rate", 2.0)
    dense = ps = qs = 0
    for i in blocks:
        for shape in profile.shapes[i]:
            rc = matrix_shape(shape)
            if rc is not None and compresses(shape, r, rate):
                ps, qs = ps + rc[0] * r * 4, qs + rc[1] * r * 4
            else:
                dense += math.prod(shape) * 4
    w = len(group)
    return (net.call("all_reduce", ring_allreduce_bytes(dense + ps, w), group)
            + net.call("all_reduce", ring_allreduce_bytes(qs, w), group))


def _gossip(profile: Profile, job: Job, net: Net, compute: float) -> float:
    """Parameters exchanged with rank 0's neighbours in the topology (its first round's
    for one-peer-exp) after the step; with ``overlap`` sent at the start of the next
    step, under its compute. Rank 0's ring and torus neighbours include the last
    node's ranks: the exchange crosses nodes wherever the topology does."""
    from strategies.decentralized.topology import mixing_matrix, rank_round

    n, total = job.layout.dp, sum(profile.param_bytes)
    topology = job.options.get("topology", "ring")
    if topology == "complete":
        t = net.call("all_reduce", ring_allreduce_bytes(total, n), net.group("dp"))
    else:
        peers = rank_round(mixing_matrix(topology, n), 0).send_to
        t = net.call("exchange", len(peers) * total, (0, *peers))
    return max(0.0, t - compute) if job.options.get("overlap") else t


def _gathered_step(profile: Profile, job: Job, net: Net, k: float, ways: int, *, overlapped: bool = True) -> float:
    """End of the step's compute and parameter traffic when every block's parameters
    are sharded. FSDP2: gathered before each forward and again before each backward
    of every micro-batch, the next block's gather prefetched while this one computes,
    reduce-scattered after the last backward. On this machine's CPU ranks
    (``overlapped`` False) FSDP2 overlaps nothing: its gathers and reduce-scatters
    are blocking calls on the thread that computes (on a GPU they run on their own
    streams). ZeRO-3 (as DeepSpeed runs it here): gathered once per micro-batch
    (they stay live through its backward), reduce-scattered after every
    micro-batch's backward, no prefetch (``overlap_comm`` off)."""
    group = net.group("fsdp") if job.shards else net.group("dp")
    n, m, fsdp = len(profile.blocks), job.microbatches, not job.zero
    per_mb = 2 if fsdp else 1
    gather = [net.call("all_gather", all_gather_bytes(profile.param_bytes[i] // ways, ways), group,
                       times=per_mb * m) / (per_mb * m) for i in range(n)]
    scatter = [net.call("reduce_scatter", reduce_scatter_bytes(profile.param_bytes[i], ways), group,
                        times=1 if fsdp else m) / (1 if fsdp else m) for i in range(n)]
    t = comm_free = 0.0
    for mb in range(m):
        order = [(i, profile.blocks[i].f * k) for i in range(n)] + \
                [(i, (profile.blocks[i].b + profile.blocks[i].w) * k) for i in reversed(range(n))]
        started = t
        for j, (i, cost) in enumerate(order):
            if j < n or fsdp:  # the gather is issued when the previous block's compute starts (prefetch) or ends
                comm_free = max(comm_free, started if fsdp and overlapped else t) + gather[i]
            started = max(t, comm_free)
            t = started + cost
            if j >= n and (mb == m - 1 or not fsdp):  # its gradient is complete: reduce-scatter it
                comm_free = max(comm_free, t) + scatter[i]
                if fsdp and not overlapped:
                    t = comm_free
    return max(t, comm_free)


def sequence_share(profile: Profile, job: Job) -> float:
    """A rank's share of a micro-batch's compute at the job's sequence degree sp (ring
    r = sp / ulysses): ``a + b / sp + c x r`` as the profile measured it
    (``Profile.sequence``), 1 / sp where it measured none, 1 without sequence parallelism."""
    sp = job.layout.sp
    if sp == 1:
        return 1.0
    if not profile.sequence:
        return 1.0 / sp
    a, b, c = profile.sequence
    return a + b / sp + c * (sp // job.ulysses)


def _sequence_comm(profile: Profile, job: Job, net: Net) -> float:
    """Ulysses' all-to-alls (q, k, v and the output; again backward) and the ring's
    passes per attention layer and micro-batch, inside the layer's compute: k/v r - 1
    times forward; backward, k/v r - 1 times and the dK/dV accumulators r times. Each
    pass is posted before the block it overlaps is computed (``_rotate``), and
    backward's accumulator of step t leaves one block's compute after step t's k/v
    and arrives while step t + 1 computes, so a rank waits r - 1 transfers forward
    and r backward: 2r - 1 a layer, where a transfer outlasts a block's compute.
    Every one of the 3r - 2 sends is tallied and costs gloo's CPU. The blocks'
    compute under the transfers is not subtracted: where it outlasts them (a fast
    network) the waits counted here are what is over-predicted, at most."""
    sp, u = job.layout.sp, job.ulysses
    ring = sp // u
    group = net.group("sp")
    t = 0.0
    for i in profile.attention:
        local = profile.act_bytes[i] // sp
        if u > 1:
            t += net.call("all_to_all", all_to_all_bytes(local, u), group[:u], times=8 * job.microbatches)
        if ring > 1:
            pair = group[::u][:2]
            t += net.call("send", 2 * local, pair, times=(2 * ring - 1) * job.microbatches)
            net.call("send", 2 * local, pair, times=(ring - 1) * job.microbatches)  # arrive under compute
    return t
