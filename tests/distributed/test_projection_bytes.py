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
M = 2  # micro-batches per rank's share of the global batch (N x M micro-batches a step, as the projection takes)
OPTIONS = {"powersgd": {"warmup_steps": 0}, "sequence": {"ulysses": 2}}


def _spec(strategy: str, world: int) -> JobSpec:
    name = strategy.split("-")[0]
    options = {"name": name, **OPTIONS.get(strategy, {})}
    batch = 4 * M * world  # the same global batch at every row
    if name == "pipeline":  # one replica of `world` stages: world x M micro-batches
        return JobSpec(workload=GPT, strategy={**options, "microbatches": M * world}, workers=world, steps=3,
                       batch_size=batch)
    share = world if name == "sequence" else 1  # ranks of one replica
    return JobSpec(workload=GPT, strategy=options, workers=world, steps=3, batch_size=batch, grad_accum=M * share)


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
