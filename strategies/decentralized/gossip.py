"""gossip: decentralized data parallelism by neighbour averaging (D-PSGD with AdamW).

No gradient is all-reduced. Each rank steps its own replica with its own
gradient (the usual AdamW, clipping and schedule) and then mixes parameters
with its neighbours through a doubly stochastic matrix W (see
``strategies.decentralized.topology``; the mixing itself is
``strategies.decentralized.mixing.GossipMixer``), so replicas drift apart a little and
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

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from strategies.base import StepStats, Strategy, StrategyContext, run_micro_batches
from strategies.checkpoint import held_bytes
from strategies.decentralized.flat import average_flat, broadcast_flat, float_buffers
from strategies.decentralized.mixing import GossipMixer, consensus
from strategies.decentralized.state import load_per_rank, save_per_rank
from strategies.decentralized.topology import topology_error
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
        self.mixer = GossipMixer(self.mixed, ctx.comm, topology=self.options.topology, overlap=self.options.overlap)
        self.steps_done = 0
        self._held: dict[str, int] | None = None

    def consensus(self) -> dict[str, float]:
        """The consensus distance over the trainable parameters (buffers are mixed but not measured)."""
        return consensus(self.ctx.comm, [p for p in self.module.parameters() if p.requires_grad])

    # -- the step --------------------------------------------------------------------------
    def train_step(self, micro_batches: list[Batch]) -> StepStats:
        t = self.steps_done
        pending = self.mixer.launch(t) if self.options.overlap else None
        loss, extra, _ = run_micro_batches(self.model, self.workload, micro_batches, device=self.ctx.device)
        if self._held is None and self.opt.state:  # second step: gradients and optimizer state both exist
            self._held = {**held_bytes(self.module, self.opt),
                          "mix_buffer_bytes": self.mixer.buffer_bytes()}
        extra["lr"] = self.opt.param_groups[0]["lr"]
        extra["grad_norm"] = clip_and_step(self.module, self.opt, self.sched, self.ctx.optim)
        self.mixer.finish(pending if pending is not None else self.mixer.launch(t))
        self.steps_done += 1
        o = self.options
        if o.global_every and self.steps_done % o.global_every == 0:
            average_flat(self.ctx.comm, self.mixed)
        if o.consensus_every and self.steps_done % o.consensus_every == 0:
            extra.update(self.consensus())
        return StepStats(loss=loss, samples=sum(mb[0].shape[0] for mb in micro_batches), extra=extra)

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
