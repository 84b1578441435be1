"""The one end of a step: gradient norm, clipping, optimizer step, LR schedule.

Every strategy whose optimizer is polytrain's AdamW ends its step here (zero*
hands the same work to DeepSpeed, demo replaces the optimizer with its sign
step and uses only ``grad_norm``). A rank may hold only part of the model (a
pipeline stage, an FSDP shard, or both): ``norm_comm`` is the group whose
ranks together hold one whole model, over which the squared local norms are
summed, so every rank clips with the same global norm and skips the same
non-finite step.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from cluster import Comm
from strategies.base import OptimConfig
from strategies.dcp import held_bytes


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # DTensor (FSDP2): this rank's shard


def grad_norm(params: list[torch.Tensor], norm_comm: Comm | None = None) -> torch.Tensor:
    """The L2 norm (a 0-d float32 tensor) of the gradients of the whole model, of
    which ``params`` are this rank's part (shards of DTensors count locally),
    summed over ``norm_comm``."""
    grads = [_local(p.grad).detach() for p in params if p.grad is not None]
    if not grads:
        norm = torch.zeros(())
    else:
        norm = torch.nn.utils.get_total_norm(grads).float()
    if norm_comm is not None and norm_comm.world > 1:
        sq = norm.square()
        norm = norm_comm.all_reduce(sq).sqrt()
    return norm


def clip_and_step(model: nn.Module, opt: torch.optim.Optimizer, sched, cfg: OptimConfig, *,
                  norm_comm: Comm | None = None) -> float:
    """Clip ``model``'s gradients to ``cfg.grad_clip`` by the global norm, step
    unless that norm is not finite (a NaN/Inf loss skips the update, as AMP's
    scaler does; every rank skips the same step), advance the schedule (LR stays
    a function of the step number). Returns the norm."""
    norm, finite = clip(model, cfg, norm_comm=norm_comm)
    if finite:
        opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return norm


def clip(model: nn.Module, cfg: OptimConfig, *, norm_comm: Comm | None = None) -> tuple[float, bool]:
    """Clip ``model``'s gradients to ``cfg.grad_clip`` by the global norm (every
    update rule does, the sign step's included: DeMo's paper clips at 1.0 before
    it). Returns (the norm before clipping, whether it is finite)."""
    params = [p for p in model.parameters() if p.requires_grad]
    norm = grad_norm(params, norm_comm)
    finite = math.isfinite(float(norm))
    if finite and cfg.grad_clip > 0:
        torch.nn.utils.clip_grads_with_norm_(params, cfg.grad_clip, norm)
    return float(norm), finite


class StepEnd:
    """Ends each step of one rank's optimizer: measures the bytes held once
    gradients and optimizer state both exist (the second step), then
    ``clip_and_step``."""

    def __init__(self, module: nn.Module, opt: torch.optim.Optimizer, sched, cfg: OptimConfig, *,
                 norm_comm: Comm | None = None):
        self.module, self.opt, self.sched, self.cfg, self.norm_comm = module, opt, sched, cfg, norm_comm
        self.held: dict[str, int] = {}

    def __call__(self) -> dict[str, float]:
        """Returns the step's ``lr`` and ``grad_norm`` metrics."""
        if not self.held and self.opt.state:
            self.held = held_bytes(self.module, self.opt)
        lr = self.opt.param_groups[0]["lr"]
        return {"lr": lr, "grad_norm": clip_and_step(self.module, self.opt, self.sched, self.cfg,
                                                      norm_comm=self.norm_comm)}
