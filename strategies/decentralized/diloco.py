"""DiLoCo's outer step (Douillard et al. 2023, "DiLoCo: Distributed
Low-Communication Training of Language Models"; torchft's ``DiLoCo``).

The ranks of ``comm`` (one per node, in a composition) each train their own
copy with the usual inner optimizer; every ``every`` inner steps they meet:

1. outer gradient, per tensor, in fp32: ``delta = global - current``, where
   ``global`` is the tensors as the last outer step left them;
2. ``delta`` averaged over ``comm`` in one flat all-reduce, through ``Comm``
   (so it is counted): the only traffic, 4 bytes a parameter every H steps;
3. SGD on ``global`` with ``delta`` as its gradient, torch.optim.SGD's
   arithmetic with dampening 0: ``buf = momentum * buf + delta``,
   ``update = delta + momentum * buf`` (Nesterov) or ``buf``,
   ``global -= lr * update``;
4. ``current <- global``: every rank of ``comm`` holds the same values again.

The paper's setting: lr 0.7, Nesterov momentum 0.9, H = 500 inner AdamW
steps. With ``every=1, lr=1, momentum=0`` the outer step is plain parameter
averaging after every step. The tensors must start equal on every rank of
``comm`` (the caller broadcasts them at set-up, as every strategy does), and
are changed in place: parameters, or views of them such as this rank's FSDP
shard (``p.to_local()``), any dtype (the copies kept here are fp32).
"""
from __future__ import annotations

import torch

from cluster import Comm, nbytes, ring_allreduce_bytes
from strategies.decentralized.flat import average_flat


class DiLoCo:
    """The outer step over ``tensors`` (changed in place) every ``every`` inner steps."""

    def __init__(self, tensors: list[torch.Tensor], comm: Comm, *, every: int, lr: float = 0.7,
                 momentum: float = 0.9, nesterov: bool = True):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"diloco every={every!r}: must be an integer >= 1 (inner steps per outer step)")
        if not lr > 0:
            raise ValueError(f"diloco lr={lr!r}: must be > 0")
        if not 0 <= momentum < 1:
            raise ValueError(f"diloco momentum={momentum!r}: must lie in [0, 1)")
        self.tensors, self.comm = tensors, comm
        self.every, self.lr, self.momentum, self.nesterov = every, lr, momentum, nesterov
        self.global_params = [torch.empty_like(t, dtype=torch.float32) for t in tensors]
        self.momentum_buffers = [torch.empty_like(g) for g in self.global_params]
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        """Start afresh from the tensors as they are now (global copies taken, momentum zero):
        after they were loaded from a checkpoint that holds no DiLoCo state."""
        for g, buf, t in zip(self.global_params, self.momentum_buffers, self.tensors):
            g.copy_(t)
            buf.zero_()

    def after_step(self, step: int) -> bool:
        """Call after every inner step (``step``: inner steps done, from 1); runs the
        outer step on every ``every``-th. Returns whether it ran."""
        if step % self.every:
            return False
        self.outer_step()
        return True

    @torch.no_grad()
    def outer_step(self) -> None:
        """Average the outer gradients, step the global copies, set the tensors to them."""
        deltas = [g - t.float() for g, t in zip(self.global_params, self.tensors)]
        average_flat(self.comm, deltas)
        for g, buf, d, t in zip(self.global_params, self.momentum_buffers, deltas, self.tensors):
            buf.mul_(self.momentum).add_(d)
            g.sub_(d.add(buf, alpha=self.momentum) if self.nesterov else buf, alpha=self.lr)
            t.copy_(g)

    @property
    def bytes_per_outer_step(self) -> int:
        """What one outer step sends (and receives) per rank: a ring all-reduce of the fp32 deltas."""
        return ring_allreduce_bytes(4 * sum(g.numel() for g in self.global_params), self.comm.world)

    @property
    def state_bytes(self) -> int:
        """Memory the outer step holds on this rank: the fp32 global copies and momentum buffers."""
        return sum(map(nbytes, self.state().values()))

    # -- checkpoints -----------------------------------------------------------------------
    def state(self) -> dict[str, torch.Tensor]:
        """The global copies and momentum buffers by name (``global.i``, ``momentum.i``
        for tensor i); the live tensors, so a checkpoint reader can load into them in place."""
        return {**{f"global.{i}": g for i, g in enumerate(self.global_params)},
                **{f"momentum.{i}": b for i, b in enumerate(self.momentum_buffers)}}

    @torch.no_grad()
    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        mine = self.state()
        if set(state) != set(mine):
            diff = sorted(set(state) ^ set(mine))
            raise ValueError(f"diloco state: keys {diff[:3]} differ (expected global.0..{len(self.tensors) - 1} "
                             f"and momentum.0..{len(self.tensors) - 1})")
        for name, t in mine.items():
            if state[name].shape != t.shape:  # copy_ would broadcast a smaller tensor silently
                raise ValueError(f"diloco state {name}: shape {tuple(state[name].shape)} != {tuple(t.shape)}")
            if state[name] is not t:
                t.copy_(state[name])
