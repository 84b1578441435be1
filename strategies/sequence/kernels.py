"""Attention on one block of queries against one block of keys, returning the
log-sum-exp of each query row so partial results can be merged exactly, and the
matching backward, which takes the *final* output and log-sum-exp (after every
block was merged) and returns this block's share of dQ, dK and dV.

Two implementations of one contract:

- ``flash``: torch's fused CPU flash-attention kernels (what
  ``scaled_dot_product_attention`` runs on CPU); tiled, O(rows) extra memory.
- ``math``: plain matmuls in query chunks (bounded score memory); any device
  and dtype. Used where the fused CPU kernel does not apply (CUDA, older torch).

Both take (batch, heads, rows, head_dim) tensors; ``causal`` means the query and
key rows are the same positions (lower-triangular mask).
"""
from __future__ import annotations

from typing import Protocol

import torch

_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_CPU_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)

# Score elements per chunk of the math kernel (fp32: 64 MiB), bounding its transient memory.
_MATH_CHUNK_SCORES = 1 << 24


class BlockKernel(Protocol):
    name: str

    def forward(self, q, k, v, *, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(out in q's dtype, fp32 log-sum-exp of shape (b, h, rows))."""

    def backward(self, dout, q, k, v, out, lse, *, causal: bool, scale: float) -> tuple[torch.Tensor, ...]:
        """(dq, dk, dv) of this block, given the final ``out`` and ``lse`` of these query rows."""


class FlashCPU:
    name = "flash"

    def forward(self, q, k, v, *, causal, scale):
        out, lse = _FLASH_CPU(q, k, v, 0.0, causal, scale=scale)
        return out, lse.float()

    def backward(self, dout, q, k, v, out, lse, *, causal, scale):
        return _FLASH_CPU_BWD(dout, q, k, v, out, lse, 0.0, causal, scale=scale)


class MathKernel:
    name = "math"

    @staticmethod
    def _chunks(q: torch.Tensor, k: torch.Tensor):
        b, h, n, _ = q.shape
        rows = max(1, _MATH_CHUNK_SCORES // max(1, b * h * k.shape[2]))
        return [(s, min(n, s + rows)) for s in range(0, n, rows)]

    @staticmethod
    def _scores(qc, k, s0: int, causal: bool, scale: float) -> torch.Tensor:
        s = torch.matmul(qc, k.transpose(-1, -2)).float().mul_(scale)
        if causal:  # query row s0 + a sees keys 0..s0 + a
            rows = torch.arange(s0, s0 + qc.shape[2], device=qc.device)
            cols = torch.arange(k.shape[2], device=qc.device)
            s.masked_fill_(cols[None, :] > rows[:, None], float("-inf"))
        return s

    def forward(self, q, k, v, *, causal, scale):
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        for s0, s1 in self._chunks(q, k):
            s = self._scores(q[:, :, s0:s1], k, s0, causal, scale)
            lse[:, :, s0:s1] = torch.logsumexp(s, dim=-1)
            p = s.sub_(lse[:, :, s0:s1, None]).exp_()
            out[:, :, s0:s1] = torch.matmul(p.to(v.dtype), v)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, *, causal, scale):
        dq = torch.empty_like(q)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        for s0, s1 in self._chunks(q, k):
            qc, dc = q[:, :, s0:s1], dout[:, :, s0:s1]
            delta = (dc.float() * out[:, :, s0:s1].float()).sum(-1, keepdim=True)
            p = self._scores(qc, k, s0, causal, scale).sub_(lse[:, :, s0:s1, None]).exp_()
            dv += torch.matmul(p.transpose(-1, -2), dc.float())
            ds = torch.matmul(dc.float(), v.float().transpose(-1, -2)).sub_(delta).mul_(p).mul_(scale)
            dq[:, :, s0:s1] = torch.matmul(ds, k.float()).to(q.dtype)
            dk += torch.matmul(ds.transpose(-1, -2), qc.float())
        return dq, dk.to(k.dtype), dv.to(v.dtype)


KERNELS = {"flash": FlashCPU, "math": MathKernel}


def pick_kernel(name: str, device: torch.device) -> BlockKernel:
    """``auto``: the fused CPU kernel on CPU where this torch has it, else math."""
    if name == "auto":
        name = "flash" if device.type == "cpu" and _FLASH_CPU is not None else "math"
    if name == "flash" and (device.type != "cpu" or _FLASH_CPU is None):
        raise ValueError(f"kernel='flash' needs a CPU device and torch's CPU flash-attention op (device={device})")
    return KERNELS[name]()
