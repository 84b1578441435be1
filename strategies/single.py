"""single: one process, the reference every strategy is checked against.

``Replicated`` is the step shared by every strategy that keeps a whole model
on each rank (single, ddp, and the compression strategies built on ddp): they
differ only in how gradients are combined during backward.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager

from strategies.checkpoint import held_bytes, load_state, save_state
from strategies.base import StepStats, Strategy, StrategyContext, run_micro_batches
from strategies.optim import build_optimizer, clip_and_step
from strategies.registry import register_strategy
from workloads import Batch, Workload


class Replicated(Strategy):
    uneven_batches = True

    def setup(self, workload: Workload, ctx: StrategyContext) -> None:
        self.workload, self.ctx = workload, ctx
        self.module = workload.model().to(ctx.device)
        self.model = self.wrap(self.module)
        self.opt, self.sched = build_optimizer(self.module, ctx.optim, ctx.total_steps)
        self._held: dict[str, int] | None = None

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
            self.model, self.workload, micro_batches, device=self.ctx.device, no_sync=self.no_sync,
            weight=self.grad_weight,
        )
        self.after_backward(t_backward)
        if self._held is None and self.opt.state:  # second step: gradients and optimizer state both exist
            self._held = held_bytes(self.module, self.opt)
        extra["lr"] = self.opt.param_groups[0]["lr"]
        extra["grad_norm"] = clip_and_step(self.module, self.opt, self.sched, self.ctx.optim)
        return StepStats(loss=loss, samples=sum(mb[0].shape[0] for mb in micro_batches), extra=extra)

    def save_checkpoint(self, url: str) -> None:
        save_state(url, self.module, self.opt, {"sched": self.sched.state_dict()})

    def load_checkpoint(self, url: str) -> None:
        extra = load_state(url, self.module, self.opt, {"sched": self.sched.state_dict()})
        self.sched.load_state_dict(extra["sched"])

    def memory_bytes(self) -> dict[str, int]:
        return self._held or {}  # measured at the second step


@register_strategy("single")
class Single(Replicated):
    """One process, no communication: the reference for every other strategy."""

    @classmethod
    def check_job(cls, *, workers: int, workload: Workload, **kw) -> None:
        super().check_job(workers=workers, workload=workload, **kw)
        if workers != 1:
            raise ValueError(f"workers={workers}: strategy 'single' runs exactly 1 worker")
