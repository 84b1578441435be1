"""Strategies composed of parallel parts on one mesh: the one training step.

A ``Plan`` says what a job composes: the degrees of the mesh's axes
(``cluster.mesh.Layout``: dp, pp, fsdp, sp), each part's options, how the
``fsdp`` ranks of a node hold the model (``inner``: shard it, or replicate it)
and which low-bandwidth method syncs the ``dp`` axis across nodes (``outer``).
``Parallel`` turns a plan into one rank's model and step:

1. build the whole model with the job's seed (weights equal ``single``'s);
2. ``pp``: keep this rank's pipeline stages (``strategies.pipeline.part``);
3. ``sp``: give the blocks this rank's token positions and the distributed
   attention (``strategies.sequence.part``);
4. ``fsdp``: shard every held block and root over the ``fsdp`` group
   (``strategies.fsdp.apply_fsdp``); or, for a whole model per rank,
   replicate it with torch DDP over the gradient group (``strategies.ddp``);
5. the optimizer and the one step end (``strategies.step.StepEnd``), whose
   gradient norm is summed over the axes that split the model (pp, fsdp);
6. ``outer``: the low-bandwidth sync across ``dp`` (``strategies.outer``).

Gradients: every rank's loss is its samples' mean times its share of the
tokens, so gradients are *summed* over ``sp`` and *averaged* over the data
axes. FSDP's reduce-scatter averages over ``fsdp``; the data-parallel part
all-reduces over the gradient group (``dp`` unless an outer method syncs it,
``fsdp`` when it replicates, ``sp``) and divides by the data axes in it. The
registered strategies (single, ddp, fsdp, pipeline, sequence, the compression
family) are named plans; ``mesh`` lets a user spell any plan.
"""
from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel
from torch import nn

from cluster.mesh import Layout, Mesh, per_node_of
from strategies.base import OptimConfig, StepStats, Strategy, StrategyContext, eval_micro_batches, eval_mode, run_micro_batches
from strategies.batchnorm import convert_sync_batchnorm, has_batchnorm
from strategies.dcp import full_param_groups, held_bytes, load_state, read_metadata, save_state
from strategies.optim import build_optimizer
from strategies.step import StepEnd, clip
from workloads import Batch, Workload

OUTERS = ("none", "demo", "powersgd", "gossip", "diloco")


@dataclass(frozen=True, kw_only=True)
class Plan:
    """What one job composes (pure data; ``Parallel`` acts on it)."""

    layout: Layout
    inner: str = "fsdp"  # how the fsdp axis holds the model: "fsdp" shards it, "ddp" replicates it
    outer: str = "none"  # the sync across dp: one of OUTERS
    pipeline_options: Any = None  # PipelineOptions when pp > 1
    sequence_options: Any = None  # SequenceOptions when sp > 1
    fsdp_options: Any = None  # FSDPOptions (defaults when None)
    ddp_options: Any = None  # DDPOptions (defaults when None)
    outer_options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, workers: int, *, pp: int | None = None, sp: int | None = None, fsdp: int | None = None,
           dp: int | None = None, **parts) -> "Plan":
        return cls(layout=Layout.for_world(workers, pp=pp, sp=sp, fsdp=fsdp, dp=dp), **parts)

    @property
    def shards(self) -> bool:
        """Whether the fsdp axis shards the model (FSDP) rather than replicating it."""
        return self.layout.fsdp > 1 and self.inner == "fsdp"

    @property
    def grad_axes(self) -> tuple[str, ...]:
        """The axes over which the data-parallel part all-reduces gradients each step."""
        axes = ("dp",) if self.outer == "none" else ()
        axes += () if self.shards else ("fsdp",)
        return tuple(a for a in (*axes, "sp") if getattr(self.layout, a) > 1)

    @property
    def divide(self) -> int:
        """The data axes among ``grad_axes``: what the summed gradients are divided by."""
        return math.prod(getattr(self.layout, a) for a in self.grad_axes if a in ("dp", "fsdp"))

    @property
    def norm_axes(self) -> tuple[str, ...]:
        """The axes that split one model between ranks: the gradient norm sums over them."""
        return tuple(a for a in ("pp", "fsdp") if getattr(self.layout, a) > 1 and (a == "pp" or self.shards))

    @property
    def replicas(self) -> int:
        """Ranks reading different samples: the data axes (pp and sp ranks share samples)."""
        return self.layout.dp * self.layout.fsdp

    @property
    def inner_axes(self) -> tuple[str, ...]:
        """The axes an outer method expects inside one node."""
        return tuple(a for a in ("pp", "fsdp", "sp") if getattr(self.layout, a) > 1)


