"""Lists of tensors as one flat vector: one message per peer instead of one per tensor."""
from __future__ import annotations

import torch
from torch import nn

from cluster import Comm


def float_buffers(module: nn.Module) -> list[torch.Tensor]:
    """Floating-point buffers (batch norm's running statistics)."""
    return [b for b in module.buffers() if b.is_floating_point()]


def flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A fresh contiguous copy of ``tensors`` end to end (they share one dtype)."""
    return torch.cat([t.detach().reshape(-1) for t in tensors]) if tensors else torch.zeros(0)


@torch.no_grad()
def unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    """Copy consecutive slices of ``flat`` into ``tensors`` in place."""
    off = 0
    for t in tensors:
        t.copy_(flat[off:off + t.numel()].view_as(t))
        off += t.numel()


def broadcast_flat(comm: Comm, tensors: list[torch.Tensor], src: int = 0) -> None:
    """Make ``tensors`` equal rank ``src``'s, in one broadcast."""
    if comm.world > 1 and tensors:
        flat = flatten(tensors)
        comm.broadcast(flat, src=src)
        unflatten_into(flat, tensors)


def average_flat(comm: Comm, tensors: list[torch.Tensor]) -> None:
    """Replace ``tensors`` by their mean over ranks, in one all-reduce."""
    if comm.world > 1 and tensors:
        flat = flatten(tensors)
        comm.all_reduce(flat)
        unflatten_into(flat.div_(comm.world), tensors)
