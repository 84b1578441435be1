"""What a rank reports of where it is (read by the driver to name a hung rank):
the step it began and the communication calls it entered in that step."""
import torch

from orchestrator.config import JobSpec
from orchestrator.trainer import RankTrainer
from tests.ranks import run_ranks

W = {"name": "gpt-tiny", "n_layers": 1, "d_model": 32, "seq_len": 32}


def train(rank: int, world: int) -> list[dict]:
    spec = JobSpec(workload=W, strategy="ddp", workers=world, steps=2, batch_size=4)
    trainer = RankTrainer(spec, rank=rank, world=world, device=torch.device("cpu"))
    seen = []
    inner = trainer.strategy.train_step

    def step(micro):  # where the driver's poll would find this rank at the end of the step's work
        stats = inner(micro)
        seen.append(trainer.progress())
        return stats

    trainer.strategy.train_step = step
    for _ in range(2):
        trainer.train_step()
    return seen + [trainer.progress()]


def test_progress_counts_the_steps_calls(tmp_path):
    out = run_ranks(train, 2, tmp_path)
    for seen in out:
        (first, second, after) = seen
        assert first["step"] == 1 and second["step"] == 2 and after["step"] == 2
        assert first["ops"] >= 1 and first["op"] == "all_reduce"  # DDP's gradient buckets
        assert first["ops"] == second["ops"]  # the same calls every step
    assert out[0][0]["ops"] == out[1][0]["ops"]  # and on every rank: a rank behind is one that entered fewer
