"""Batch norm over the global batch under data parallelism.

Each rank sees 1/w of a global batch. Plain BatchNorm would normalise with
per-rank statistics and keep per-rank running stats, so data parallelism would
not compute what one process on the whole batch computes. torch's SyncBatchNorm
fixes that on GPUs only; this one all-reduces (sum, sum of squares, count) in
forward and (sum dy, sum dy*x_hat) in backward through ``cluster.Comm`` on any
device, so its bytes are counted like every other collective's.
"""
from __future__ import annotations

import torch
from torch import nn

from cluster import Comm


class _SyncBN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, comm: Comm):
        dims = [0] + list(range(2, x.dim()))
        c = x.shape[1]
        local = torch.cat([x.sum(dims), (x * x).sum(dims), x.new_tensor([x.numel() / c])])
        total = comm.all_reduce(local)
        n = total[-1]
        mean = total[:c] / n
        var = total[c : 2 * c] / n - mean * mean
        invstd = torch.rsqrt(var + eps)
        if running_mean is not None:
            running_mean.mul_(1 - momentum).add_(momentum * mean)
            running_var.mul_(1 - momentum).add_(momentum * var * n / max(n.item() - 1, 1))
        shape = [1, c] + [1] * (x.dim() - 2)
        x_hat = (x - mean.view(shape)) * invstd.view(shape)
        ctx.save_for_backward(x_hat, weight, invstd, n)
        ctx.comm, ctx.shape = comm, shape
        return x_hat * weight.view(shape) + bias.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x_hat, weight, invstd, n = ctx.saved_tensors
        shape, c = ctx.shape, x_hat.shape[1]
        dims = [0] + list(range(2, dy.dim()))
        grad_bias = dy.sum(dims)
        grad_weight = (dy * x_hat).sum(dims)
        total = ctx.comm.all_reduce(torch.cat([grad_bias, grad_weight]))
        mean_dy, mean_dy_xhat = total[:c] / n, total[c:] / n
        dx = (dy - mean_dy.view(shape) - x_hat * mean_dy_xhat.view(shape)) * (weight * invstd).view(shape)
        # local parameter gradients: DDP averages them across ranks like any other
        return dx, grad_weight, grad_bias, None, None, None, None, None


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Drop-in for BatchNorm{1,2,3}d with statistics over every rank's batch."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, comm: Comm):
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        self.load_state_dict(bn.state_dict())
        self.comm = comm

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.comm.world == 1 or not self.affine or self.momentum is None:
            return super().forward(x)
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
        return _SyncBN.apply(x, self.weight, self.bias, self.running_mean, self.running_var, self.eps,
                             self.momentum, self.comm)


def convert_sync_batchnorm(module: nn.Module, comm: Comm) -> nn.Module:
    """Replace every batch-norm layer in ``module`` (in place) with SyncBatchNorm."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, SyncBatchNorm):
            setattr(module, name, SyncBatchNorm(child, comm).to(next(child.buffers()).device))
        else:
            convert_sync_batchnorm(child, comm)
    return module


def has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def has_sync_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, SyncBatchNorm) for m in module.modules())
