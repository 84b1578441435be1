"""gossip: decentralized data parallelism by neighbour averaging (D-PSGD with AdamW).

No gradient is all-reduced. Each rank steps its own replica with its own
gradient (the usual AdamW, clipping and schedule) and then mixes parameters
with its neighbours through a doubly stochastic matrix W (see
``strategies.decentralized.topology``), so replicas drift apart a little and
are pulled back together every step. With x_i rank i's parameters and u_i its
optimizer update computed at x_i:

- ``overlap=false`` (adapt then combine): x_i <- sum_j W_ij (x_j + u_j).
  The stepped parameters are exchanged after the step; the rank waits.
- ``overlap=true`` (D-PSGD's form, Lian et al. 2017): x_i <- sum_j W_ij x_j + u_i.
  At the start of a step the rank snapshots x_i and sends it to its neighbours
  asynchronously; forward, backward and the optimizer step run on x_i while the
  messages travel; after the step the mixed snapshot replaces x_i and this
  step's own update is added on top. Parameters used in step t + 1 are thus
  the mix of step t's starting parameters plus step t's update.

``global_every=K`` replaces every rank's parameters by their exact average
(one all-reduce) after every K-th step. The consensus distance
(1/n) sum_i ||x_i - mean x||^2 costs an all-reduce of the parameters, so it is
measured only every ``consensus_every`` steps; its bytes are part of the step's
``bytes_sent``/``bytes_received`` and are also reported alone as
``consensus_bytes`` so a reader can subtract them. Floating-point buffers
(batch norm statistics) are mixed along with the parameters.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from cluster import nbytes, ring_allreduce_bytes
from strategies.base import StepStats, Strategy, StrategyContext, run_micro_batches
from strategies.checkpoint import held_bytes
from strategies.decentralized.flat import average_flat, broadcast_flat, flatten, float_buffers, unflatten_into
from strategies.decentralized.state import load_per_rank, save_per_rank
from strategies.decentralized.topology import mixing_matrix, num_rounds, rank_round, topology_error
from strategies.optim import build_optimizer, clip_and_step
from strategies.registry import register_strategy
from workloads import Batch, Workload


class GossipOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    topology: Literal["ring", "torus", "one-peer-exp", "complete"] = Field(
        "ring", description="whom each rank averages with: ring | torus | one-peer-exp (power-of-two workers) | "
        "complete (an all-reduce of parameters)")
    overlap: bool = Field(False, description="send parameters at the start of the step and mix them in after "
                          "the optimizer step (D-PSGD), overlapping communication with compute")
    global_every: int = Field(0, ge=0, description="exact global average of parameters every N steps (0: never)")
    consensus_every: int = Field(10, ge=0, description="measure the consensus distance every N steps (an "
                                 "all-reduce of the parameters; 0: never)")


@dataclass
class _Mixing:
    """One round in flight: what was sent, where the peers' vectors land."""

    snapshot: torch.Tensor
    work: dist.Work
    recv: list[tuple[torch.Tensor, float]] = field(default_factory=list)
    self_weight: float = 1.0
    mean_of: int = 0  # complete topology: ``snapshot``'s all-reduced copy lives in recv[0], divide by this


