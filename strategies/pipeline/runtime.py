"""Running one rank's action list for one step.

F keeps (input, output, captured owner outputs) until the backward; B turns
them into the input gradient plus what W needs; W (or a full BW) accumulates
weight gradients. Inputs come from the previous stage (a message, or a local
hand-off when both stages live on this rank, as at the bottom of the V); they
are fetched before an action's clock starts, so the timeline shows compute and
the gaps between actions are the waits.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Callable

import torch
from torch import nn

from strategies.pipeline.actions import Action, Op, Schedule
from strategies.pipeline.backward import SplitBackward, full_backward
from strategies.pipeline.p2p import Key, Mailbox
from workloads import Batch, Workload


class StepRun:
    def __init__(self, *, schedule: Schedule, rank: int, stages: dict[int, nn.Sequential],
                 split: dict[int, SplitBackward], workload: Workload, micro_batches: list[Batch],
                 mailbox: Mailbox, weights_done: Callable[[int], None], scale: float = 1.0):
        self.schedule, self.rank, self.stages, self.split = schedule, rank, stages, split
        self.workload, self.mbs, self.mailbox, self.weights_done = workload, micro_batches, mailbox, weights_done
        self.last = schedule.n_stages - 1
        # each micro-batch's loss counts by its samples (and ``scale``: a sequence shard's share)
        self.scale, self.samples = scale, sum(mb[0].shape[0] for mb in micro_batches)
        self.fwd: dict[tuple[int, int], tuple] = {}
        self.pending: dict[tuple[int, int], object] = {}
        self.local: dict[Key, torch.Tensor] = {}
        self.left = {s: schedule.microbatches for s in stages}  # weight-gradient passes still to run
        self.loss_sum = torch.zeros((), dtype=torch.float64)  # sum over samples of the scaled loss
        self.metrics: dict[str, float] = {}
        self.timeline: list[tuple[str, float, float]] = []

    def run(self) -> None:
        for a in self.schedule.ranks[self.rank]:
            {Op.F: self._forward, Op.B: self._backward_input, Op.W: self._backward_weight,
             Op.BW: self._full_backward}[a.op](a)

    # -- messages ------------------------------------------------------------------------------
    def _take(self, key: Key) -> torch.Tensor:
        return self.local.pop(key) if key in self.local else self.mailbox.get(key)

    def _emit(self, key: Key, tensor: torch.Tensor, stage: int) -> None:
        dest = self.schedule.placement[stage]
        if dest == self.rank:
            self.local[key] = tensor.detach()
        else:
            self.mailbox.send(tensor, dest)

    def _clock(self, a: Action, t0: float) -> None:
        self.timeline.append((str(a), t0, time.time()))

    # -- actions -------------------------------------------------------------------------------
    def _forward(self, a: Action) -> None:
        s, j = a.stage, a.mb
        x = self.mbs[j][0] if s == 0 else self._take(("act", s - 1, j)).detach().requires_grad_()
        t0 = time.time()
        with self.split[s].capturing() if s in self.split else nullcontext([]) as captured:
            out = self.stages[s](x)
        if s == self.last:
            mb = self.mbs[j]
            loss = self.workload.loss(out, mb)
            k = mb[0].shape[0]
            self.loss_sum += loss.detach().double().cpu() * (k * self.scale)
            for name, v in self.workload.step_metrics(out.detach(), mb).items():
                self.metrics[name] = self.metrics.get(name, 0.0) + v * k
            root = loss * (self.scale * k / self.samples)  # gradients: the mean over the samples
        else:
            root = out
        self._clock(a, t0)
        self.fwd[(s, j)] = (x if s > 0 else None, root, captured)
        if s < self.last:
            self._emit(("act", s, j), out, s + 1)

    def _output_grad(self, s: int, j: int) -> torch.Tensor | None:
        return None if s == self.last else self._take(("grad", s, j))

    def _send_input_grad(self, s: int, j: int, x: torch.Tensor | None, dx: torch.Tensor | None) -> None:
        if s > 0:
            self._emit(("grad", s - 1, j), dx if dx is not None else torch.zeros_like(x), s - 1)

    def _backward_input(self, a: Action) -> None:
        s, j = a.stage, a.mb
        x, root, captured = self.fwd.pop((s, j))
        grad = self._output_grad(s, j)
        t0 = time.time()
        dx, self.pending[(s, j)] = self.split[s].backward_input(root, grad, x, captured)
        self._clock(a, t0)
        self._send_input_grad(s, j, x, dx)

    def _backward_weight(self, a: Action) -> None:
        t0 = time.time()
        self.split[a.stage].backward_weight(self.pending.pop((a.stage, a.mb)))
        self._clock(a, t0)
        self._count(a.stage)

    def _full_backward(self, a: Action) -> None:
        s, j = a.stage, a.mb
        x, root, _ = self.fwd.pop((s, j))
        grad = self._output_grad(s, j)
        t0 = time.time()
        # parameters now, not at set-up: FSDP registers its unsharded ones for the step
        dx = full_backward(root, grad, x, [p for p in self.stages[s].parameters() if p.requires_grad])
        self._clock(a, t0)
        self._send_input_grad(s, j, x, dx)
        self._count(s)

    @property
    def loss(self) -> float:
        """This rank's (scaled) loss share of the step: the samples-weighted mean."""
        return float(self.loss_sum) / self.samples

    def _count(self, s: int) -> None:
        self.left[s] -= 1
        if self.left[s] == 0:
            self.weights_done(s)
