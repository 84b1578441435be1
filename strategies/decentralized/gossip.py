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

from strategies.decentralized.mixing import consensus
from strategies.dcp import load_per_rank, save_per_rank
from strategies.parallel import Parallel, Plan
from strategies.registry import register_strategy


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
class Gossip(Parallel):
    """Decentralized SGD/AdamW: each rank steps on its own gradient, then averages parameters with its neighbours."""

    Options = GossipOptions
    checkpoint_format = "dcp-gossip"  # every rank's own parameters and optimizer: loadable by gossip only

    @classmethod
    def plan(cls, options: GossipOptions, workers: int) -> Plan:
        """Every rank its own participant: the outer sync over dp = workers, nothing inside."""
        return Plan.of(workers, dp=workers, outer="gossip", outer_options=options.model_dump())

    @property
    def mixer(self):
        return self.outer.mixer

    def consensus(self) -> dict[str, float]:
        """The consensus distance over the trainable parameters (buffers are mixed but not measured)."""
        return consensus(self.ctx.comm, [p for p in self.module.parameters() if p.requires_grad])

    # -- checkpoints: every rank's own replica -----------------------------------------------
    def save_checkpoint(self, url: str) -> None:
        from torch.distributed.checkpoint.state_dict import get_state_dict  # DCP: imported on first use

        model_sd, optim_sd = get_state_dict(self.module, self.opt)
        save_per_rank(url, rank=self.ctx.rank, shared={"sched": self.sched.state_dict(),
                                                       "steps_done": self.sched.last_epoch},
                      own={"model": model_sd, "optim": optim_sd})

    def load_checkpoint(self, url: str) -> None:
        """Rank r gets saved rank ``r % saved_world``'s parameters and optimizer state
        (the same rank when the world size is unchanged)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(self.module, self.opt)
        shared, own, _ = load_per_rank(url, rank=self.ctx.rank, shared={"sched": self.sched.state_dict(),
                                                                       "steps_done": 0},
                                       own={"model": model_sd, "optim": optim_sd})
        set_state_dict(self.module, self.opt, model_state_dict=own["model"], optim_state_dict=own["optim"],
                       options=StateDictOptions(strict=True))
        self.sched.load_state_dict(shared["sched"])
