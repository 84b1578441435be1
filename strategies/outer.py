"""The outer sync: a low-bandwidth method across the mesh's ``dp`` axis (one rank per node).

Inside a node, FSDP or DDP combine gradients every step over fast links; across
nodes, an outer method keeps the replicas together while sending far less:

- ``powersgd``: the node-averaged gradients are combined across nodes by
  PowerSGD (rank-r factors, error feedback; ``strategies.compression``), then
  the usual AdamW step;
- ``demo``: no gradient crosses nodes; DeMo's top-k DCT coefficients of each
  rank's momentum are all-gathered and the sign step replaces AdamW
  (``strategies.decentralized.demo``);
- ``gossip``: after each AdamW step, parameters are mixed with neighbouring
  nodes (``strategies.decentralized.gossip``);
- ``diloco``: AdamW steps locally; every ``outer_every`` steps the parameters'
  change is averaged across nodes and applied by an outer Nesterov SGD
  (``strategies.decentralized.diloco``).

Each works on this rank's local tensors (whole parameters, or this rank's FSDP
shards), which the ranks of one dp group hold alike, over the dp group's
``Comm``: every byte is charged to the rank's one ledger, as inter-node traffic
when the dp groups cross nodes.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cluster import Comm
from strategies.decentralized.flat import average_flat
from strategies.optim import lr_factor


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t`` as a plain tensor sharing its storage (a DTensor's shard)."""
    with torch.no_grad():
        return t.to_local() if hasattr(t, "to_local") else t


def local_tensors(module: nn.Module) -> list[torch.Tensor]:
    """This rank's part of each trainable parameter, in order."""
    return [local(p) for p in module.parameters() if p.requires_grad]


class Outer:
    """No outer sync (``outer=none``): the data-parallel part averages dp every step."""

    replaces_optimizer = False
    mixes_buffers = False  # whether it keeps batch-norm statistics together itself
    replicas_differ = False  # whether the dp replicas' weights differ between steps

    def begin_step(self, step: int) -> None:
        """Before the step's forward (``step``: 0-based)."""

    def before_step(self, step: int) -> dict[str, float]:
        """Combine gradients across dp before the optimizer (``step``: 0-based)."""
        return {}

    def optimizer_step(self, step: int, finite: bool) -> dict[str, float]:
        """Replace the optimizer (only where ``replaces_optimizer``)."""
        raise NotImplementedError

    def after_step(self, step: int) -> dict[str, float]:
        """After the optimizer (``step``: 1-based count of steps done)."""
        return {}

    def state(self) -> dict[str, torch.Tensor]:
        """This rank's outer state, name -> tensor (for checkpoints)."""
        return {}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        pass

    def restart(self) -> None:
        """The parameters were loaded from a checkpoint without this rank's outer state."""

    def held(self) -> dict[str, int]:
        """Bytes it holds beyond parameters, gradients and optimizer state."""
        return {}


class _Named:
    def __init__(self, module: nn.Module):
        self.named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.tensors = local_tensors(module)

    def grads(self) -> list[tuple[str, torch.Tensor]]:
        return [(n, local(p.grad)) for n, p in self.named if p.grad is not None]


class PowerSGDOuter(Outer, _Named):
    def __init__(self, module: nn.Module, comm: Comm, options: dict[str, Any], *, seed: int):
        from strategies.compression.base import Wire
        from strategies.compression.powersgd import PowerSGDCompressor

        _Named.__init__(self, module)
        self.comm, self.warmup = comm, options["warmup_steps"]
        self.wire = Wire(comm)
        shapes = {n: t.shape for (n, _), t in zip(self.named, self.tensors)}
        self.compressor = PowerSGDCompressor(
            self.wire, shapes, rank=options["rank"], min_compression_rate=options["min_compression_rate"],
            seed=seed, error_feedback=options["error_feedback"], warm_start=options["warm_start"])

    def before_step(self, step: int) -> dict[str, float]:
        grads = self.grads()
        if step < self.warmup:  # uncompressed warm-up, as the powersgd strategy
            average_flat(self.comm, [g for _, g in grads])
            return {"outer_compressed": 0.0}
        self.compressor.reduce(grads, step)
        return {"outer_compressed": 1.0}

    def state(self) -> dict[str, torch.Tensor]:
        return self.compressor.tensors()

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.compressor.load_tensors(state)