def check_plan(plan: Plan, workload: Workload, *, batch_size: int | None = None,
               per_node: int | None = None, who: str = "strategy='mesh'") -> None:
    """Every error a plan can show before a worker starts (one line, with the numbers)."""
    L = plan.layout
    if L.sp > 1:
        from strategies.sequence.part import check_workload, sequence_layout

        check_workload(workload, who)
        sequence_layout(plan.sequence_options, L.sp, workload)
    if L.pp > 1:
        from strategies.pipeline.part import check_pipeline, count_blocks

        if "blocks" not in type(workload).capabilities():
            raise ValueError(f"{who} cannot train workload={workload.name!r}: a pipeline cuts the model "
                             f"between blocks")
        check_pipeline(plan.pipeline_options, p=L.pp, n_blocks=count_blocks(workload), field="strategy.pp",
                       replicas=plan.replicas, batch_size=batch_size)
    if plan.outer != "none":
        check_outer(plan, per_node)


def check_outer(plan: Plan, per_node: int | None) -> None:
    """An outer method syncs the dp axis across nodes: it needs dp >= 2 and, when
    other axes are inside each node, the nodes to put them in. ``per_node``: ranks
    per node (None: not known yet, a cluster's placement decides)."""
    L, outer = plan.layout, plan.outer
    if outer == "gossip":
        from strategies.decentralized.topology import topology_error

        why = topology_error(plan.outer_options["topology"], L.dp)
        if why:
            raise ValueError(why)
    inner = math.prod(getattr(L, a) for a in plan.inner_axes)
    if inner == 1:
        return  # every rank is its own participant, as in the flat demo or gossip
    if L.dp < 2:
        raise ValueError(f"strategy.outer={outer!r}: needs strategy.dp >= 2 (one replica per node to sync), "
                         f"got dp={L.dp} ({L})")
    if per_node is None:
        return  # a cluster's placement decides; the workers check it at set-up
    if per_node % inner:
        raise ValueError(f"strategy.outer={outer!r}: {' x '.join(plan.inner_axes)} = {inner} ranks must fit inside "
                         f"a node of per_node={per_node} ranks")
    if L.world // per_node < 2:
        raise ValueError(f"strategy.outer={outer!r}: needs at least 2 nodes; workers={L.world} with "
                         f"per_node={per_node} is 1 node (simulate nodes with --scenario nodes=2,"
                         f"per_node={inner},...)")


