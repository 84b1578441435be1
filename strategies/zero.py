"""zero1 / zero2 / zero3: DeepSpeed's ZeRO optimizer, fp32, on the caller's process group.

Stage 1 shards the optimizer state, stage 2 the gradients too, stage 3 the
parameters too. The model, AdamW and its LR schedule are built exactly as
``strategies.optim.build_optimizer`` builds them and handed to
``deepspeed.initialize``; DeepSpeed clips (``gradient_clipping`` =
``optim.grad_clip``), steps the optimizer and advances the schedule.

Batch sizes: polytrain's loader decides them, so the engine starts with one
sample per micro-batch and one micro-batch per step; ``train_step`` tells the
engine the real micro-batch size and count (``set_train_micro_batch_size`` /
``set_train_batch_size``) the first time it sees them, and marks the
accumulation boundary itself on the last micro-batch of each step.

Byte accounting: DeepSpeed's collectives go through ``deepspeed.comm``, whose
backend object (``deepspeed.comm.comm.cdb``, a ``TorchBackend``) is the single
place they reach torch.distributed. ``_CountingBackend`` wraps that object's
collective methods once per process and charges each call to the current
strategy's ``cluster.Comm`` with the ring formulas ``cluster.comm`` uses
(all-reduce 2(w-1)/w of the tensor, reduce-scatter (w-1)/w of the full input,
all-gather (w-1) shards, broadcast one copy per peer from the root), so the
numbers are exact functions of the tensor sizes the calls really carried, not
estimates of what ZeRO should send. Times: a blocking call counts as waiting;
an async one is in flight until its work completes.
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
import os
import tempfile
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.comm import all_gather_bytes, broadcast_bytes, nbytes, reduce_scatter_bytes, ring_allreduce_bytes
from strategies.base import StepStats, Strategy, StrategyContext, eval_micro_batches, eval_mode
from strategies.batchnorm import convert_sync_batchnorm, has_batchnorm
from strategies.dcp import is_local
from strategies.optim import build_optimizer
from strategies.registry import register_strategy
from workloads import Batch, Workload

_TAG = "polytrain"  # the one checkpoint tag in a checkpoint folder

# DeepSpeed config keys polytrain sets from the job spec: a user value is rejected
# (key -> where to set it instead). Stage is checked per strategy.
_OWNED = {
    "train_batch_size": "batch_size",
    "train_micro_batch_size_per_gpu": "batch_size / workers / grad_accum",
    "gradient_accumulation_steps": "grad_accum",
    "gradient_clipping": "optim.grad_clip",
    "optimizer": "optim (polytrain builds AdamW)",
    "scheduler": "optim (polytrain builds the warm-up/cosine schedule)",
}


class ZeroOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    stage: ClassVar[int] = 0

    ds_config: dict[str, Any] = Field(
        default_factory=dict,
        description="DeepSpeed config merged key by key (nested dicts recursively) over polytrain's; the user's "
        "value wins, except for keys polytrain derives from the job (batch sizes, gradient_clipping, optimizer, "
        "scheduler, zero_optimization.stage, fp16/bf16), which are rejected",
    )
    overlap_comm: bool = Field(False, description="overlap gradient reduction with backward (ZeRO overlap_comm)")
    reduce_bucket_mb: float = Field(
        25.0, gt=0, description="gradient reduction bucket in MiB of fp32 (ZeRO reduce_bucket_size)"
    )

    @model_validator(mode="after")
    def _no_contradictions(self) -> "ZeroOptions":
        cfg = self.ds_config
        for key, where in _OWNED.items():
            if key in cfg:
                raise ValueError(f"ds_config.{key}={cfg[key]!r}: set by polytrain from {where}; remove it")
        for key in ("fp16", "bf16"):
            if isinstance(cfg.get(key), dict) and cfg[key].get("enabled"):
                raise ValueError(f"ds_config.{key}.enabled={cfg[key]['enabled']!r}: zero strategies train in fp32; "
                                 "remove it")
        zo = cfg.get("zero_optimization", {})
        if not isinstance(zo, dict):
            raise ValueError(f"ds_config.zero_optimization={zo!r}: must be a mapping")
        if "stage" in zo and zo["stage"] != self.stage:
            raise ValueError(f"ds_config.zero_optimization.stage={zo['stage']!r}: strategy zero{self.stage} "
                             f"runs stage {self.stage}; remove the key or pick strategy zero{zo['stage']}")
        if zo.get("offload_optimizer") or zo.get("offload_param"):
            raise ValueError("ds_config.zero_optimization.offload_*: offloading is not supported by polytrain's "
                             "zero strategies; remove it")
        return self


def _merge(ours: dict, theirs: dict) -> dict:
    out = dict(ours)
    for k, v in theirs.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# -- byte accounting ----------------------------------------------------------------------------

_current_comm = None  # the Comm charged for DeepSpeed's collectives in this process


def _charge(sent: int, received: int, call, *, async_op: bool, op: str, ranks: tuple[int, ...] | None):
    """One DeepSpeed collective through Comm's one accounted path (bytes, time, the
    simulated network's floor over the call's ``ranks``)."""
    comm = _current_comm
    if comm is None:
        return call()
    return comm.charge(lambda _async: call(), sent, received, async_op=async_op, op=op, ranks=ranks)


def _install_counting(cdb) -> None:
    """Wrap the collective methods of DeepSpeed's backend object (once)."""
    if getattr(cdb, "_polytrain_counting", False):
        return
    w = cdb.get_world_size()

    def wrap(name, sizes, op):
        """``sizes`` mirrors TorchBackend's signature for ``name`` (its decorators hide it);
        ``op`` is the network model's name for the call."""
        orig = getattr(cdb, name)
        sig = inspect.signature(sizes)

        @functools.wraps(orig)
        def counted(*args, **kwargs):
            a = sig.bind(*args, **kwargs)
            a.apply_defaults()
            g = a.arguments.get("group")
            ws = w if g is None else cdb.get_world_size(g)
            ranks = None if g is None else tuple(torch.distributed.get_process_group_ranks(g))
            sent, received = sizes(**{**a.arguments, "group": ws})
            return _charge(sent, received, lambda: orig(*args, **kwargs), async_op=bool(a.arguments.get("async_op")),
                           op=op, ranks=ranks)

        setattr(cdb, name, counted)

    # group: the world size of the call's group (substituted by ``counted``)
    def all_reduce(tensor, op=None, group=None, async_op=False):
        n = ring_allreduce_bytes(nbytes(tensor), group)
        return n, n

    def all_reduce_coalesced(tensors, op=None, group=None, async_op=False):
        n = sum(ring_allreduce_bytes(nbytes(t), group) for t in tensors)
        return n, n

    def reduce(tensor, dst, op=None, group=None, async_op=False):
        """A ring reduce-scatter, then the shards gathered to ``dst``."""
        n = reduce_scatter_bytes(nbytes(tensor), group)
        shard = nbytes(tensor) // group if group > 1 else 0
        is_dst = cdb.get_rank() == dst
        return n + (0 if is_dst else shard), n + ((group - 1) * shard if is_dst else 0)

    def reduce_scatter(output, input_list, op=None, group=None, async_op=False):
        n = reduce_scatter_bytes(sum(nbytes(t) for t in input_list), group)
        return n, n

    def reduce_scatter_tensor(output_tensor, input_tensor, op=None, group=None, async_op=False):
        n = reduce_scatter_bytes(nbytes(input_tensor), group)
        return n, n

    def all_gather(tensor_list, tensor, group=None, async_op=False):
        n = all_gather_bytes(nbytes(tensor), group)
        return n, n

    def all_gather_into_tensor(output_tensor, input_tensor, group=None, async_op=False):
        n = all_gather_bytes(nbytes(input_tensor), group)
        return n, n

    def all_gather_coalesced(output_tensors, input_tensors, group=None, async_op=False):
        n = sum(all_gather_bytes(nbytes(t), group) for t in input_tensors)
        return n, n

    def broadcast(tensor, src, group=None, async_op=False):
        return broadcast_bytes(nbytes(tensor), group, is_root=cdb.get_rank() == src)

    # a reduce is a reduce-scatter then a gather: an all-reduce's rounds
    for sizes, op in ((all_reduce, "all_reduce"), (all_reduce_coalesced, "all_reduce"), (reduce, "all_reduce"),
                      (reduce_scatter, "reduce_scatter"), (reduce_scatter_tensor, "reduce_scatter"),
                      (all_gather, "all_gather"), (all_gather_into_tensor, "all_gather"),
                      (all_gather_coalesced, "all_gather"), (broadcast, "broadcast")):
        if hasattr(cdb, sizes.__name__):
            wrap(sizes.__name__, sizes, op)
    if hasattr(cdb, "all_gather_base"):
        wrap("all_gather_base", all_gather_into_tensor, "all_gather")
    cdb._polytrain_counting = True


