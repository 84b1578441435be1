"""The projection's bytes per step against a real 2-rank run's Comm ledger (the reference)."""
import pytest
import torch

from orchestrator.config import JobSpec
from orchestrator.project import profile
from orchestrator.trainer import RankTrainer
from strategies.projection import Target, job_for, predict
from tests.ranks import run_ranks

MLP = {"name": "mlp-wide", "in_dim": 64, "hidden": 256, "layers": 2, "n_samples": 512, "micro_batch": 4}
M = 2  # micro-batches per replica per step (the pipeline's, else gradient accumulation)


def _spec(strategy: str, world: int) -> JobSpec:
    if strategy == "pipeline":
        return JobSpec(workload=MLP, strategy={"name": strategy, "microbatches": M}, workers=world, steps=3,
                       batch_size=4 * M)
    return JobSpec(workload=MLP, strategy=strategy, workers=world, steps=3, batch_size=4 * M * world, grad_accum=M)


def step_rows(rank, world, strategy):
    t = RankTrainer(_spec(strategy, world), rank=rank, world=world, device=torch.device("cpu"))
    return [t.train_step() for _ in range(3)]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "pipeline"])
def test_predicted_bytes_per_step_equal_the_measured(tmp_path, strategy):
    """Steady steps, the rank that sends most (a pipeline's ranks differ)."""
    rows = run_ranks(step_rows, 2, tmp_path, strategy)
    workload = _spec(strategy, 2).build_workload()
    job = job_for(strategy, {}, 2, workload, microbatches=M, n_blocks=len(workload.blocks()))
    pred = predict(profile(workload, repeats=1), job, Target(cores=2))
    measured = max(row["bytes_sent"] for r in rows for row in r[1:])
    assert measured == pred.bytes_intra + pred.bytes_inter
