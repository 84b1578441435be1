"""terngrad: stochastic ternary gradients, 2 bits per value on the wire
(Wen et al. 2017, "TernGrad").

Per tensor, each rank optionally clips its gradient to ``clip_sigma`` standard
deviations (the paper's layer-wise clipping), then the ranks agree on one scale
s = the largest |g| over all ranks (an all-reduce with MAX of one float per
tensor: the paper's scalar sharing). Each value becomes s * sign(g) * b with
b ~ Bernoulli(|g| / s): in {-s, 0, s} and unbiased, E = g (of the clipped g).
The codes {0, 1, 2} for {-1, 0, +1} are packed four to a byte and all-gathered;
every rank decodes every rank's codes and averages, in rank order, so all
replicas apply the same gradient.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from pydantic import Field

from strategies.compression.base import CompressionOptions, Compressed, Compressor, Wire
from strategies.registry import register_strategy

_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)


def pack2(codes: torch.Tensor) -> torch.Tensor:
    """Values in {0, 1, 2, 3} (uint8, 1-D) -> ceil(n / 4) bytes, four values a byte."""
    n = codes.numel()
    padded = torch.zeros(-(-n // 4) * 4, dtype=torch.uint8)
    padded[:n] = codes
    return (padded.view(-1, 4) << _SHIFTS).sum(dim=1, dtype=torch.uint8)


def unpack2(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of ``pack2``: the first ``n`` 2-bit values."""
    return ((packed.unsqueeze(-1) >> _SHIFTS) & 3).reshape(*packed.shape[:-1], -1)[..., :n]


def ternarize(g: torch.Tensor, scale: float, gen: torch.Generator) -> torch.Tensor:
    """sign(g) * Bernoulli(|g| / scale) in {-1, 0, 1} (int8); all zero when scale is 0."""
    if scale <= 0:
        return torch.zeros_like(g, dtype=torch.int8)
    keep = torch.rand(g.shape, generator=gen) < (g.abs() / scale)
    return (torch.sign(g) * keep).to(torch.int8)


def clip(g: torch.Tensor, sigmas: float) -> torch.Tensor:
    """g clipped to ``sigmas`` standard deviations (0: unchanged)."""
    if sigmas <= 0 or g.numel() < 2:
        return g
    c = sigmas * g.std().item()
    return g.clamp(-c, c)


class TernGradCompressor(Compressor):
    def __init__(self, wire: Wire, names: list[str], *, seed: int, clip_sigma: float):
        super().__init__(wire, names, seed=seed)
        self.clip_sigma = clip_sigma

    def reduce(self, grads: list[tuple[str, torch.Tensor]], step: int) -> None:
        clipped = [clip(g.reshape(-1), self.clip_sigma) for _, g in grads]
        scales = torch.stack([c.abs().max() for c in clipped])
        self.wire.all_reduce(scales, op=dist.ReduceOp.MAX)
        codes = torch.cat([ternarize(c, s, self.generator(name, step, rank=self.wire.rank))  # independent per rank
                           for (name, _), c, s in zip(grads, clipped, scales.tolist())])
        gathered = self.wire.all_gather(pack2((codes + 1).to(torch.uint8)))
        total = unpack2(gathered, codes.numel()).to(torch.int16).sub_(1).sum(dim=0)  # |sum| <= world
        for (_, g), t, s in zip(grads, total.split([g.numel() for _, g in grads]), scales):
            g.copy_(t.view_as(g).to(g.dtype) * (s / self.wire.world))


class TernGradOptions(CompressionOptions):
    clip_sigma: float = Field(
        2.5, ge=0, description="clip each tensor to this many standard deviations before ternarizing (0: off)")


@register_strategy("terngrad")
class TernGrad(Compressed):
    """ddp with stochastic ternary gradients {-s, 0, s}, scale shared across ranks, 2 bits a value."""

    Options = TernGradOptions
    compressor = TernGradCompressor