# -- the strategy -------------------------------------------------------------------------------


class _Zero(Strategy):
    stage: ClassVar[int] = 0
    checkpoint_format: ClassVar[str] = "deepspeed"  # DeepSpeed's own files: loadable by zero* only

    @classmethod
    def check_job(cls, *, workers: int, workload: Workload, **kw) -> None:
        super().check_job(workers=workers, workload=workload, **kw)
        if importlib.util.find_spec("deepspeed") is None:
            raise ValueError(f"strategy={cls.name!r} needs DeepSpeed, which is not installed: pip install deepspeed")

    def setup(self, workload: Workload, ctx: StrategyContext) -> None:
        global _current_comm
        if ctx.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # DeepSpeed insists on LOCAL_RANK (its launchers set it); it only picks the device
        os.environ.setdefault("LOCAL_RANK", str(ctx.device.index or 0))
        import deepspeed
        import deepspeed.comm as ds_comm

        self.workload, self.ctx = workload, ctx
        module = workload.model().to(ctx.device)
        if has_batchnorm(module):  # statistics over the global batch, like ddp's default
            convert_sync_batchnorm(module, ctx.comm)
        opt, sched = build_optimizer(module, ctx.optim, ctx.total_steps)
        if not ds_comm.is_initialized():  # reuses the caller's torch process group
            # DeepSpeed's backend JIT-builds a shared-memory all-reduce for CPU *inference*
            # (ninja + gcc, a minute or more per fresh machine); training never calls it.
            ops, shm = deepspeed.ops.__compatible_ops__, "deepspeed_shm_comm"
            had, was = shm in ops, ops.get(shm)
            ops[shm] = False
            try:
                ds_comm.init_distributed(dist_backend="nccl" if ctx.device.type == "cuda" else "gloo",
                                         dist_init_required=False, verbose=False)
            finally:
                if had:
                    ops[shm] = was
                else:
                    ops.pop(shm, None)
        _install_counting(ds_comm.comm.cdb)
        _current_comm = ctx.comm
        self.engine, self.opt, _, self.sched = deepspeed.initialize(
            model=module, optimizer=opt, lr_scheduler=sched, config=self.ds_config(ctx),
            dist_init_required=False,
        )
        self.module = self.engine.module
        self._shape: tuple[int, int] | None = None  # (samples per micro-batch, micro-batches per step)
        self._held: dict[str, int] | None = None
        self._steps = 0

    def ds_config(self, ctx: StrategyContext) -> dict:
        o = self.options
        ours = {
            "train_micro_batch_size_per_gpu": 1,  # placeholders, set from the first step's micro-batches
            "gradient_accumulation_steps": 1,
            "gradient_clipping": float(ctx.optim.grad_clip),
            "zero_optimization": {
                "stage": self.stage,
                "overlap_comm": o.overlap_comm,
                "contiguous_gradients": True,
                "reduce_bucket_size": int(o.reduce_bucket_mb * 2**20 / 4),
                # stage 3: partition every parameter (DeepSpeed's default keeps those under 1e5
                # elements whole on every rank, i.e. nearly all of a small model)
                **({"stage3_param_persistence_threshold": 0} if self.stage == 3 else {}),
            },
            "zero_allow_untested_optimizer": True,  # torch AdamW, ours
            "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 2**62,
            "wall_clock_breakdown": False,
        }
        return _merge(ours, o.ds_config)

    def _set_shape(self, micro_batches: list[Batch]) -> None:
        shape = (micro_batches[0][0].shape[0], len(micro_batches))
        if shape != self._shape:
            mb, n = shape
            self.engine.set_train_micro_batch_size(mb)
            self.engine.set_train_batch_size(mb * n * self.ctx.world)
            self._shape = shape

    def train_step(self, micro_batches: list[Batch]) -> StepStats:
        global _current_comm
        _current_comm = self.ctx.comm
        self._set_shape(micro_batches)
        engine, n = self.engine, len(micro_batches)
        total, extra, samples = 0.0, {}, 0
        size = sum(mb[0].shape[0] for mb in micro_batches)
        for i, mb in enumerate(micro_batches):
            mb = tuple(t.to(self.ctx.device, non_blocking=True) for t in mb)
            engine.set_gradient_accumulation_boundary(i == n - 1)
            out = engine(mb[0])
            loss = self.workload.loss(out, mb)
            k = mb[0].shape[0]
            # DeepSpeed scales by 1/n (gradient_accumulation_steps): weigh each micro-batch by
            # its samples, as every other strategy does (they may differ in size)
            engine.backward(loss * (k * n / size))
            total += loss.item() * k
            samples += k
            for name, v in self.workload.step_metrics(out.detach(), mb).items():
                extra[name] = extra.get(name, 0.0) + v * k
            if i == n - 1:
                if self._held is None and self._steps == 1:  # second step: grads and optimizer state exist
                    self._held = self._measure()
                extra = {k: v / samples for k, v in extra.items()}
                extra["lr"] = self.opt.param_groups[0]["lr"]
            engine.step()
        self._steps += 1
        norm = engine.get_global_grad_norm()
        extra["grad_norm"] = float(norm) if norm is not None else float("nan")
        return StepStats(loss=total / samples, samples=samples, extra=extra)

    def evaluate(self, micro_batches: list[Batch]) -> StepStats:
        global _current_comm
        _current_comm = self.ctx.comm
        with eval_mode(self.engine):  # the engine's forward: ZeRO-3 gathers each block's parameters
            loss, extra = eval_micro_batches(self.engine, self.workload, micro_batches, device=self.ctx.device)
        return StepStats(loss=loss, samples=sum(mb[0].shape[0] for mb in micro_batches), extra=extra)

    # -- memory ---------------------------------------------------------------------------------
    def _measure(self) -> dict[str, int]:
        """Bytes of the tensors DeepSpeed's optimizer and the module hold right now."""
        opt = self.opt
        seen: set[int] = set()

        def size(ts) -> int:
            total = 0
            for t in ts:
                if t is None or not isinstance(t, torch.Tensor):
                    continue
                key = t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size()
                if key in seen:
                    continue
                seen.add(key)
                total += nbytes(t)
            return total

        params = list(self.module.parameters())
        if self.stage == 3:
            # the partition, plus any parameter materialised whole right now (persistent ones)
            param_bytes = size(p.ds_tensor for p in params) + size(p.data for p in params if p.data.numel())
            master = list(opt.fp32_partitioned_groups_flat)
        else:
            param_bytes = size(params)
            master = list(opt.single_partition_of_fp32_groups)
        grads = [p.grad for p in params] + [m.grad for m in master]
        for g in getattr(opt, "averaged_gradients", {}).values():
            grads.extend(g if isinstance(g, (list, tuple)) else [g])
        grads.append(getattr(opt, "grads_in_partition", None))
        return {
            "param_bytes": param_bytes,
            "grad_bytes": size(grads),
            "optim_bytes": size(v for s in opt.optimizer.state.values() for v in s.values()),
            # DeepSpeed's fp32 master copy of this rank's parameter partition (a copy even in fp32 training)
            "master_bytes": size(master),
        }

    def memory_bytes(self) -> dict[str, int]:
        return self._held or self._measure()

    # -- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self, url: str) -> None:
        if is_local(url):
            self.engine.save_checkpoint(_local(url), tag=_TAG)
            return
        import fsspec

        with tempfile.TemporaryDirectory() as tmp:
            self.engine.save_checkpoint(tmp, tag=_TAG)
            fs, path = fsspec.core.url_to_fs(url)
            # each rank uploads the files it wrote (DeepSpeed names them by rank)
            fs.put(os.path.join(tmp, _TAG), f"{path.rstrip('/')}/", recursive=True)
            if self.ctx.rank == 0 and os.path.exists(os.path.join(tmp, "latest")):
                fs.put(os.path.join(tmp, "latest"), f"{path.rstrip('/')}/latest")
        self._barrier()

    def load_checkpoint(self, url: str) -> None:
        if is_local(url):
            path, _ = self.engine.load_checkpoint(_local(url), tag=_TAG)
        else:
            import fsspec

            with tempfile.TemporaryDirectory() as tmp:
                fs, remote = fsspec.core.url_to_fs(url)
                fs.get(f"{remote.rstrip('/')}/{_TAG}", os.path.join(tmp, _TAG), recursive=True)
                path, _ = self.engine.load_checkpoint(tmp, tag=_TAG)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint (tag {_TAG!r}) under {url}")

    def _barrier(self) -> None:
        import deepspeed.comm as ds_comm

        ds_comm.barrier()


def _local(url: str) -> str:
    path = url.removeprefix("file://")
    os.makedirs(path, exist_ok=True)
    return path


class Zero1Options(ZeroOptions):
    stage: ClassVar[int] = 1


class Zero2Options(ZeroOptions):
    stage: ClassVar[int] = 2


class Zero3Options(ZeroOptions):
    stage: ClassVar[int] = 3


@register_strategy("zero1")
class Zero1(_Zero):
    """DeepSpeed ZeRO stage 1: optimizer state sharded across ranks."""

    stage = 1
    Options = Zero1Options


@register_strategy("zero2")
class Zero2(_Zero):
    """DeepSpeed ZeRO stage 2: optimizer state and gradients sharded across ranks."""

    stage = 2
    Options = Zero2Options


@register_strategy("zero3")
class Zero3(_Zero):
    """DeepSpeed ZeRO stage 3: optimizer state, gradients and parameters sharded across ranks."""

    stage = 3
    Options = Zero3Options


