"""single: one process, the reference every strategy is checked against.

``Replicated`` is the step shared by every strategy that keeps a whole model
on each rank (single, ddp, and the compression strategies built on ddp): they
differ only in how gradients are combined during backward.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, ContextManager

from strategies.base import StepStats, Strategy, StrategyContext, run_micro_batches
from strategies.optim import build_optimizer, clip_and_step
from strategies.registry import register_strategy
from workloads import Batch, Workload


class Replicated(Strategy):
    def setup(self, workload: Workload, ctx: StrategyContext) -> None:
        self.workload, self.ctx = workload, ctx
        self.module = workload.model().to(ctx.device)
        self.model = self.wrap(self.module)
        self.opt, self.sched = build_optimizer(self.module, ctx.optim, ctx.total_steps)

    def wrap(self, module):
        """The model the step calls (a DDP wrapper, say); default: the module itself."""
        return module

    def no_sync(self) -> ContextManager:
        """Entered around every backward but a step's last (accumulation)."""
        return nullcontext()

    def after_backward(self, t_backward: float) -> None:
        """Called once gradients are final on this rank."""

    def train_step(self, micro_batches: list[Batch]) -> StepStats:
        loss, extra, t_backward = run_micro_batches(
            self.model, self.workload, micro_batches, device=self.ctx.device, no_sync=self.no_sync
        )
        self.after_backward(t_backward)
        extra["lr"] = self.opt.param_groups[0]["lr"]
        extra["grad_norm"] = clip_and_step(self.module, self.opt, self.sched, self.ctx.optim)
        return StepStats(loss=loss, samples=sum(mb[0].shape[0] for mb in micro_batches), extra=extra)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.module.state_dict(), "optim": self.opt.state_dict(), "sched": self.sched.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optim"])
        self.sched.load_state_dict(state["sched"])


@register_strategy("single")
class Single(Replicated):
    """One process, no communication: the reference for every other strategy."""

    @classmethod
    def check_job(cls, *, workers: int, workload: Workload) -> None:
        super().check_job(workers=workers, workload=workload)
        if workers != 1:
            raise ValueError(f"workers={workers}: strategy 'single' runs exactly 1 worker")
