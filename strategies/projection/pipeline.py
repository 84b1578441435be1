"""A pipeline's projected step: the schedule through the simulator with the
measured per-stage costs, once without transfers (the bubble) and once with each
boundary's point-to-point time (the exposed transfers), then each stage's dp
all-reduce from the moment its last W ends."""
from __future__ import annotations

from dataclasses import replace

from cluster.comm import ring_allreduce_bytes
from strategies.pipeline.simulate import StageCost, simulate
from strategies.pipeline.stages import partition
from strategies.projection.model import Job, Net, Profile, Target


def pipeline_stage_costs(profile: Profile, job: Job, net: Net) -> tuple[list[StageCost], list[tuple[int, int]], tuple[int, ...]]:
    """Per-stage simulator costs (measured compute, each boundary's transfer time)
    and the cut, balanced by measured time as the pipeline's default. The target's
    slowdown is the simulator's (``pipeline_step``): by how many ranks compute at once."""
    from strategies.pipeline.generators import placement

    n_stages = job.layout.pp * job.chunks
    bounds = partition([b.total for b in profile.blocks], n_stages)
    place = placement(job.schedule, job.layout.pp, job.chunks)
    pp = net.group("pp")
    costs = []
    for s, (a, b) in enumerate(bounds):
        blocks = profile.blocks[a:b]
        there = pp[place[min(s + 1, n_stages - 1)]]
        hop = net.wall("send", profile.act_bytes[b - 1], tuple(sorted({pp[place[s]], there})))
        costs.append(StageCost(f=sum(x.f for x in blocks), b=sum(x.b for x in blocks),
                               w=sum(x.w for x in blocks), comm=hop, mem=1.0 / job.chunks))
    return costs, bounds, pp


def pipeline_step(profile: Profile, job: Job, target: Target, net: Net) -> tuple[float, float, float, int]:
    """(compute of the busiest rank, exposed transfers and dp all-reduce, bubble, its parameter bytes)."""
    from strategies.pipeline.generators import generate

    L, m = job.layout, job.microbatches
    sched = generate(job.schedule, L.pp, m, chunks=job.chunks)
    costs, bounds, pp = pipeline_stage_costs(profile, job, net)
    # compute slowed by the ranks computing at that moment, every data-parallel copy alike:
    # on shared cores a rank waiting in its bubble or for a transfer leaves its core to the rest
    shared = dict(slowdown=target.slowdown, copies=L.dp)
    ideal = simulate(sched, [replace(c, comm=0.0) for c in costs], **shared)
    real = simulate(sched, costs, **shared)
    per_rank = [[s for s, r in enumerate(sched.placement) if r == rank] for rank in range(L.pp)]
    held = [sum(profile.param_bytes[i] for s in stages for i in range(*bounds[s])) for stages in per_rank]
    k = target.slowdown(L.world)
    optim = [(profile.optim_s * h / max(1, sum(profile.param_bytes)) + profile.fixed_s) * k for h in held]
    busiest = max(range(L.pp), key=lambda r: ideal.busy[r] + optim[r])
    dp = net.group("dp")

    def calls(rank: int) -> list[tuple[str, int, tuple[int, ...], int]]:
        """A rank's sends: its stages' outputs forward and input gradients backward, its dp all-reduce."""
        out = []
        for s in per_rank[rank]:
            a, b = bounds[s]
            for peer, nbytes in ((s + 1, profile.act_bytes[b - 1]), (s - 1, profile.act_bytes[a - 1])):
                if 0 <= peer < len(bounds) and sched.placement[peer] != rank:
                    out.append(("send", nbytes, (pp[rank], pp[sched.placement[peer]]), m))
        return out + [("all_reduce", ring_allreduce_bytes(held[rank], L.dp), dp, 1)]

    heaviest = max(range(L.pp), key=lambda r: sum(c[1] * c[3] for c in calls(r)))
    for _, sent, ranks, times in calls(heaviest):  # the bytes of the rank that sends most
        net.tally(sent, ranks, times)
    end = real.makespan
    for rank in range(L.pp):  # each stage's dp all-reduce starts once its last W is done
        last_w = max(e for _, _, e in real.times[rank])
        sent = ring_allreduce_bytes(held[rank], L.dp)
        end = max(end, last_w + net.wall("all_reduce", sent, dp))
    compute = ideal.busy[busiest] + optim[busiest]
    bubble = ideal.makespan - ideal.busy[busiest]
    return compute, end - ideal.makespan, bubble, held[busiest]
