"""The B/W split of one stage's backward, done by autograd.

During F, a forward hook keeps the output of every module that owns
parameters. B asks autograd for the gradients of the stage input *and* of those
outputs in one pass: autograd then computes only activation gradients (an
``addmm`` backward skips its weight branch when nothing asks for it). W later
asks, module by module, for the parameter gradients from each kept output and
its gradient: that walks only the module's own ops. Nothing is computed twice
except inside a module whose parameters sit behind other ops of the same module.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn


@dataclass
class Pending:
    """What W needs: for each parameter-owning module, its output and that output's gradient."""

    items: list[tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=list)


class SplitBackward:
    """Captures parameter-owner outputs of ``module``'s forward and runs B and W."""

    def __init__(self, module: nn.Module):
        owners: list[tuple[str, nn.Module]] = []
        seen: dict[int, str] = {}
        for name, sub in module.named_modules():
            params = [p for p in sub.parameters(recurse=False) if p.requires_grad]
            for p in params:
                if id(p) in seen:  # W per module would count a shared weight's other uses twice
                    raise ValueError(f"parameter shared by modules {seen[id(p)]!r} and {name!r}: the B/W split "
                                     f"needs every parameter owned by one module; use a schedule with full "
                                     f"backward (gpipe, 1f1b, interleaved-1f1b)")
                seen[id(p)] = name
            if params:
                owners.append((name, sub))
        self.owners = owners
        self._capture: list[tuple[int, torch.Tensor]] | None = None
        self._handles = [sub.register_forward_hook(self._hook(i)) for i, (_, sub) in enumerate(owners)]

    def remove(self) -> None:
        """Take the hooks off the modules."""
        for h in self._handles:
            h.remove()

    def _hook(self, index: int):
        def hook(_module, _args, output):
            if self._capture is None:
                return
            outs = output if isinstance(output, (tuple, list)) else (output,)
            for t in outs:
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    if any(i == index for i, _ in self._capture):
                        raise ValueError(f"module {self.owners[index][0]!r} ran twice in one forward: the B/W "
                                         f"split needs each parameter-owning module called once per forward")
                    self._capture.append((index, t))
        return hook

    @contextmanager
    def capturing(self) -> Iterator[list[tuple[int, torch.Tensor]]]:
        """Collect the owners' outputs of the forward run inside the block."""
        self._capture = captured = []
        try:
            yield captured
        finally:
            self._capture = None

    def backward_input(self, root: torch.Tensor, grad: torch.Tensor | None, x: torch.Tensor | None,
                       captured: list[tuple[int, torch.Tensor]]) -> tuple[torch.Tensor | None, Pending]:
        """B: the gradient w.r.t. the stage input ``x`` (None if x needs none) and
        what W will need. ``root`` is the stage output (with ``grad``) or the loss."""
        wants_x = x is not None and x.requires_grad
        targets = ([x] if wants_x else []) + [t for _, t in captured]
        if not targets:
            return None, Pending()
        grads = torch.autograd.grad([root], targets, None if grad is None else [grad], retain_graph=True,
                                    allow_unused=True)
        dx = grads[0] if wants_x else None
        rest = grads[1:] if wants_x else grads
        return dx, Pending([(i, t, g) for (i, t), g in zip(captured, rest) if g is not None])

    def backward_weight(self, pending: Pending) -> None:
        """W: accumulate every owner's parameter gradients into ``.grad``."""
        for index, out, grad in pending.items:
            # the owner's parameters now: FSDP registers its unsharded ones for the step
            params = [p for p in self.owners[index][1].parameters(recurse=False) if p.requires_grad]
            # retain_graph: a parent module's weights may sit behind a child's ops, which the
            # child's own W walks again; the graph goes when the last reference to it does
            grads = torch.autograd.grad([out], params, [grad], retain_graph=True, allow_unused=True)
            for p, g in zip(params, grads):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad.add_(g)
        pending.items.clear()


def full_backward(root: torch.Tensor, grad: torch.Tensor | None, x: torch.Tensor | None,
                  params: list[nn.Parameter]) -> torch.Tensor | None:
    """BW: input and weight gradients in one pass; weight gradients accumulate in ``.grad``."""
    wants_x = x is not None and x.requires_grad
    targets = ([x] if wants_x else []) + params
    grads = torch.autograd.grad([root], targets, None if grad is None else [grad], allow_unused=True)
    for p, g in zip(params, grads[1:] if wants_x else grads):
        if g is not None:
            p.grad = g if p.grad is None else p.grad.add_(g)
    return grads[0] if wants_x else None
