"""Gossip mixing of any list of tensors over any ``Comm``: one round replaces
this rank's tensors x_i by ``sum_j W[i, j] x_j`` for the topology's doubly
stochastic W (``topology.py``), so the ranks' average is kept.

The ``gossip`` strategy mixes a whole replica's parameters over the world; a
composition's outer sync mixes this rank's local tensors (whole parameters
under DDP, its FSDP shards, ``p.to_local()``) over the sub-group of one rank
per node. A round is split into ``launch`` (snapshot and post the sends) and
``finish`` (wait and mix) so that compute can run in between; with
``overlap`` whatever changed locally since the snapshot (that step's update)
is added on top of the mix (D-PSGD's form).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from cluster import Comm, nbytes, ring_allreduce_bytes
from strategies.decentralized.flat import flatten, unflatten_into
from strategies.decentralized.topology import mixing_matrix, num_rounds, rank_round, topology_error


@dataclass
class Mixing:
    """One round in flight: what was sent, where the peers' vectors land."""

    snapshot: torch.Tensor
    work: dist.Work
    recv: list[tuple[torch.Tensor, float]] = field(default_factory=list)
    self_weight: float = 1.0
    mean_of: int = 0  # complete topology: ``snapshot``'s all-reduced copy lives in recv[0], divide by this


class GossipMixer:
    """Mixes ``tensors`` (in place, one flat message per peer) with this rank's
    neighbours in ``comm`` under ``topology``; round i uses the topology's
    (i mod rounds)-th matrix."""

    def __init__(self, tensors: list[torch.Tensor], comm: Comm, *, topology: str = "ring", overlap: bool = False):
        why = topology_error(topology, comm.world)
        if why:
            raise ValueError(why)
        dtypes = sorted({str(t.dtype) for t in tensors})
        if len(dtypes) > 1:  # one flat vector per peer needs one dtype
            raise ValueError(f"gossip tensors: dtypes {', '.join(dtypes)}: must all share one dtype")
        self.tensors, self.comm, self.overlap = tensors, comm, overlap
        self.rounds = [rank_round(mixing_matrix(topology, comm.world, i), comm.rank)
                       for i in range(num_rounds(topology, comm.world))]
        self.all_reduce_complete = topology == "complete"  # W = J/n: one all-reduce beats n - 1 sends

    def launch(self, round_index: int) -> Mixing:
        """Snapshot the tensors and start sending them (asynchronously)."""
        comm, snap = self.comm, flatten(self.tensors)
        if self.all_reduce_complete:
            total = snap.clone()
            return Mixing(snap, comm.all_reduce(total, async_op=True), [(total, 1.0)], 0.0, comm.world)
        rr = self.rounds[round_index % len(self.rounds)]
        recv = [(torch.empty_like(snap), w) for _, w in rr.recv_from]
        work = comm.exchange([(snap, j) for j in rr.send_to],
                             [(buf, j) for (buf, _), (j, _) in zip(recv, rr.recv_from)], async_op=True)
        return Mixing(snap, work, recv, rr.self_weight)

    @torch.no_grad()
    def finish(self, m: Mixing) -> None:
        """Wait for the peers' vectors; tensors <- W-mix of the snapshots, plus
        whatever changed locally since the snapshot (with ``overlap``)."""
        m.work.wait()
        if m.mean_of:
            mixed = m.recv[0][0].div_(m.mean_of)
        else:
            mixed = m.snapshot * m.self_weight
            for buf, w in m.recv:
                mixed.add_(buf, alpha=w)
        if self.overlap:
            mixed += flatten(self.tensors) - m.snapshot
        unflatten_into(mixed, self.tensors)

    def round(self, round_index: int) -> None:
        """One blocking round of mixing, nothing else."""
        self.finish(self.launch(round_index))

    def consensus(self) -> dict[str, float]:
        """The consensus distance of the mixed tensors (see ``consensus``)."""
        return consensus(self.comm, self.tensors)

    def buffer_bytes(self) -> int:
        """Memory a round holds: the snapshot plus one receive buffer per in-neighbour."""
        n = sum(map(nbytes, self.tensors))
        peers = 1 if self.all_reduce_complete else max(len(r.recv_from) for r in self.rounds)
        return n * (1 + peers)


def consensus(comm: Comm, tensors: list[torch.Tensor]) -> dict[str, float]:
    """(1/n) sum_i ||x_i - mean x||^2 over ``tensors`` of the n ranks of ``comm``,
    and the bytes measuring it took (an all-reduce of the tensors and one of a scalar)."""
    x = flatten(tensors)
    mean = x.clone()
    comm.all_reduce(mean)
    mean /= comm.world
    d = torch.tensor([float((x.double() - mean.double()).square().sum())], dtype=torch.float64)
    comm.all_reduce(d)
    sent = ring_allreduce_bytes(nbytes(x), comm.world) + ring_allreduce_bytes(8, comm.world)
    return {"consensus_distance": float(d) / comm.world, "consensus_bytes": float(sent)}
