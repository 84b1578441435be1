"""The projection's bytes per step against a real 2-rank run's Comm ledger (the
reference): every method the validation benchmark projects."""
import pytest
import torch

from orchestrator.config import JobSpec
from orchestrator.project import profile
from orchestrator.trainer import RankTrainer
from strategies.projection import Target, job_for, predict
from tests.ranks import run_ranks

GPT = {"name": "gpt-tiny", "d_model": 64, "n_layers": 2, "seq_len": 32, "micro_batch": 4}
M = 2  # micro-batches per replica per step (the pipeline's, else gradient accumulation)
OPTIONS = {"powersgd": {"warmup_steps": 0}, "sequence": {"ulysses": 2}}


def _spec(strategy: str, world: int) -> JobSpec:
    name = strategy.split("-")[0]
    options = {"name": name, **OPTIONS.get(strategy, {})}
    if name == "pipeline":
        return JobSpec(workload=GPT, strategy={**options, "microbatches": M}, workers=world, steps=3, batch_size=4 * M)
    replicas = 1 if name == "sequence" else world
    return JobSpec(workload=GPT, strategy=options, workers=world, steps=3, batch_size=4 * M * replicas, grad_accum=M)


def step_rows(rank, world, strategy):
    t = RankTrainer(_spec(strategy, world), rank=rank, world=world, device=torch.device("cpu"))
    return [t.train_step() for _ in range(3)]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "pipeline", "sequence-ring", "sequence", "zero2", "powersgd",
                                      "demo"])
def test_predicted_bytes_per_step_equal_the_measured(tmp_path, strategy):
    """Steady steps, the rank that sends most (a pipeline's ranks differ)."""
    rows = run_ranks(step_rows, 2, tmp_path, strategy)
    workload = _spec(strategy, 2).build_workload()
    job = job_for(strategy.split("-")[0], OPTIONS.get(strategy, {}), 2, workload, microbatches=M,
                  n_blocks=len(workload.blocks()))
    pred = predict(profile(workload, repeats=1), job, Target(cores=2))
    measured = max(row["bytes_sent"] for r in rows for row in r[1:])
    assert measured == pred.bytes_intra + pred.bytes_inter
