"""topk: send each tensor's k largest-magnitude values, keep the rest as error
feedback (Stich et al. 2018; Lin et al. 2018, "Deep Gradient Compression").

Per tensor of n values, k = ceil(ratio x n), at least 1. This rank adds its
residual to the gradient, picks the k entries of largest magnitude, and keeps
everything else as the next residual. The bucket's (index, value) pairs, int32
and fp32, travel in one all-gather: every rank receives every rank's pairs and
scatter-adds them in rank order, so all replicas apply the same sparse average.
Each rank sends (world - 1) x 8 x sum(k) bytes per bucket.
"""
from __future__ import annotations

import math

import torch
from pydantic import Field, field_validator

from strategies.compression.base import CompressionOptions, Compressed, Compressor, Wire
from strategies.registry import register_strategy


def k_of(numel: int, ratio: float) -> int:
    """Values a tensor of ``numel`` sends: ceil(ratio x numel), at least 1."""
    return min(numel, max(1, math.ceil(ratio * numel)))


class TopKCompressor(Compressor):
    def __init__(self, wire: Wire, names: list[str], *, seed: int, ratio: float, error_feedback: bool = True):
        super().__init__(wire, names, seed=seed)
        self.ratio, self.error_feedback = ratio, error_feedback
        self.err: dict[str, torch.Tensor] = {}

    def reduce(self, grads: list[tuple[str, torch.Tensor]], step: int) -> None:
        indices, values, offset = [], [], 0
        feedback = self.error_feedback and not self.feedback_paused
        for name, g in grads:
            acc = g.reshape(-1)  # a view into the bucket: overwritten with the result below
            if feedback and name in self.err:
                acc.add_(self.err[name].view(-1))
            idx = acc.abs().topk(k_of(acc.numel(), self.ratio), sorted=False).indices
            vals = acc[idx]
            if feedback:
                residual = acc.clone()
                residual[idx] = 0
                self.err[name] = residual.view_as(g)
            indices.append(idx + offset)
            values.append(vals)
            offset += acc.numel()
        # int32 indices and fp32 values as one int32 payload: one collective
        payload = torch.cat([torch.cat(indices).to(torch.int32), torch.cat(values).float().view(torch.int32)])
        gathered = self.wire.all_gather(payload)
        k = payload.numel() // 2
        total = torch.zeros(offset, dtype=torch.float32)
        for row in gathered:  # rank order: the same sums on every rank
            total.index_add_(0, row[:k].long(), row[k:].view(torch.float32))
        total.div_(self.wire.world)
        for (_, g), v in zip(grads, total.split([g.numel() for _, g in grads])):
            g.copy_(v.view_as(g))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**super().tensors(), **{f"err.{n}": t for n, t in self.err.items()}}

    def load_tensors(self, state: dict[str, torch.Tensor]) -> None:
        super().load_tensors(state)
        self.err = {k[4:]: v for k, v in state.items() if k.startswith("err.")}


class TopKOptions(CompressionOptions):
    ratio: float = Field(0.01, description="fraction of each tensor's values sent, in (0, 1]")
    error_feedback: bool = Field(True, description="add the values not sent to the next step's gradient")

    @field_validator("ratio")
    @classmethod
    def _ratio(cls, v: float) -> float:
        if not 0 < v <= 1:
            raise ValueError("must lie in (0, 1] (the fraction of each tensor's values sent)")
        return v


@register_strategy("topk")
class TopK(Compressed):
    """ddp sending each tensor's top-k values by magnitude (k = ratio x size), with error feedback."""

    Options = TopKOptions
    compressor = TopKCompressor
