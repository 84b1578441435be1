"""Which layout a strategy takes on N workers when projected, by stated rules.

- pipeline: stages p = the largest divisor of N whose p x chunks stages fit the
  workload's blocks (``min(blocks, N)`` when that divides N) and whose schedule
  is defined for the micro-batches; the rest data parallel;
- sequence: the sequence degree = the largest divisor of N the workload's heads
  and sequence length allow (Ulysses as the options say, the rest ring); the
  rest data parallel;
- zero1/2/3: N data-parallel ranks; every other strategy: its own plan at N;
- the global batch: N x the projection's micro-batches (``--microbatches``) x the
  workload's micro-batch at every row alike, so that rows compare the same work
  a step: a data-parallel replica of r ranks (a pipeline's stages, a sequence's
  shards) takes r x ``--microbatches`` micro-batches, unless the strategy's
  options set their own (``pipeline:microbatches=8``, per replica).

A row a rule cannot make (a pipeline on one worker) raises ``Skip`` with a
one-line note; a strategy the projection has no model for is a ``Skip`` too.
Options that are invalid whatever N is raise ValueError (bad input).
"""
from __future__ import annotations

from pydantic import ValidationError

from strategies.projection.model import Job
from workloads import Workload

MODELLED = ("single", "ddp", "fsdp", "zero1", "zero2", "zero3", "pipeline", "sequence", "powersgd", "demo", "gossip",
            "mesh")


class Skip(Exception):
    """A (strategy, N) row that cannot exist under the rules: the message is the note."""


def options_of(name: str, options: dict, workload: Workload):
    """The strategy's class and validated options, or ValueError naming the field (bad input)."""
    from strategies import STRATEGIES

    try:
        cls = STRATEGIES.get(name)
    except (KeyError, ValueError) as e:
        raise ValueError(e.args[0]) from None
    why = cls.unsupported(type(workload))
    if why:
        raise ValueError(f"strategy={name!r} cannot train workload={workload.name!r}: {why}")
    try:
        return cls, cls.Options(**options)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise ValueError(f"strategy.{where}={err.get('input')!r}: {err['msg']}") from None


def job_for(name: str, options: dict, workers: int, workload: Workload, *, microbatches: int,
            n_blocks: int) -> Job:
    """The projected job of strategy ``name`` on ``workers`` (Skip: no such row)."""
    cls, opts = options_of(name, options, workload)
    if name not in MODELLED:
        raise Skip(f"{name}: no projection model yet (modelled: {', '.join(MODELLED)})")
    if name.startswith("zero"):
        from cluster.mesh import Layout

        return Job(strategy=name, layout=Layout(dp=workers), microbatches=microbatches, zero=int(name[-1]))
    own = "microbatches" in options  # the strategy's own, per replica: its rows say so (``project``)
    if own:
        microbatches = opts.microbatches
    elif "microbatches" in type(opts).model_fields:  # a mesh's pipeline: the same work a step as every row
        opts = opts.model_copy(update={"microbatches": microbatches})
    if name == "pipeline":
        opts = _pipeline_options(opts, workers, microbatches, n_blocks, per_stage=not own)
    elif name == "sequence":
        opts = _sequence_options(opts, workers, workload)
    plan = _plan(cls, opts, name, workers)
    share = plan.layout.world // (plan.layout.dp * plan.layout.fsdp)  # ranks of one data-parallel replica
    if share > 1 and not own and name != "pipeline":  # the global batch of every row (the pipeline's: above)
        microbatches *= share
        if "microbatches" in type(opts).model_fields:
            opts = opts.model_copy(update={"microbatches": microbatches})
            plan = _plan(cls, opts, name, workers)
    if plan.layout.world != workers or (plan.layout.pp > 1 and plan.layout.sp > 1):
        raise Skip(f"{name} on {workers} workers: layout {plan.layout} is not modelled")
    if plan.outer not in ("none", "demo", "gossip") or (plan.outer != "none" and plan.inner_axes):
        raise Skip(f"{name} on {workers} workers: outer={plan.outer!r} over {plan.inner_axes} is not modelled")
    pp = plan.pipeline_options
    seq = plan.sequence_options
    from strategies.pipeline.generators import chunks_per_rank

    return Job(strategy=name, layout=plan.layout, microbatches=pp.microbatches if pp else microbatches,
               shards=plan.shards, outer=plan.outer, schedule=pp.schedule if pp else "1f1b",
               chunks=chunks_per_rank(pp.schedule, pp.chunks) if pp else 1, ulysses=seq.ulysses if seq else 1,
               options={**plan.outer_options, **opts.model_dump()})


def _plan(cls, opts, name: str, workers: int):
    try:
        return cls.plan(opts, workers)
    except ValueError as e:
        raise Skip(f"{name} on {workers} workers: {e}") from None


def _pipeline_options(opts, workers: int, microbatches: int, n_blocks: int, *, per_stage: bool = True):
    """The most stages that fit; with ``per_stage`` a replica of p stages takes p x
    ``microbatches`` (the global batch of a data-parallel row), else ``microbatches``."""
    from strategies.pipeline.generators import chunks_per_rank, min_microbatches

    if opts.schedule == "auto":
        raise Skip("pipeline: schedule 'auto' searches with a run's own costs; project a named schedule")
    chunks = chunks_per_rank(opts.schedule, opts.chunks)
    m = (lambda p: p * microbatches) if per_stage else (lambda p: microbatches)
    fits = [p for p in range(2, workers + 1) if workers % p == 0 and p * chunks <= n_blocks
            and m(p) >= min_microbatches(opts.schedule, p)
            and (opts.schedule != "interleaved-1f1b" or m(p) % p == 0)]
    if not fits:
        raise Skip(f"pipeline on {workers} workers: no stage count p >= 2 divides {workers} with {chunks} x p stages "
                   f"within the workload's {n_blocks} blocks and {microbatches} micro-batches")
    return opts.model_copy(update={"stages": max(fits), "microbatches": m(max(fits))})


def _sequence_options(opts, workers: int, workload: Workload):
    from strategies.sequence.part import sequence_layout

    u = opts.ulysses
    for sp in sorted((d for d in range(2, workers + 1) if workers % d == 0 and d % u == 0), reverse=True):
        trial = opts.model_copy(update={"ring": sp // u})
        try:
            sequence_layout(trial, sp, workload)
        except ValueError:
            continue
        return trial
    raise Skip(f"sequence on {workers} workers: no sequence degree >= 2 dividing {workers} fits "
               f"workload.n_heads / seq_len with strategy.ulysses={u}")
