"""FSDP2's collectives go through Comm: bytes equal the ring formulas; memory is sharded."""
import pytest
import torch

from cluster import ring_allreduce_bytes
from orchestrator.config import JobSpec
from orchestrator.trainer import RankTrainer
from tests.ranks import run_ranks

MLP = {"name": "mlp-wide", "in_dim": 64, "hidden": 256, "layers": 2, "n_samples": 512}


def step_rows(rank, world, strategy):
    spec = JobSpec(workload=MLP, strategy=strategy, workers=world, steps=3, batch_size=8)
    t = RankTrainer(spec, rank=rank, world=world, device=torch.device("cpu"))
    return [t.train_step() for _ in range(3)]


def test_fsdp_bytes_equal_the_formula_without_reshard(tmp_path):
    """reshard_after_forward=False: one all-gather of every shard, one reduce-scatter
    of every gradient per step: 2 (w-1) x held parameter bytes per rank, plus the
    all-reduce of the squared gradient norm (one float32) that clipping needs."""
    rows = run_ranks(step_rows, 2, tmp_path, {"name": "fsdp", "reshard_after_forward": False})
    norm = ring_allreduce_bytes(4, 2)
    for r in rows:
        held = r[-1]["param_bytes"]
        assert all(row["bytes_sent"] == row["bytes_received"] == 2 * held + norm for row in r)
        assert all(row["comm_s"] > 0 for row in r)


def test_fsdp_reshard_after_forward_gathers_again(tmp_path):
    lazy = run_ranks(step_rows, 2, tmp_path, {"name": "fsdp", "reshard_after_forward": False})[0][-1]
    eager = run_ranks(step_rows, 2, tmp_path, {"name": "fsdp", "reshard_after_forward": True})[0][-1]
    assert eager["bytes_sent"] > lazy["bytes_sent"]


@pytest.mark.parametrize("world", [2])  # 4 workers: benchmarks/memory.py
def test_fsdp_model_state_is_one_nth_of_ddp(tmp_path, world):
    ddp = run_ranks(step_rows, world, tmp_path, "ddp")[0][-1]
    fsdp = run_ranks(step_rows, world, tmp_path, "fsdp")[0][-1]
    for key in ("param_bytes", "grad_bytes", "optim_bytes"):
        assert fsdp[key] <= ddp[key] * (1 / world + 0.10), key  # padding stays within 10%
