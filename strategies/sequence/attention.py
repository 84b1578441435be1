"""Distributed exact attention over a sequence split between ranks: Ulysses,
ring, and their hybrid (USP), forward and backward, every byte through ``Comm``.

- **Ulysses** (DeepSpeed-Ulysses): an all-to-all trades the sequence split for a
  head split, so each of u ranks attends over the whole (Ulysses-group) sequence
  for h/u heads; a second all-to-all trades back. Q, K and V go in one call.
- **Ring**: K/V blocks rotate between r ranks; each rank merges the partial
  results for its queries with the log-sum-exp (online-softmax) rule. Causal
  blocks that are fully masked are skipped (``layout.block_plan``); the next
  rotation is in flight while the current block computes. Backward rotates K/V
  again, with the dK/dV accumulators travelling one step behind, and saves only
  this rank's Q, K, V, output and log-sum-exp (never the other ranks' blocks).
- **USP** (Fang & Zhao): Ulysses inside, ring across: u x r ranks.

``SequenceParallelAttention`` is the (q, k, v) -> out function a workload's
attention layers take; tensors are (batch, heads, local_tokens, head_dim), the
local tokens being ``SequenceLayout.positions(rank)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from cluster import Comm, all_to_all_bytes, nbytes
from strategies.sequence.kernels import BlockKernel
from strategies.sequence.layout import Block, SequenceLayout


@dataclass
class Traffic:
    """Bytes this rank sent for sequence-parallel attention (received is equal:
    every pattern here is symmetric), split by pass. The strategy reports them
    per layer; tests check them against Comm's own counters and the formulas."""

    forward: int = 0
    backward: int = 0
    layers: int = 0  # attention calls (forward passes of one layer)

    def take(self) -> "Traffic":
        out = Traffic(self.forward, self.backward, self.layers)
        self.forward = self.backward = self.layers = 0
        return out


# -- Ulysses -----------------------------------------------------------------------------------


