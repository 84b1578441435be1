"""DeepSpeed ZeRO stages 1-3 on 2 gloo ranks against `single` on the whole batch,
their per-rank memory against ddp's, a zero2 checkpoint round trip, and option checks.

Each stage is trained once per module (fixture ``runs``) and the results reused.
"""
import pytest
import torch

import strategies.zero  # noqa: F401  registers zero1-3
from orchestrator.config import ConfigError, JobSpec
from orchestrator.trainer import RankTrainer
from tests.distributed.test_ddp import WORKLOADS, _assert_same, _spec
from tests.ranks import run_ranks

# fp32 on CPU. DeepSpeed also keeps an fp32 master copy, clips with g / ((norm + 1e-6) / clip)
# rather than g * (clip / (norm + 1e-6)) and sums the gradient norm in its own order; measured:
# parameters differ from single's by at most 2.3e-7 after 5 AdamW steps (ddp: the same), so
# ddp's tolerance holds.
RTOL, ATOL = 1e-5, 1e-5
GPT = WORKLOADS["gpt-tiny"]


def _trainer(rank: int, world: int, strategy, grad_accum: int = 1) -> RankTrainer:
    import strategies.zero  # noqa: F401  registers zero1-3 in this (spawned) process

    return RankTrainer(_spec(GPT, strategy, world, grad_accum=grad_accum), rank=rank, world=world,
                       device=torch.device("cpu"))


