import torch

from orchestrator.config import JobSpec
from orchestrator.trainer import RankTrainer


def test_resnet_tiny_accuracy_rises_far_above_chance():
    """300 steps of `single` (batch 8). Chance is 10%; measured on a 2-core CPU:
    ~55-60% training accuracy over steps 281-300, ~6 s."""
    torch.set_num_threads(1)  # the suite runs two test processes on two cores
    spec = JobSpec(workload="resnet-tiny", strategy="single", steps=300, seed=0)
    trainer = RankTrainer(spec, rank=0, world=1, device=torch.device("cpu"))
    rows = [trainer.train_step() for _ in range(spec.steps)]
    assert sum(r["accuracy"] for r in rows[:20]) / 20 < 0.3
    assert sum(r["accuracy"] for r in rows[-20:]) / 20 > 0.4
