"""Bring your own model: a workload defined in this file, trained with ddp on 2 workers.

    python docs/examples/custom_workload.py
    polytrain run --workload docs/examples/custom_workload.py:SineMLP --strategy ddp --workers 2 --steps 100

A workload is a pydantic model: typed fields are its options (validated, listed
by `polytrain workloads`, settable with --set workload.hidden=128); four methods
say what is trained. Every strategy, scenario and report then works on it.
"""
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from workloads import TensorSource, Workload, register_workload


@register_workload("sine-mlp")
class SineMLP(Workload):
    """A small MLP regressing y = sin(3x) from noisy samples."""

    hidden: int = Field(64, ge=1, description="hidden units per layer")
    samples: int = Field(4096, ge=16, description="training samples")
    noise: float = Field(0.05, ge=0, description="std of the label noise")

    def blocks(self) -> list[nn.Module]:
        # ordered blocks: pipeline strategies cut between them
        return [nn.Sequential(nn.Linear(1, self.hidden), nn.Tanh()),
                nn.Sequential(nn.Linear(self.hidden, self.hidden), nn.Tanh()),
                nn.Linear(self.hidden, 1)]

    def source(self) -> TensorSource:
        # any object with __len__ and gather(indices) -> tuple of tensors; batch[0] feeds the model
        g = torch.Generator().manual_seed(0)
        x = torch.rand(self.samples, 1, generator=g) * 4 - 2
        y = torch.sin(3 * x) + self.noise * torch.randn(self.samples, 1, generator=g)
        return TensorSource(x, y)

    def loss(self, output: torch.Tensor, batch) -> torch.Tensor:
        return F.mse_loss(output, batch[1])


if __name__ == "__main__":
    import argparse

    from orchestrator import JobSpec, run
    from orchestrator.config import DEFAULT_STORAGE

    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--storage", default=DEFAULT_STORAGE)
    a = p.parse_args()
    result = run(JobSpec(workload="sine-mlp", strategy="ddp", workers=2, steps=a.steps, storage=a.storage,
                         optim={"lr": 1e-2, "warmup_steps": 10}))
    by_step = result.metrics.groupby("step").loss.mean()
    print(f"loss: first step {by_step.iloc[0]:.4f}, last step {by_step.iloc[-1]:.4f}; run folder {result.url}")
