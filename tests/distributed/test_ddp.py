"""ddp on 2 gloo ranks, each on half of every global batch, against `single`
on the whole batch: same data, same seed, same parameters and buffers after 5 steps."""
import pytest
import torch

from orchestrator.config import JobSpec
from orchestrator.trainer import RankTrainer
from tests.ranks import run_ranks

# fp32 on CPU: the only differences are the order of floating-point sums (in the
# all-reduce, the batch split, batch-norm statistics), so parameters agree to
# ~1e-6 after 5 AdamW steps.
RTOL, ATOL = 1e-5, 1e-5

WORKLOADS = {
    "gpt-tiny": {"name": "gpt-tiny", "n_layers": 2, "d_model": 64, "seq_len": 64},
    "mlp-wide": {"name": "mlp-wide", "in_dim": 64, "hidden": 256, "layers": 2, "n_samples": 512},
    # batch norm: checks that statistics are over the global batch and running stats match
    "resnet-tiny": {"name": "resnet-tiny", "width": 8, "n_samples": 256},
}


def _spec(workload: dict, strategy: str, workers: int, **kw) -> JobSpec:
    return JobSpec(workload=workload, strategy=strategy, workers=workers, steps=5, batch_size=8, seed=3, **kw)


def train_state(rank: int, world: int, workload: dict, strategy: str, grad_accum: int = 1) -> dict:
    spec = _spec(workload, strategy, world, grad_accum=grad_accum)
    trainer = RankTrainer(spec, rank=rank, world=world, device=torch.device("cpu"))
    losses = [trainer.train_step()["loss"] for _ in range(spec.steps)]
    return {"state": full_state(trainer.strategy.module), "losses": losses}


def full_state(module) -> dict:
    """The unsharded state dict (FSDP's DTensors gathered), on CPU."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in module.state_dict().items()}


def _assert_same(got: dict, ref: dict) -> None:
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=RTOL, atol=ATOL, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_ddp_matches_single(tmp_path, name):
    ref = train_state(0, 1, WORKLOADS[name], "single")
    out = run_ranks(train_state, 2, tmp_path, WORKLOADS[name], "ddp")
    for r in out:
        _assert_same(r["state"], ref["state"])
    # each rank's loss is over its half; their mean is the full-batch loss
    mean_losses = [(a + b) / 2 for a, b in zip(out[0]["losses"], out[1]["losses"])]
    torch.testing.assert_close(torch.tensor(mean_losses), torch.tensor(ref["losses"]), rtol=1e-5, atol=1e-5)


def test_ddp_with_accumulation_matches_single(tmp_path):
    """2 ranks x 2 micro-batches of 2 against 1 process on 8 (no batch norm here:
    batch statistics depend on the micro-batch, by definition)."""
    ref = train_state(0, 1, WORKLOADS["gpt-tiny"], "single")
    out = run_ranks(train_state, 2, tmp_path, WORKLOADS["gpt-tiny"], "ddp", 2)
    for r in out:
        _assert_same(r["state"], ref["state"])


def test_training_changes_the_parameters():
    """Guards the comparisons above against a strategy that never updates."""
    spec = _spec(WORKLOADS["resnet-tiny"], "single", 1)
    init = RankTrainer(spec, rank=0, world=1, device=torch.device("cpu")).strategy.module.state_dict()
    trained = train_state(0, 1, WORKLOADS["resnet-tiny"], "single")["state"]
    changed = [k for k in init if not torch.allclose(init[k].float(), trained[k].float())]
    assert any("running_mean" in k for k in changed) and any("weight" in k for k in changed)


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_fsdp_matches_single(tmp_path, name):
    """FSDP2 over 2 ranks: sharded parameters gathered back equal single's (1e-5)."""
    ref = train_state(0, 1, WORKLOADS[name], "single")
    for r in run_ranks(train_state, 2, tmp_path, WORKLOADS[name], "fsdp"):
        _assert_same(r["state"], ref["state"])
