"""demo: Decoupled Momentum Optimization (Peng, Quesnelle, Kingma, 2024).

Gradients are never all-reduced. Each rank, every step:

1. folds its gradient into a local momentum buffer: ``m = decay * m + lr * g``
   (the reference implementation's convention: the buffer holds lr-scaled
   gradients, so a changing LR weights each step's gradient by its own LR);
2. takes the chunked orthonormal DCT of ``m`` (``dct.ChunkedDCT``) and keeps
   the ``topk`` largest-magnitude coefficients of each block (``m`` is held as
   its DCT coefficients: by linearity DCT(decay * m + lr * g) =
   decay * DCT(m) + lr * DCT(g), so a step costs one forward transform);
3. subtracts what it keeps from ``m`` (the buffer is the error feedback: what
   was not sent, including the rounding of values to ``value_dtype``, stays);
4. all-gathers the (index, value) pairs of every rank in one flat byte buffer,
   averages them per index over the ranks that sent that index, inverts the DCT;
5. steps ``x = x * (1 - lr * wd) - lr * sign(Q)``: every element moves by
   exactly ``lr`` or (where Q is 0) not at all.

Every rank applies the same gathered bytes with the same deterministic code, so
parameters stay bit-identical across ranks (on CPU; see ``ChunkedDCT.mean_of``).
Bytes per step per rank: ``(world - 1) * sum(blocks * k * (index bytes + value bytes))``.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cluster import Comm, all_gather_bytes
from strategies.decentralized.dct import ChunkedDCT
from strategies.dcp import load_per_rank, save_per_rank
from strategies.parallel import Parallel, Plan
from strategies.registry import register_strategy

VALUE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


class DeMoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lr: float | None = Field(None, gt=0, description="peak LR of the sign step (each updated element moves by "
                             "exactly lr); default: optim.lr. Warm-up and decay follow optim's schedule")
    weight_decay: float | None = Field(None, ge=0, description="decoupled weight decay on matrices and "
                                       "embeddings; default: optim.weight_decay")
    topk: int = Field(32, ge=1, description="DCT coefficients each rank sends per block (paper: 32)")
    chunk: int = Field(64, ge=1, description="block side: a matrix is cut into chunk x chunk blocks, a vector "
                       "into blocks of chunk (largest divisor of the size at most chunk; paper: 64)")
    decay: float = Field(0.999, description="momentum decay beta, in [0, 1) (paper: 0.999)")
    value_dtype: Literal["bfloat16", "float32"] = Field(
        "bfloat16", description="dtype of the values sent; rounding error stays in the momentum buffer")

    @field_validator("decay")
    @classmethod
    def _decay_range(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError("must lie in [0, 1) (momentum decay beta)")
        return v

    @model_validator(mode="after")
    def _topk_fits(self) -> "DeMoOptions":
        if self.topk > self.chunk:
            raise ValueError(f"topk={self.topk}: must not exceed chunk={self.chunk} "
                             f"(a vector's block holds only chunk coefficients)")
        return self


def _columns(gathered: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Bytes ``start:end`` of every rank's payload as a fresh tensor: viewing bytes as a
    wider type needs an aligned start and row stride, which a slice of a single row
    (one rank, where ``contiguous()`` copies nothing) may lack."""
    return gathered[:, start:end].clone(memory_format=torch.contiguous_format)


def demo_bytes_per_step(shapes: list[tuple[int, ...]], topk: int, chunk: int, value_dtype: torch.dtype | str,
                        world: int) -> int:
    """Bytes a rank sends (and receives) in one DeMo step over ``world`` ranks: the
    all-gather of the packed payload, sum over tensors of blocks x k x (index + value bytes)."""
    value_dtype = VALUE_DTYPES.get(value_dtype, value_dtype)
    payload = sum(ChunkedDCT(tuple(s), chunk, topk).payload_bytes(value_dtype) for s in shapes)
    return all_gather_bytes(payload, world)