class DeMoOuter(Outer, _Named):
    replaces_optimizer = True

    def __init__(self, module: nn.Module, comm: Comm, options: dict[str, Any], *, optim, total_steps: int):
        from strategies.decentralized.demo import VALUE_DTYPES, DeMo

        _Named.__init__(self, module)
        self.optim, self.total_steps = optim, total_steps
        self.lr = options["lr"] if options.get("lr") is not None else optim.lr
        self.weight_decay = options["weight_decay"] if options.get("weight_decay") is not None \
            else optim.weight_decay
        self.demo = DeMo(self.tensors, comm, topk=options["topk"], chunk=options["chunk"], decay=options["decay"],
                         value_dtype=VALUE_DTYPES[options["value_dtype"]],
                         decays=[p.dim() >= 2 for _, p in self.named])

    def optimizer_step(self, step: int, finite: bool) -> dict[str, float]:
        lr = self.lr * lr_factor(step, self.optim, self.total_steps)
        grads = [local(p.grad) if p.grad is not None else None for _, p in self.named]
        self.demo.step(lr, self.weight_decay, finite=finite, grads=grads)
        for _, p in self.named:
            p.grad = None
        return {"lr": lr}

    def state(self) -> dict[str, torch.Tensor]:
        return {f"momentum.{n}": m for (n, _), m in zip(self.named, self.demo.momentum)}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        for (n, _), m in zip(self.named, self.demo.momentum):
            m.copy_(state[f"momentum.{n}"])

    def optim_bytes(self) -> int:
        from cluster import nbytes

        return sum(nbytes(m) for m in self.demo.momentum)


class GossipOuter(Outer, _Named):
    mixes_buffers = True  # batch-norm statistics are mixed with the parameters
    replicas_differ = True  # each replica mixes with its neighbours only

    def __init__(self, module: nn.Module, comm: Comm, options: dict[str, Any]):
        from strategies.decentralized.flat import float_buffers
        from strategies.decentralized.mixing import GossipMixer

        _Named.__init__(self, module)
        self.comm, self.options = comm, options
        self.mixed = [*self.tensors, *float_buffers(module)]
        self.mixer = GossipMixer(self.mixed, comm, topology=options["topology"], overlap=options["overlap"])
        self.pending = None

    def begin_step(self, step: int) -> None:
        if self.options["overlap"]:  # D-PSGD: this step's starting parameters travel while it computes
            self.pending = self.mixer.launch(step)

    def after_step(self, step: int) -> dict[str, float]:
        pending, self.pending = self.pending, None
        self.mixer.finish(pending if pending is not None else self.mixer.launch(step - 1))
        o, extra = self.options, {}
        if o["global_every"] and step % o["global_every"] == 0:
            average_flat(self.comm, self.mixed)
        if o["consensus_every"] and step % o["consensus_every"] == 0:
            from strategies.decentralized.mixing import consensus

            extra.update(consensus(self.comm, self.tensors))
        return extra

    def held(self) -> dict[str, int]:
        return {"mix_buffer_bytes": self.mixer.buffer_bytes()}


class DiLoCoOuter(Outer, _Named):
    replicas_differ = True  # between outer syncs
    def __init__(self, module: nn.Module, comm: Comm, options: dict[str, Any]):
        from strategies.decentralized.diloco import DiLoCo

        _Named.__init__(self, module)
        self.diloco = DiLoCo(self.tensors, comm, every=options["outer_every"], lr=options["outer_lr"],
                             momentum=options["outer_momentum"], nesterov=options["outer_nesterov"])

    def after_step(self, step: int) -> dict[str, float]:
        return {"outer_synced": float(self.diloco.after_step(step))}

    def restart(self) -> None:
        self.diloco.reset()

    def state(self) -> dict[str, torch.Tensor]:
        return self.diloco.state()

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.diloco.load_state(state)


def make_outer(name: str, module: nn.Module, comm: Comm | None, options: dict[str, Any], *, optim,
               total_steps: int, seed: int) -> Outer:
    if name == "none" or comm is None:
        return Outer()
    if name == "powersgd":
        return PowerSGDOuter(module, comm, options, seed=seed)
    if name == "demo":
        return DeMoOuter(module, comm, options, optim=optim, total_steps=total_steps)
    if name == "gossip":
        return GossipOuter(module, comm, options)
    if name == "diloco":
        return DiLoCoOuter(module, comm, options)
    raise ValueError(f"strategy.outer={name!r}: must be one of none, demo, powersgd, gossip, diloco")