class Parallel(Strategy):
    """A strategy that is a ``Plan``: subclasses say which (``plan``)."""

    requires: ClassVar[dict[str, str]] = {}

    @classmethod
    def plan(cls, options: BaseModel, workers: int) -> Plan:
        raise NotImplementedError

    @classmethod
    def replicas(cls, *, workers: int, options: BaseModel) -> int:
        return cls.plan(options, workers).replicas

    @classmethod
    def check_job(cls, *, workers: int, workload: Workload, options: BaseModel | None = None,
                  batch_size: int | None = None, per_node: int | None = None) -> None:
        super().check_job(workers=workers, workload=workload)
        plan = cls.plan(options if options is not None else cls.Options(), workers)
        check_plan(plan, workload, batch_size=batch_size, per_node=per_node, who=f"strategy={cls.name!r}")

    # -- set-up --------------------------------------------------------------------------------
    def setup(self, workload: Workload, ctx: StrategyContext) -> None:
        self.workload, self.ctx = workload, ctx
        plan = self.layout_plan = type(self).plan(self.options, ctx.world)
        # the driver's checks, for jobs built without a JobSpec
        check_plan(plan, workload, per_node=per_node_of(ctx.comm.nodes))
        L = plan.layout
        self.mesh = mesh = Mesh(ctx.comm, L)
        model = workload.model().to(ctx.device)  # the whole model, seeded as single's is
        blocks = list(model)
        layout = positions = None
        if L.sp > 1:
            from strategies.sequence.part import sequence_layout

            layout = sequence_layout(plan.sequence_options, L.sp, workload)
            positions = layout.positions(mesh.coord("sp"))
        self.pp = None
        if L.pp > 1:
            from strategies.pipeline.part import PipelinePart

            self.pp = PipelinePart(workload=workload, blocks=blocks, options=plan.pipeline_options, pp=mesh.group("pp"),
                                   world=ctx.comm, device=ctx.device, positions=positions)
            self.module = self.pp.module
            del model, blocks
        else:
            self.module = model
        held = list(self.module.children())
        self.sp = None
        if L.sp > 1:
            from strategies.sequence.part import apply_sp, subgroups

            ulysses, ring = subgroups(ctx.comm, L.groups("sp"), layout)
            self.sp = apply_sp(held, workload, layout, mesh.coord("sp"), ulysses=ulysses, ring=ring,
                               kernel=plan.sequence_options.kernel, device=ctx.device)
        self.grad_comm = mesh.group(*plan.grad_axes) if plan.grad_axes else None
        self._sync_batchnorm(plan)
        self.model = self._distribute(plan, held)
        self.optim = optim = self.optim_config(ctx.optim)
        self.opt, self.sched = build_optimizer(self.module, optim, ctx.total_steps)
        norm_comm = mesh.group(*plan.norm_axes) if plan.norm_axes else None
        self.end = StepEnd(self.module, self.opt, self.sched, optim, norm_comm=norm_comm)
        from strategies.decentralized.flat import broadcast_flat, float_buffers
        from strategies.outer import local_tensors, make_outer

        self.outer = make_outer(plan.outer, self.module, mesh.group("dp") if plan.outer != "none" else None,
                                plan.outer_options, optim=optim, total_steps=ctx.total_steps,
                                seed=torch.initial_seed() % 2**31)
        # an outer method's replicas start equal whatever the workload's init, and keep their
        # batch-norm statistics equal (each rank's own batch moves them): averaged after each step
        self._outer_buffers = float_buffers(self.module) if plan.outer != "none" and not self.outer.mixes_buffers \
            else []
        if plan.outer != "none":
            broadcast_flat(mesh.group("dp"), [*local_tensors(self.module), *self._outer_buffers])
        # a rank holding part of the model writes the whole model's optimizer groups
        self.full_groups = full_param_groups(workload, optim.weight_decay) if L.pp > 1 else None

    def optim_config(self, base: OptimConfig) -> OptimConfig:
        """This strategy's optimizer settings: the job's (a method with its own overrides it)."""
        return base

    def _sync_batchnorm(self, plan: Plan) -> None:
        """Batch norm statistics over the replicas a step averages (as one process
        over the global batch would compute them)."""
        from strategies.ddp import DDPOptions

        data = tuple(a for a in ("dp", "fsdp") if a in plan.grad_axes or (a == "fsdp" and plan.shards))
        sync = plan.shards or (plan.ddp_options or DDPOptions()).sync_bn
        if data and sync and has_batchnorm(self.module):
            convert_sync_batchnorm(self.module, self.mesh.group(*data))

    def _distribute(self, plan: Plan, held: list[nn.Module]) -> nn.Module:
        """Shard (FSDP) or replicate (DDP) what this rank holds; the module the step calls."""
        comm, divide = self.grad_comm, plan.divide
        self._fsdp: list = []
        if plan.shards:
            from strategies.fsdp import FSDPOptions, apply_fsdp

            hook = None
            if comm is not None and comm.world > 1:
                def hook(t: torch.Tensor) -> None:  # HSDP: the shards' sum over sp, mean over dp
                    comm.all_reduce(t).div_(divide)
            roots = list(self.pp.stages.values()) if self.pp else [self.module]
            units = [b for b in held if any(True for _ in b.parameters())]
            # composed with a pipeline, parameters stay gathered for the step's micro-batches (as
            # torchtitan does): its split backward asks autograd for the gathered parameters' gradients
            self._fsdp = apply_fsdp(units, roots, self.mesh.group("fsdp"), plan.fsdp_options or FSDPOptions(),
                                    device=self.ctx.device, all_reduce=hook,
                                    reshard_after_forward=False if self.pp else None)
            self._fsdp_roots = roots
            return self.module
        if self.pp is None and comm is not None and comm.world > 1:
            from strategies.ddp import DDPOptions, replicate

            return replicate(self.module, comm, plan.ddp_options or DDPOptions(), device=self.ctx.device,
                             register=lambda ddp: self.register_hook(ddp, comm, divide),
                             sync=not self.ctx.state_follows)
        return self.module

    def register_hook(self, ddp, comm, divide: int) -> None:
        """How DDP's buckets are combined: summed over ``comm``, divided by ``divide``
        (the compression strategies override it)."""
        from strategies.ddp import sum_then_divide_hook

        ddp.register_comm_hook((comm, divide), sum_then_divide_hook)

    def data_shard(self) -> tuple[int, int]:
        L = self.layout_plan.layout
        return L.index(self.ctx.rank, "dp", "fsdp"), self.layout_plan.replicas

    # -- the step ------------------------------------------------------------------------------
    @contextmanager
    def _no_sync(self):
        """Around every backward but a step's last: accumulate, do not reduce."""
        if self._fsdp:
            self.model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.model.set_requires_gradient_sync(True)
        elif hasattr(self.model, "no_sync"):
            with self.model.no_sync():
                yield
        else:
            yield

    def train_step(self, micro_batches: list[Batch]) -> StepStats:
        ctx = self.ctx
        self.outer.begin_step(self.sched.last_epoch)
        scale = self.sp.frac if self.sp else 1.0
        timeline: list = []
        if self.pp:
            loss, extra, timeline = self._pipeline_step(micro_batches, scale)
            reports = self.pp.reports_loss
        else:
            positions = self.sp.positions if self.sp else None
            loss, extra, t_backward = run_micro_batches(
                self.model, self.workload, micro_batches, device=ctx.device, no_sync=self._no_sync,
                weight=self.grad_weight, positions=positions, scale=scale)
            # DDP's (and FSDP's) backward returns only once every reduction is done: the
            # time since the last one was launched is communication no compute hid
            ctx.comm.close_launched(t_backward)
            reports = True
        if self.sp:
            share = torch.tensor(0.0 if math.isnan(loss) else loss, dtype=torch.float64)
            loss = float(self.mesh.group("sp").all_reduce(share))  # the shares add up to the loss
            reports = reports and self.mesh.coord("sp") == 0
            extra.update(self.sp.metrics())
        step = self.sched.last_epoch  # 0-based index of this step
        extra.update(self.outer.before_step(step))
        if self.outer.replaces_optimizer:
            extra.update(self._outer_step(step))
        else:
            extra.update(self.end())
        extra.update(self.outer.after_step(step + 1))
        if self._outer_buffers:
            from strategies.decentralized.flat import average_flat

            average_flat(self.mesh.group("dp"), self._outer_buffers)
        if self.pp:
            extra["predicted_idle_frac"] = self.pp.predicted.bubble[self.pp.rank]
        samples = sum(mb[0].shape[0] for mb in micro_batches)
        # one rank of the ranks that share samples reports them (StepStats)
        return StepStats(loss=loss if reports else math.nan, samples=samples if reports else 0, extra=extra,
                         timeline=timeline)

    # -- held-out evaluation ---------------------------------------------------------------------
    def evaluate(self, micro_batches: list[Batch]) -> StepStats:
        scale = self.sp.frac if self.sp else 1.0
        positions = self.sp.positions if self.sp else None
        with eval_mode(self.module):
            if self.pp:
                loss_sum, sums, samples = self.pp.evaluate(micro_batches, positions=positions, scale=scale)
                loss = loss_sum / samples if samples else math.nan
                extra = {k: v / samples for k, v in sums.items()} if samples else {}
            else:
                # the module, not DDP's wrapper: a forward without gradients needs no reducer
                loss, extra = eval_micro_batches(self.module, self.workload, micro_batches, device=self.ctx.device,
                                                 positions=positions, scale=scale)
                samples = sum(mb[0].shape[0] for mb in micro_batches)
        for unit in self._fsdp:  # gathered for the forward (a pipeline's stay gathered): shard again
            unit.reshard()
        reports = not self.pp or self.pp.reports_loss
        if self.sp:
            share = torch.tensor(0.0 if math.isnan(loss) else loss, dtype=torch.float64)
            loss = float(self.mesh.group("sp").all_reduce(share))  # the shares add up to the loss
            reports = reports and self.mesh.coord("sp") == 0
        return StepStats(loss=loss if reports else math.nan, samples=samples if reports else 0,
                         extra=extra if reports else {})

    def replicas_differ(self) -> bool:
        return self.outer.replicas_differ

    @contextmanager
    def replica_average(self):
        """Every replica's weights replaced by the replicas' mean over dp, then put back."""
        if not self.outer.replicas_differ:
            yield
            return
        from strategies.decentralized.flat import average_flat, float_buffers
        from strategies.outer import local_tensors

        tensors = [*local_tensors(self.module), *float_buffers(self.module)]
        kept = [t.detach().clone() for t in tensors]
        with torch.no_grad():
            average_flat(self.mesh.group("dp"), tensors)
        try:
            yield
        finally:
            with torch.no_grad():
                for t, k in zip(tensors, kept):
                    t.copy_(k)

    def _outer_step(self, step: int) -> dict[str, float]:
        """The outer method's own update in place of AdamW (demo's sign step)."""
        if not self.end.held:
            self.end.held = {**held_bytes(self.module, self.opt), "optim_bytes": self.outer.optim_bytes()}
        norm, finite = clip(self.module, self.optim, norm_comm=self.end.norm_comm)
        out = self.outer.optimizer_step(step, finite=finite)
        with warnings.catch_warnings():  # the outer method steps in place of the optimizer, so torch's
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            self.sched.step()  # "scheduler before optimizer" check does not apply: the schedule and step count
        return {**out, "grad_norm": norm}

    def _pipeline_step(self, micro_batches: list[Batch], scale: float) -> tuple[float, dict, list]:
        from strategies.ddp import GradAverage

        pending: dict[int, GradAverage] = {}
        comm = self.grad_comm
        if self._fsdp:
            for unit in self._fsdp:  # accumulate over the micro-batches; reduce once, below
                unit.set_is_last_backward(False)
                unit.set_reshard_after_backward(False)
                unit.set_requires_gradient_sync(False)
            done = lambda s: None  # noqa: E731
        elif comm is not None and comm.world > 1:
            def done(s: int) -> None:  # a stage's weights are final: start averaging them
                pending[s] = GradAverage(self.pp.stages[s], comm, self.layout_plan.divide)
        else:
            done = lambda s: None  # noqa: E731
        run = self.pp.run(micro_batches, positions=self.sp.positions if self.sp else None, scale=scale,
                          weights_done=done)
        if self._fsdp:
            self._fsdp_reduce()
        for avg in pending.values():
            avg.finish()
        extra = {k: v / run.samples for k, v in run.metrics.items()} if self.pp.reports_loss else {}
        return (run.loss if self.pp.reports_loss else math.nan), extra, run.timeline

    def _fsdp_reduce(self) -> None:
        """FSDP's post-backward, run by hand once the pipeline's last W is done (as
        torch.distributed.pipelining does: its backward is autograd.grad, not .backward)."""
        for unit in self._fsdp:
            unit.set_is_last_backward(True)
            unit.set_reshard_after_backward(True)
            unit.set_requires_gradient_sync(True)
        for root in self._fsdp_roots:
            state = root._get_fsdp_state()
            for s in state._state_ctx.all_states:
                for group in s._fsdp_param_groups:
                    group.post_backward()
            state._root_post_backward_final_callback()

    # -- state ---------------------------------------------------------------------------------
    rank_state_key: ClassVar[str] = "rank"  # where in a checkpoint's extras rank_state goes

    def rank_state(self) -> dict[str, torch.Tensor]:
        """What this rank alone holds beyond the model and optimizer (an outer method's
        or a compressor's residuals), name -> tensor."""
        return self.outer.state()

    def load_rank_state(self, state: dict[str, torch.Tensor]) -> None:
        self.outer.load_state(state)

    def _rank_key(self) -> str:
        # differs per rank, so each rank's state has its own keys; a different world
        # size (or layout) starts it afresh
        return f"w{self.ctx.world}r{self.ctx.rank}"

    def heal_state(self) -> dict:
        return {"model": self.module.state_dict(), "optim": self.opt.state_dict(), "sched": self.sched.state_dict(),
                "rank": self.rank_state()}

    def load_heal_state(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optim"])
        self.sched.load_state_dict(state["sched"])
        if state["rank"]:
            self.load_rank_state(state["rank"])

    def save_checkpoint(self, url: str) -> None:
        extra: dict[str, Any] = {"sched": self.sched.state_dict()}
        own = {k: v.clone() for k, v in self.rank_state().items()}
        if own:
            extra[self.rank_state_key] = {self._rank_key(): own}
        save_state(url, self.module, self.opt, extra, groups=self.full_groups)

    def load_checkpoint(self, url: str) -> None:
        """Model, optimizer and schedule from any checkpoint of the model (any
        layout or world size); this rank's own state when the checkpoint has it
        (same layout and world size), else fresh."""
        prefix = f"extra.{self.rank_state_key}.{self._rank_key()}."
        keys = read_metadata(url).state_dict_metadata
        template = {k[len(prefix):]: torch.empty(m.size, dtype=m.properties.dtype)
                    for k, m in keys.items() if k.startswith(prefix)}
        extra: dict[str, Any] = {"sched": self.sched.state_dict()}
        if template:
            extra[self.rank_state_key] = {self._rank_key(): template}
        extra = load_state(url, self.module, self.opt, extra, groups=self.full_groups)
        self.sched.load_state_dict(extra["sched"])
        if template:
            self.load_rank_state(extra[self.rank_state_key][self._rank_key()])
        else:
            self.outer.restart()

    def memory_bytes(self) -> dict[str, int]:
        return {**self.end.held, **self.outer.held()} if self.end.held else {}  # measured at the second step
