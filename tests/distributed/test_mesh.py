"""The mesh's sub-groups on real gloo ranks: each axis reduces over the ranks the
layout says, and every byte lands in the one ledger of the Comm it was built from."""
import pytest
import torch

from cluster import Comm, ring_allreduce_bytes
from cluster.mesh import Layout, Mesh, nodes_from_per_node
from tests.ranks import run_ranks


def reduce_along_each_axis(rank: int, world: int) -> dict:
    comm = Comm()
    comm.set_nodes(nodes_from_per_node(world, 2))
    mesh = Mesh(comm, Layout.for_world(world, fsdp=2))
    comm.take_stats()
    sums = {}
    for axes in [("fsdp",), ("dp",), ("pp",), ("dp", "fsdp")]:
        sums[axes] = mesh.group(*axes).all_reduce(torch.tensor([float(rank)])).item()
    return {"sums": sums, "coords": mesh.layout.coords(rank), "stats": comm.take_stats().__dict__,
            "inter": {a: mesh.inter_node(a) for a in ("fsdp", "dp")}}


def test_each_axis_reduces_over_its_ranks_on_one_ledger(tmp_path):
    out = run_ranks(reduce_along_each_axis, 4, tmp_path)
    for rank, r in enumerate(out):
        partner_fsdp, partner_dp = rank ^ 1, (rank + 2) % 4
        assert r["sums"][("fsdp",)] == rank + partner_fsdp
        assert r["sums"][("dp",)] == rank + partner_dp
        assert r["sums"][("pp",)] == rank  # a group of one
        assert r["sums"][("dp", "fsdp")] == 0 + 1 + 2 + 3
        assert r["coords"] == {"dp": rank // 2, "pp": 0, "fsdp": rank % 2, "sp": 0}
        want = 2 * ring_allreduce_bytes(4, 2) + ring_allreduce_bytes(4, 4)
        assert r["stats"]["bytes_sent"] == want and r["stats"]["calls"] == 3  # the group of one sends nothing
        assert r["inter"] == {"fsdp": False, "dp": True}
        # fsdp's pairs share a node; dp's and the whole world's cross nodes
        s = r["stats"]
        assert s["bytes_intra"] == ring_allreduce_bytes(4, 2)
        assert s["bytes_inter"] == ring_allreduce_bytes(4, 2) + ring_allreduce_bytes(4, 4)
        assert s["comm_intra_s"] > 0 and s["comm_inter_s"] > 0
        assert s["comm_intra_s"] + s["comm_inter_s"] == pytest.approx(s["comm_s"], rel=1e-6)  # one call at a time


def link_bytes(rank: int, world: int, strategy: dict, scenario: str) -> dict:
    from orchestrator.config import JobSpec
    from orchestrator.trainer import RankTrainer

    spec = JobSpec(workload={"name": "gpt-tiny", "n_layers": 1, "d_model": 32, "seq_len": 32}, strategy=strategy,
                   workers=world, steps=2, batch_size=8, scenario=scenario)
    trainer = RankTrainer(spec, rank=rank, world=world, device=torch.device("cpu"))
    return trainer.train_step()


TWO_NODES = "nodes=2,per_node=2,inter=10gbit,intra=100gbit,latency=1ms"


def test_metrics_split_bytes_and_time_by_link_class(tmp_path):
    """Sequence parallelism inside a node (ulysses over ranks 0-1 and 2-3), data
    parallelism across the two nodes: the all-to-alls are intra, the gradient
    all-reduce inter, and the two add up to every byte sent."""
    rows = run_ranks(link_bytes, 4, tmp_path, {"name": "sequence", "ulysses": 2}, TWO_NODES)
    for row in rows:
        assert row["bytes_intra"] > 0 and row["bytes_inter"] > 0
        assert row["bytes_intra"] + row["bytes_inter"] == row["bytes_sent"]
        assert row["comm_intra_s"] > 0 and row["comm_inter_s"] > 0
    ddp = run_ranks(link_bytes, 4, tmp_path / "ddp", "ddp", "local")  # no scenario: one machine, one node
    assert all(r["bytes_inter"] == 0 and r["bytes_intra"] == r["bytes_sent"] > 0 for r in ddp)