def full_state(strategy) -> dict:
    """The whole state dict on every rank (zero3's partitions gathered)."""
    module = strategy.module
    if getattr(strategy, "stage", 0) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            return {k: v.detach().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def train(rank: int, world: int, strategy, steps: int = 5, grad_accum: int = 1) -> dict:
    trainer = _trainer(rank, world, strategy, grad_accum)
    rows = [trainer.train_step() for _ in range(steps)]
    memory = trainer.strategy.memory_bytes()
    return {"state": full_state(trainer.strategy), "losses": [r["loss"] for r in rows],
            "rows": rows, "memory": memory, "eval": trainer.evaluate()}


def train_and_save(rank: int, world: int, strategy, steps: int, url: str) -> dict:
    trainer = _trainer(rank, world, strategy)
    for _ in range(steps):
        trainer.train_step()
    trainer.strategy.save_checkpoint(url)
    return trainer.loader.state_dict()


def load_and_train(rank: int, world: int, strategy, steps: int, url: str, loader_state: dict) -> dict:
    trainer = _trainer(rank, world, strategy)
    trainer.strategy.load_checkpoint(url)
    trainer.loader.load_state_dict(loader_state)
    losses = [trainer.train_step()["loss"] for _ in range(steps)]
    return {"state": full_state(trainer.strategy), "losses": losses}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    out = {"single": train(0, 1, "single")}
    for name in ("ddp", "zero1", "zero2", "zero3"):  # a fresh folder each: run_ranks' store is per function
        out[name] = run_ranks(train, 2, tmp_path_factory.mktemp(name), name)
    return out


@pytest.mark.parametrize("stage", ["zero1", "zero2", "zero3"])
def test_zero_matches_single(runs, stage):
    ref = runs["single"]
    for r in runs[stage]:
        _assert_same(r["state"], ref["state"])
    mean_losses = [(a + b) / 2 for a, b in zip(runs[stage][0]["losses"], runs[stage][1]["losses"])]
    torch.testing.assert_close(torch.tensor(mean_losses), torch.tensor(ref["losses"]), rtol=1e-5, atol=1e-5)
    for row in runs[stage][0]["rows"]:
        assert row["bytes_sent"] > 0 and row["grad_norm"] > 0 and row["lr"] > 0
    for r in runs[stage]:  # held-out loss through DeepSpeed's forward: the whole figure on every rank
        assert r["eval"]["val_loss"] == pytest.approx(ref["eval"]["val_loss"], rel=1e-5)


@pytest.mark.parametrize("stage,key", [("zero1", "optim_bytes"), ("zero2", "grad_bytes"), ("zero3", "param_bytes")])
def test_zero_shards_memory(runs, stage, key):
    ddp = runs["ddp"][0]["memory"][key]
    for r in runs[stage]:
        assert r["memory"][key] == pytest.approx(ddp / 2, rel=0.1), (stage, key, r["memory"], ddp)


def test_zero_bytes_per_step(runs):
    """DeepSpeed's stage 1/2 reduce gradients with bucketed all-reduces (its default
    use_multi_rank_bucket_allreduce; each rank keeps its slice), then all-gather the
    updated fp32 parameters: ddp's all-reduce plus (w-1)/w of the model, i.e. 1.5x
    ddp's bytes on 2 ranks, plus two 4-byte norm all-reduces."""
    ddp = runs["ddp"][0]["rows"][-1]["bytes_sent"]
    for stage in ("zero1", "zero2"):
        got = runs[stage][0]["rows"][-1]["bytes_sent"]
        assert got == pytest.approx(1.5 * ddp, rel=0.001), (stage, got, ddp)


def test_zero2_checkpoint_resumes_exactly(runs, tmp_path):
    url = str(tmp_path / "ckpt")
    loader_state = run_ranks(train_and_save, 2, tmp_path, "zero2", 3, url)[0]
    resumed = run_ranks(load_and_train, 2, tmp_path, "zero2", 2, url, loader_state)
    for r, full in zip(resumed, runs["zero2"]):
        assert r["losses"] == full["losses"][3:]
        for k, v in full["state"].items():
            assert torch.equal(r["state"][k], v), k


def test_zero_with_accumulation_matches_single(runs, tmp_path):
    """2 ranks x 2 micro-batches of 2 against 1 process on 8."""
    for r in run_ranks(train, 2, tmp_path, "zero2", 5, 2):
        _assert_same(r["state"], runs["single"]["state"])


def test_contradicting_stage_is_one_line_error():
    with pytest.raises(ConfigError) as e:
        JobSpec(workload=GPT, strategy={"name": "zero3", "ds_config": {"zero_optimization": {"stage": 1}}},
                workers=2, steps=5, batch_size=8)
    msg = str(e.value)
    assert "\n" not in msg and "zero_optimization.stage=1" in msg and "stage 3" in msg, msg
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu"):
        JobSpec(workload=GPT, strategy={"name": "zero2", "ds_config": {"train_micro_batch_size_per_gpu": 4}},
                workers=2, steps=5, batch_size=8)


SLOW_NET = "per_node=1,inter=1gbit,latency=5ms"


def floored_step(rank: int, world: int, strategy: str) -> dict:
    """One step under a simulated network, with every floor the model gave recorded."""
    import strategies.zero  # noqa: F401

    trainer = RankTrainer(_spec(GPT, strategy, world, scenario=SLOW_NET), rank=rank, world=world,
                          device=torch.device("cpu"))
    trainer.train_step()  # set-up traffic and DeepSpeed's first-step allocations
    model, floors = trainer.comm._ledger.floor, []
    trainer.comm.set_floor(lambda *call: floors.append(model(*call)) or floors[-1])
    row = trainer.train_step()
    return {"floors": floors, "row": row}


@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_every_collective_pays_the_network_model(tmp_path, strategy):
    """zero's collectives (DeepSpeed's own) take Comm's one path as ddp's do: each is
    floored by the scenario, and the step's communication lasts at least the longest."""
    for r in run_ranks(floored_step, 2, tmp_path, strategy):
        floors, row = r["floors"], r["row"]
        assert floors and all(f >= 0.005 for f in floors), (strategy, floors)
        assert row["comm_s"] >= max(floors) - 1e-3, (strategy, row["comm_s"], max(floors))
        assert row["step_time_s"] >= max(floors)


def _largest_float(obj, best=None):
    """The largest float32 tensor anywhere in a loaded DeepSpeed file."""
    if isinstance(obj, torch.Tensor):
        return obj if obj.dtype == torch.float32 and (best is None or obj.numel() > best.numel()) else best
    children = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    for child in children:
        best = _largest_float(child, best)
    return best


def test_zero_checkpoint_is_verified(tmp_path):
    """DeepSpeed's files are in the manifest too: a truncated one is refused on
    the driver (one listing), a flipped bit by the ranks before DeepSpeed loads."""
    import os

    from orchestrator import checkpoint
    from tests.distributed.test_checkpoint import _one_line_errors, flip_float_bit, resume_and_train, train_and_save

    run_url = str(tmp_path / "run")
    run_ranks(train_and_save, 2, tmp_path, "zero2", run_url, 2, 2)
    url = checkpoint.step_url(run_url, 2)
    shapes = checkpoint.model_shapes(_trainer(0, 1, "single").workload)
    state = os.path.join(url, "state", "polytrain")
    optim = next(f for f in sorted(os.listdir(state)) if f.endswith("optim_states.pt"))
    file = os.path.join(state, optim)
    good = open(file, "rb").read()
    with open(file, "r+b") as f:
        f.truncate(len(good) // 2)
    with pytest.raises(checkpoint.CheckpointError, match=rf"polytrain/{optim}: truncated \(\d+ bytes, the manifest"):
        checkpoint.check(url, fmt="deepspeed", shapes=shapes)
    with open(file, "wb") as f:
        f.write(good)
    assert all(r["start"] == 2 for r in run_ranks(resume_and_train, 2, tmp_path, "zero2", url, 2))  # intact: loads
    flip_float_bit(file, _largest_float(torch.load(file, weights_only=False)))
    assert checkpoint.check(url, fmt="deepspeed", shapes=shapes)["step"] == 2  # the driver reads no shard
    with pytest.raises(AssertionError) as e:
        run_ranks(resume_and_train, 2, tmp_path, "zero2", url, 2)
    errors = _one_line_errors(e, 2)
    assert errors[0] == errors[1] and errors[0].startswith(f"{url}/state/polytrain/{optim}: does not match"), errors
