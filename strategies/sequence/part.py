"""The sequence part: each sequence split over ``ulysses x ring`` ranks (USP).

Applied to a model's blocks on the mesh's ``sp`` axis: the ranks of one ``sp``
group read the same samples, each runs the model on its tokens
(``SequenceLayout.positions``: the position layers learn them), with the
workload's attention replaced by the distributed one. A rank's loss is its
tokens' share of the full-sequence mean (``frac``), so the shares of a group
add up to it exactly and so do its gradients: the data-parallel part sums them
over ``sp`` (and averages over replicas).

Group rank ``p = ring_index * ulysses + ulysses_index`` (see ``layout``): a
Ulysses group is ``u`` neighbouring ranks of the sequence group.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from cluster import Comm
from strategies.sequence.attention import SequenceParallelAttention, Traffic
from strategies.sequence.kernels import pick_kernel
from strategies.sequence.layout import SequenceLayout
from workloads import Workload


class SequenceOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ulysses: int = Field(1, ge=1, description="Ulysses degree u: all-to-all over heads (must divide the heads)")
    ring: int | None = Field(
        None, ge=1, description="ring degree r: K/V blocks rotate over r ranks; default: the sequence degree / "
        "ulysses (sequence: workers / ulysses, one sequence group, no data parallelism)")
    layout: Literal["contiguous", "zigzag"] = Field(
        "zigzag", description="zigzag: each ring rank holds an early and a late chunk (balanced causal work; "
        "seq_len divisible by 2 x u x r); contiguous: one run per rank (seq_len divisible by u x r)")
    kernel: Literal["auto", "flash", "math"] = Field(
        "auto", description="block attention: flash (torch's fused CPU kernel), math (matmuls, any device); "
        "auto: flash on CPU")


def attention_is_causal(fn) -> bool:
    """Whether ``fn`` computes causal or full softmax attention (probed on random
    tensors against torch's SDPA); anything else cannot be distributed exactly."""
    q, k, v = torch.randn(3, 1, 2, 8, 4, generator=torch.Generator().manual_seed(0)).unbind(0)
    out = fn(q, k, v)
    for causal in (True, False):
        if torch.allclose(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal), atol=1e-5):
            return causal
    raise ValueError(f"the workload's attention ({getattr(fn, '__name__', fn)!r}) is neither causal nor full "
                     f"scaled-dot-product attention; sequence parallelism can only distribute those")


def check_workload(workload: Workload, who: str) -> None:
    """What sequence parallelism needs of a workload, or a one-line ValueError."""
    if "attention" not in type(workload).capabilities():
        raise ValueError(f"{who} cannot train workload={workload.name!r}: needs swappable attention layers "
                         f"(Workload.attention_layers)")
    if not callable(getattr(workload, "position_layers", None)):
        raise ValueError(f"{who} cannot train workload={workload.name!r}: needs position_layers(blocks), the "
                         f"modules whose `positions` give the tokens' global positions")
    with torch.random.fork_rng(), torch.device("meta"):
        blocks = workload.blocks()
    for layer in workload.attention_layers(blocks):
        attention_is_causal(layer.attention)


def sequence_layout(options: SequenceOptions, sp: int, workload: Workload, field: str = "strategy.sp") -> SequenceLayout:
    """The layout of one sequence group of ``sp`` ranks, or a one-line ValueError."""
    u = options.ulysses
    r = options.ring if options.ring is not None else max(1, sp // u)
    if u * r != sp:
        raise ValueError(f"strategy.ulysses({u}) x strategy.ring({r}) = {u * r} must equal {field}={sp}")
    heads, seq_len = getattr(workload, "n_heads", None), getattr(workload, "seq_len", None)
    if not isinstance(heads, int) or not isinstance(seq_len, int):
        raise ValueError(f"sequence parallelism needs a workload with integer n_heads and seq_len options "
                         f"(workload={workload.name!r})")
    if heads % u:
        raise ValueError(f"strategy.ulysses={u}: must divide workload.n_heads={heads}")
    return SequenceLayout(seq_len, u, r, options.layout)


def subgroups(comm: Comm, sp_groups: list[list[int]], layout: SequenceLayout) -> tuple[Comm, Comm]:
    """(Ulysses group, ring group) of this rank, from the partition of the world
    into sequence groups; collective over ``comm`` (the world)."""
    u, r = layout.ulysses, layout.ring
    uly = [g[i * u:(i + 1) * u] for g in sp_groups for i in range(r)]
    ring = [g[j::u] for g in sp_groups for j in range(u)]
    return comm.split(uly), comm.split(ring)


@dataclass(eq=False)
class SequencePart:
    """Sequence parallelism applied to this rank's blocks."""

    layout: SequenceLayout
    rank: int  # in the sequence group
    traffic: Traffic
    layers: int  # attention layers this rank holds

    @property
    def positions(self) -> torch.Tensor:
        return self.layout.positions(self.rank)

    @property
    def frac(self) -> float:
        """This rank's share of each sequence's tokens."""
        return self.layout.local_len / self.layout.seq_len

    def metrics(self) -> dict[str, float]:
        traffic = self.traffic.take()
        n = max(1, self.layers)
        return {"sp_fwd_bytes_per_layer": traffic.forward / n, "sp_bwd_bytes_per_layer": traffic.backward / n}


def apply_sp(blocks: list[nn.Module], workload: Workload, layout: SequenceLayout, rank: int, *,
             ulysses: Comm, ring: Comm, kernel: str, device: torch.device) -> SequencePart:
    """Give ``blocks``' position layers this rank's positions and replace their
    attention by the distributed one."""
    part = SequencePart(layout, rank, Traffic(), 0)
    for layer in workload.position_layers(blocks):
        layer.positions = part.positions.to(device)
    block_kernel = pick_kernel(kernel, device)
    layers = workload.attention_layers(blocks)
    for layer in layers:
        layer.attention = SequenceParallelAttention(
            layout, rank, ulysses=ulysses, ring=ring, causal=attention_is_causal(layer.attention),
            kernel=block_kernel, traffic=part.traffic)
    part.layers = len(layers)
    return part