class _AllToAll(torch.autograd.Function):
    """Chunk j of dim 0 goes to rank j; chunk j of the result came from rank j.
    Its own adjoint: the backward is the same exchange of the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Comm, traffic: Traffic) -> torch.Tensor:
        ctx.comm, ctx.traffic = comm, traffic
        x = x.contiguous()
        out = torch.empty_like(x)
        comm.all_to_all_single(out, x)
        traffic.forward += all_to_all_bytes(nbytes(x), comm.world)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        ctx.comm.all_to_all_single(out, grad)
        ctx.traffic.backward += all_to_all_bytes(nbytes(grad), ctx.comm.world)
        return out, None, None


def ulysses_gather(x: torch.Tensor, comm: Comm, pieces: int, traffic: Traffic) -> torch.Tensor:
    """(..., h, n, d) sequence-split -> (..., h/u, u*n, d) head-split. This rank's
    n tokens are ``pieces`` equal runs (one per ring-block segment); the result
    holds, per segment, the u ranks' runs in rank order: the block in order."""
    u = comm.world
    h, n = x.shape[-3], x.shape[-2]
    x = x.unflatten(-3, (u, h // u)).movedim(-4, 0)  # (u, ..., h/u, n, d): chunk j -> rank j
    y = _AllToAll.apply(x, comm, traffic)  # (u: source rank, ..., h/u, n, d)
    y = y.unflatten(-2, (pieces, n // pieces)).movedim(0, -3)  # (..., h/u, pieces, u, run, d)
    return y.flatten(-4, -2)


def ulysses_scatter(y: torch.Tensor, comm: Comm, pieces: int, traffic: Traffic) -> torch.Tensor:
    """The inverse of ``ulysses_gather`` for an attention output: (b, h/u, u*n, d) ->
    (b, h, n, d), laid out in memory as (b, n, h, d) so the caller's usual
    ``transpose(1, 2).reshape(b, n, h*d)`` is a view, not one more saved copy."""
    u = comm.world
    b, hu, big, d = y.shape
    y = y.unflatten(2, (pieces, u, big // (pieces * u))).movedim(3, 0)  # (u, b, h/u, pieces, run, d)
    x = _AllToAll.apply(y, comm, traffic)  # (u: head group, b, h/u, pieces, run, d)
    x = x.permute(1, 3, 4, 0, 2, 5).reshape(b, big // u, u * hu, d)  # (b, tokens, heads, d)
    return x.transpose(1, 2)


# -- ring --------------------------------------------------------------------------------------


@dataclass
class RingConfig:
    comm: Comm  # the ring group; rank i holds ring block i
    plan: list[list[Block]]  # blocks to compute at step t (K/V of block (i - t) mod r)
    kernel: BlockKernel
    traffic: Traffic = field(default_factory=Traffic)


def _rotate(comm: Comm, send: torch.Tensor, recv: torch.Tensor) -> list:
    """Post: ``send`` to the next ring rank, the previous one's block into ``recv``.
    Returns the Works to wait on before using ``recv`` or reusing ``send``; the
    transfer overlaps whatever runs in between (the current block's attention)."""
    r = comm.world
    nxt, prv = (comm.rank + 1) % r, (comm.rank - 1) % r
    if hasattr(comm, "isend"):
        return [comm.isend(send, nxt), comm.irecv(recv, prv)]
    comm.exchange([(send, nxt)], [(recv, prv)])  # a Comm without posted point-to-point: blocking
    return []


def _wait(works: list) -> None:
    for w in works:
        w.wait()


def _merge(out: torch.Tensor, lse: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor) -> None:
    """In place: fold a block's (output, log-sum-exp) into the running ones."""
    m = torch.maximum(lse, lse_b)  # finite: every block row has at least one key
    wa, wb = torch.exp(lse - m), torch.exp(lse_b - m)
    total = wa + wb
    out.mul_((wa / total).unsqueeze(-1)).add_(o_b * (wb / total).unsqueeze(-1))
    lse.copy_(m + torch.log(total))


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cfg: RingConfig, scale: float):
        comm, r = cfg.comm, cfg.comm.world
        kv = torch.stack([k, v])
        # (b, n, h, d) in memory: the caller's transpose(1, 2).reshape(b, n, h*d) is then a
        # view, so the output projection saves this tensor rather than a copy (as with SDPA)
        b, h, n, d = q.shape
        out = torch.zeros((b, n, h, d), dtype=torch.float32, device=q.device).transpose(1, 2)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
        for t in range(r):
            if t < r - 1:  # next block in flight while this one computes
                nxt = torch.empty_like(kv)
                works = _rotate(comm, kv, nxt)
                cfg.traffic.forward += nbytes(kv)
            for blk in cfg.plan[t]:
                rows, keys = slice(blk.q0, blk.q1), slice(blk.k0, blk.k1)
                o_b, lse_b = cfg.kernel.forward(q[:, :, rows], kv[0, :, :, keys], kv[1, :, :, keys],
                                                causal=blk.causal, scale=scale)
                _merge(out[:, :, rows], lse[:, :, rows], o_b.float(), lse_b)
            if t < r - 1:
                _wait(works)
                kv = nxt
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.cfg, ctx.scale = cfg, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        cfg, scale = ctx.cfg, ctx.scale
        comm, r = cfg.comm, cfg.comm.world
        dout = dout.contiguous()
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])
        acc = incoming = None  # dK/dV of the block held, accumulated over the ranks it visited
        acc_works: list = []
        for t in range(r):
            if t < r - 1:
                nxt = torch.empty_like(kv)
                kv_works = _rotate(comm, kv, nxt)
                cfg.traffic.backward += nbytes(kv)
            part = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
            for blk in cfg.plan[t]:
                rows, keys = slice(blk.q0, blk.q1), slice(blk.k0, blk.k1)
                dq_b, dk_b, dv_b = cfg.kernel.backward(
                    dout[:, :, rows], q[:, :, rows], kv[0, :, :, keys], kv[1, :, :, keys],
                    out[:, :, rows], lse[:, :, rows], causal=blk.causal, scale=scale)
                dq[:, :, rows] += dq_b
                part[0, :, :, keys] += dk_b
                part[1, :, :, keys] += dv_b
            if t > 0:  # the accumulator of this block, from the ranks it visited before
                _wait(acc_works)
                part += incoming
            acc = part
            if r > 1:  # pass it on; after r hops it is back with its block's owner
                incoming = torch.empty_like(acc)
                acc_works = _rotate(comm, acc, incoming)
                cfg.traffic.backward += nbytes(acc)
            if t < r - 1:
                _wait(kv_works)
                kv = nxt
        if r > 1:
            _wait(acc_works)
            acc = incoming
        return dq.to(q.dtype), acc[0].to(k.dtype), acc[1].to(v.dtype), None, None


def ring_attention(q, k, v, cfg: RingConfig, *, scale: float | None = None) -> torch.Tensor:
    """Exact attention of this rank's queries over the keys of every ring rank."""
    return _RingAttention.apply(q, k, v, cfg, scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))


# -- the hybrid, as a workload's attention function ---------------------------------------------


class SequenceParallelAttention:
    """USP attention for group rank ``rank`` of ``layout``: Ulysses over
    ``ulysses`` (u ranks), ring over ``ring`` (r ranks). Either may be size 1."""

    def __init__(self, layout: SequenceLayout, rank: int, *, ulysses: Comm, ring: Comm, causal: bool,
                 kernel: BlockKernel, traffic: Traffic | None = None):
        if (ulysses.world, ring.world) != (layout.ulysses, layout.ring):
            raise ValueError(f"groups of {ulysses.world} x {ring.world} ranks for a layout of "
                             f"ulysses({layout.ulysses}) x ring({layout.ring})")
        self.layout, self.ulysses, self.causal = layout, ulysses, causal
        self.traffic = traffic if traffic is not None else Traffic()
        i = rank // layout.ulysses
        self.ring = RingConfig(ring, layout.ring_plan(i, causal=causal), kernel, self.traffic)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.traffic.layers += 1
        if self.layout.ulysses > 1:
            heads = q.shape[1]
            if heads % self.layout.ulysses:
                raise ValueError(f"heads={heads}: must be divisible by ulysses={self.layout.ulysses}")
            q, k, v = ulysses_gather(torch.stack([q, k, v]), self.ulysses, self.layout.pieces, self.traffic).unbind(0)
        out = ring_attention(q, k, v, self.ring)
        if self.layout.ulysses > 1:
            out = ulysses_scatter(out, self.ulysses, self.layout.pieces, self.traffic)
        return out