class DeMo:
    """DeMo's update of ``params`` on one rank; ``comm`` carries the all-gather.

    ``params`` are any tensors changed in place, not only a module's parameters: a
    composition's outer sync passes this rank's local tensors (whole parameters, or
    its FSDP shards as ``p.to_local()``, which alias the parameter's storage) and
    the ranks of ``comm`` (one per node) must hold tensors of the same shapes (the
    same shard of each parameter: they share an FSDP coordinate). Gradients are read
    from each tensor's ``.grad`` unless ``step``/``compress`` are given ``grads``; a
    shard's is ``p.grad.to_local()`` (backward fills only the DTensor's ``.grad``).
    A shard is transformed in blocks of its own shape, so per-shard DeMo is DeMo of
    the whole parameter when the shard's rows are a multiple of ``chunk`` (FSDP2
    shards dim 0) and differs in block layout otherwise."""

    def __init__(self, params: list[torch.Tensor], comm: Comm, *, topk: int, chunk: int, decay: float,
                 value_dtype: torch.dtype, decays: list[bool]):
        self.params, self.comm, self.decay, self.value_dtype = params, comm, decay, value_dtype
        self.decays = decays  # whether weight decay applies to each parameter
        self.plans = [ChunkedDCT(tuple(p.shape), chunk, topk) for p in params]
        # The momentum is kept as its DCT coefficients (blocks, r * c): the transform is
        # linear and orthonormal, so this is the same buffer, one transform per step cheaper.
        self.momentum = [torch.zeros(plan.blocks, plan.width, dtype=p.dtype, device=p.device)
                         for p, plan in zip(params, self.plans)]
        # Byte layout of the payload: per parameter its indices then its values.
        self.layout: list[tuple[int, int, int]] = []  # (offset, index bytes, value bytes)
        off = 0
        for plan in self.plans:
            n = plan.blocks * plan.k
            ib, vb = n * plan.index_dtype.itemsize, n * value_dtype.itemsize
            self.layout.append((off, ib, vb))
            off += ib + vb
        self.payload_nbytes = off

    @torch.no_grad()
    def compress(self, lr: float, *, finite: bool = True, grads: list[torch.Tensor | None] | None = None
                 ) -> torch.Tensor:
        """Fold this step's gradients (``grads``, default each tensor's ``.grad``) into
        the momentum (not if ``finite`` is false: a NaN/Inf gradient would poison the
        buffer for good), take the top-k of each block, remove what is sent from the
        momentum; returns the payload (uint8)."""
        parts = []
        grads = [p.grad for p in self.params] if grads is None else grads
        for g, m, plan in zip(grads, self.momentum, self.plans, strict=True):
            m.mul_(self.decay)
            if g is not None and finite:
                m.add_(plan.encode(g), alpha=lr)
            idx, val = plan.topk_of(m)
            sent = val.to(self.value_dtype)
            m.scatter_(1, idx, val - sent.to(m.dtype))  # what is left of a sent coefficient: its rounding
            parts += [idx.to(plan.index_dtype).flatten().view(torch.uint8), sent.flatten().view(torch.uint8)]
        return torch.cat(parts)

    def momentum_of(self, i: int) -> torch.Tensor:
        """Parameter ``i``'s momentum buffer in the parameter's own shape."""
        return self.plans[i].decode(self.momentum[i])

    def unpack(self, gathered: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Payloads of every rank (world, bytes) -> per parameter (indices, values),
        each (world, blocks, k), indices as int64, values in the parameters' dtype."""
        world, out = gathered.shape[0], []
        for p, plan, (off, ib, vb) in zip(self.params, self.plans, self.layout):
            shape = (world, plan.blocks, plan.k)
            idx = _columns(gathered, off, off + ib).view(plan.index_dtype).reshape(shape).long()
            val = _columns(gathered, off + ib, off + ib + vb).view(self.value_dtype).reshape(shape)
            out.append((idx, val.to(p.dtype)))
        return out

    @torch.no_grad()
    def apply(self, gathered: torch.Tensor, lr: float, weight_decay: float) -> None:
        """The sign step from every rank's payload (world, bytes)."""
        for p, plan, decays, (idx, val) in zip(self.params, self.plans, self.decays, self.unpack(gathered)):
            q = plan.decode(plan.mean_of(idx, val))
            if decays and weight_decay:
                p.mul_(1.0 - lr * weight_decay)
            p.add_(q.sign_(), alpha=-lr)

    def step(self, lr: float, weight_decay: float, *, finite: bool = True,
             grads: list[torch.Tensor | None] | None = None) -> None:
        payload = self.compress(lr, finite=finite, grads=grads)
        self.apply(self.comm.all_gather(payload), lr, weight_decay)


@register_strategy("demo")
class DeMoStrategy(Parallel):
    """DeMo: sign-SGD on the average of every rank's top-k DCT coefficients of its local momentum; no all-reduce."""

    Options = DeMoOptions
    checkpoint_format = "dcp-demo"  # momentum is per rank: loadable by demo only

    @classmethod
    def plan(cls, options: DeMoOptions, workers: int) -> Plan:
        """Every rank its own participant: the outer sync over dp = workers, nothing inside."""
        return Plan.of(workers, dp=workers, outer="demo", outer_options=options.model_dump())

    def _state(self) -> tuple[dict, dict]:
        names = [n for n, p in self.module.named_parameters() if p.requires_grad]
        shared = {"model": self.module.state_dict(), "steps_done": self.sched.last_epoch}
        return shared, {"momentum": dict(zip(names, self.outer.demo.momentum))}

    def save_checkpoint(self, url: str) -> None:
        shared, own = self._state()
        save_per_rank(url, rank=self.ctx.rank, shared=shared, own=own)

    def load_checkpoint(self, url: str) -> None:
        """Parameters are the same on every saved rank; momentum buffers (each rank's
        unsent residual) come from saved rank ``rank % saved_world``."""
        shared, own = self._state()
        shared, _, _ = load_per_rank(url, rank=self.ctx.rank, shared=shared, own=own)
        self.sched.last_epoch = int(shared["steps_done"])  # the LR schedule is a function of the step