@register_strategy("gossip")
class Gossip(Strategy):
    """Decentralized SGD/AdamW: each rank steps on its own gradient, then averages parameters with its neighbours."""

    Options = GossipOptions
    checkpoint_format = "dcp-gossip"  # every rank's own parameters and optimizer: loadable by gossip only

    @classmethod
    def check_job(cls, *, workers: int, workload: Workload, options: GossipOptions | None = None,
                  batch_size: int | None = None) -> None:
        super().check_job(workers=workers, workload=workload, options=options, batch_size=batch_size)
        why = topology_error(options.topology, workers) if options is not None else None
        if why:
            raise ValueError(why)

    def setup(self, workload: Workload, ctx: StrategyContext) -> None:
        self.check_job(workers=ctx.world, workload=workload, options=self.options)
        self.workload, self.ctx = workload, ctx
        self.module = self.model = workload.model().to(ctx.device)
        self.mixed = [*(p for p in self.module.parameters() if p.requires_grad), *float_buffers(self.module)]
        broadcast_flat(ctx.comm, self.mixed)  # every replica starts from rank 0's parameters
        self.opt, self.sched = build_optimizer(self.module, ctx.optim, ctx.total_steps)
        topo = self.options.topology
        self.rounds = [rank_round(mixing_matrix(topo, ctx.world, i), ctx.rank)
                       for i in range(num_rounds(topo, ctx.world))]
        self.all_reduce_complete = topo == "complete"  # W = J/n: one all-reduce beats n - 1 sends
        self.steps_done = 0
        self._held: dict[str, int] | None = None

    # -- mixing ------------------------------------------------------------------------------
    def launch_mix(self, round_index: int) -> _Mixing:
        """Snapshot this rank's parameters and start sending them (asynchronously)."""
        comm, snap = self.ctx.comm, flatten(self.mixed)
        if self.all_reduce_complete:
            total = snap.clone()
            return _Mixing(snap, comm.all_reduce(total, async_op=True), [(total, 1.0)], 0.0, comm.world)
        rr = self.rounds[round_index % len(self.rounds)]
        recv = [(torch.empty_like(snap), w) for _, w in rr.recv_from]
        work = comm.exchange([(snap, j) for j in rr.send_to],
                             [(buf, j) for (buf, _), (j, _) in zip(recv, rr.recv_from)], async_op=True)
        return _Mixing(snap, work, recv, rr.self_weight)

    @torch.no_grad()
    def finish_mix(self, m: _Mixing) -> None:
        """Wait for the peers' vectors; parameters <- W-mix of the snapshots, plus
        whatever changed locally since the snapshot (this step's update, with overlap)."""
        m.work.wait()
        if m.mean_of:
            mixed = m.recv[0][0].div_(m.mean_of)
        else:
            mixed = m.snapshot * m.self_weight
            for buf, w in m.recv:
                mixed.add_(buf, alpha=w)
        if self.options.overlap:
            mixed += flatten(self.mixed) - m.snapshot
        unflatten_into(mixed, self.mixed)

    def gossip_round(self, round_index: int) -> None:
        """One blocking round of mixing, nothing else (what a step does with zero updates)."""
        self.finish_mix(self.launch_mix(round_index))

    def consensus(self) -> dict[str, float]:
        """(1/n) sum_i ||x_i - mean x||^2 over the parameters, and the bytes measuring it took."""
        comm = self.ctx.comm
        params = [p for p in self.module.parameters() if p.requires_grad]
        x = flatten(params)
        mean = x.clone()
        comm.all_reduce(mean)
        mean /= comm.world
        d = torch.tensor([float((x.double() - mean.double()).square().sum())], dtype=torch.float64)
        comm.all_reduce(d)
        sent = ring_allreduce_bytes(nbytes(x), comm.world) + ring_allreduce_bytes(8, comm.world)
        return {"consensus_distance": float(d) / comm.world, "consensus_bytes": float(sent)}

    # -- the step --------------------------------------------------------------------------
    def train_step(self, micro_batches: list[Batch]) -> StepStats:
        t = self.steps_done
        pending = self.launch_mix(t) if self.options.overlap else None
        loss, extra, _ = run_micro_batches(self.model, self.workload, micro_batches, device=self.ctx.device)
        if self._held is None and self.opt.state:  # second step: gradients and optimizer state both exist
            self._held = {**held_bytes(self.module, self.opt),
                          "mix_buffer_bytes": self._mix_buffer_bytes()}
        extra["lr"] = self.opt.param_groups[0]["lr"]
        extra["grad_norm"] = clip_and_step(self.module, self.opt, self.sched, self.ctx.optim)
        self.finish_mix(pending if pending is not None else self.launch_mix(t))
        self.steps_done += 1
        o = self.options
        if o.global_every and self.steps_done % o.global_every == 0:
            average_flat(self.ctx.comm, self.mixed)
        if o.consensus_every and self.steps_done % o.consensus_every == 0:
            extra.update(self.consensus())
        return StepStats(loss=loss, samples=sum(mb[0].shape[0] for mb in micro_batches), extra=extra)

    def _mix_buffer_bytes(self) -> int:
        """The snapshot plus one receive buffer per in-neighbour."""
        n = sum(map(nbytes, self.mixed))
        peers = 1 if self.all_reduce_complete else max(len(r.recv_from) for r in self.rounds)
        return n * (1 + peers)

    # -- checkpoints: every rank's own replica -----------------------------------------------
    def save_checkpoint(self, url: str) -> None:
        model_sd, optim_sd = get_state_dict(self.module, self.opt)
        save_per_rank(url, rank=self.ctx.rank, shared={"sched": self.sched.state_dict(), "steps_done": self.steps_done},
                      own={"model": model_sd, "optim": optim_sd})

    def load_checkpoint(self, url: str) -> None:
        """Rank r gets saved rank ``r % saved_world``'s parameters and optimizer state
        (the same rank when the world size is unchanged)."""
        model_sd, optim_sd = get_state_dict(self.module, self.opt)
        shared, own, _ = load_per_rank(url, rank=self.ctx.rank, shared={"sched": self.sched.state_dict(),
                                                                       "steps_done": 0},
                                       own={"model": model_sd, "optim": optim_sd})
        set_state_dict(self.module, self.opt, model_state_dict=own["model"], optim_state_dict=own["optim"],
                       options=StateDictOptions(strict=True))
        self.sched.load_state_dict(shared["sched"])
        self.steps_done = int(shared["steps_done"])

    def memory_bytes(self) -> dict[str, int]:
        return self._held or {}
