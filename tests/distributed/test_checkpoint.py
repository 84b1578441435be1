"""Sharded checkpoints: exact resume, resharding across world sizes and
strategies, commit markers, and what a broken checkpoint is told."""
import json
import os

import pytest
import torch

from orchestrator import checkpoint
from orchestrator.checkpoint import CheckpointError, Checkpointer
from orchestrator.config import JobSpec
from orchestrator.trainer import RankTrainer
from tests.distributed.test_ddp import full_state
from tests.ranks import run_ranks

GPT = {"name": "gpt-tiny", "n_layers": 2, "d_model": 64, "seq_len": 64}


def _trainer(rank, world, strategy, steps=6, workload=GPT):
    spec = JobSpec(workload=workload, strategy=strategy, workers=world, steps=steps, batch_size=8, seed=5)
    return RankTrainer(spec, rank=rank, world=world, device=torch.device("cpu")), spec


def _meta(trainer, spec):
    return {"workload": spec.workload.name, "strategy": spec.strategy.name,
            "format": trainer.strategy.checkpoint_format, "shapes": checkpoint.model_shapes(trainer.workload)}


def train_and_save(rank, world, strategy, run_url, save_at, steps=6):
    t, spec = _trainer(rank, world, strategy, steps)
    ck = Checkpointer(run_url, every=save_at, keep=2, rank=rank, world=world, meta=_meta(t, spec))
    losses = []
    while t.step < steps:
        losses.append(t.train_step()["loss"])
        if ck.due(t.step):
            ck.save(t)
    return {"losses": losses, "state": full_state(t.strategy.module)}


def resume_and_train(rank, world, strategy, url, steps=6):
    t, _ = _trainer(rank, world, strategy, steps)
    checkpoint.restore(t, url)
    start = t.step
    losses = [t.train_step()["loss"] for _ in range(steps - start)]
    return {"start": start, "losses": losses, "state": full_state(t.strategy.module)}


def _same(a, b, exact=True):
    for k in b:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:  # a different world size sums in a different order
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_resume_is_bit_identical(tmp_path, strategy):
    run_url = str(tmp_path / "run")
    full = run_ranks(train_and_save, 2, tmp_path, strategy, run_url, 3)
    url = checkpoint.step_url(run_url, 3)
    resumed = run_ranks(resume_and_train, 2, tmp_path, strategy, url)
    for f, r in zip(full, resumed):
        assert r["start"] == 3
        assert r["losses"] == f["losses"][3:]  # steps 4-6: same batches, same numbers
        _same(r["state"], f["state"])


# ddp -> ddp is the easy case of the two below (replicated tensors); not repeated here.
@pytest.mark.slow
@pytest.mark.parametrize("saved, loaded", [("fsdp", "fsdp"), ("fsdp", "ddp")])
def test_reshard_4_to_2(tmp_path, saved, loaded):
    """Written by 4 ranks, read by 2: same parameters, and training goes on from the same step."""
    run_url = str(tmp_path / "run")
    at_save = run_ranks(train_and_save, 4, tmp_path, saved, run_url, 3, 3)
    url = checkpoint.step_url(run_url, 3)
    after = run_ranks(resume_and_train, 2, tmp_path, loaded, url, 3)  # 0 further steps
    for r in after:
        assert r["start"] == 3 and r["losses"] == []
        _same(r["state"], at_save[0]["state"])


@pytest.mark.slow
def test_reshard_2_to_4(tmp_path):
    run_url = str(tmp_path / "run")
    at_save = run_ranks(train_and_save, 2, tmp_path, "fsdp", run_url, 3, 3)
    for r in run_ranks(resume_and_train, 4, tmp_path, "fsdp", checkpoint.step_url(run_url, 3), 3):
        _same(r["state"], at_save[0]["state"])


def test_latest_skips_uncommitted_and_broken(tmp_path):
    run_url = str(tmp_path / "run")
    run_ranks(train_and_save, 2, tmp_path, "ddp", run_url, 2, 6)  # keeps step 4 and step 6
    t, spec = _trainer(0, 1, "single")
    meta = _meta(t, spec)
    assert [s for s, _ in checkpoint.committed(run_url)] == [6, 4]
    os.remove(os.path.join(checkpoint.step_url(run_url, 6), "COMMITTED"))  # a write that never finished
    url, found, notes = checkpoint.resolve("latest", run_url=run_url, fmt="dcp", shapes=meta["shapes"])
    assert found["step"] == 4 and notes == []
    # truncate a shard of step 4: `latest` now has nothing loadable, and says why
    state = os.path.join(url, "state")
    shard = next(f for f in os.listdir(state) if f.endswith(".distcp"))
    with open(os.path.join(state, shard), "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match=rf"{shard}: truncated \(100 bytes, metadata needs \d+\)"):
        checkpoint.check(url, fmt="dcp", shapes=meta["shapes"])
    with pytest.raises(CheckpointError, match="no loadable committed checkpoint.*skipping checkpoint"):
        checkpoint.resolve("latest", run_url=run_url, fmt="dcp", shapes=meta["shapes"])


def test_falls_back_to_previous_committed(tmp_path):
    run_url = str(tmp_path / "run")
    run_ranks(train_and_save, 2, tmp_path, "ddp", run_url, 2, 6)
    shapes = checkpoint.model_shapes(_trainer(0, 1, "single")[0].workload)
    with open(os.path.join(checkpoint.step_url(run_url, 6), "trainer.json"), "w") as f:
        f.write("{not json")
    url, meta, notes = checkpoint.resolve("latest", run_url=run_url, fmt="dcp", shapes=shapes)
    assert meta["step"] == 4 and len(notes) == 1 and "step_6/trainer.json: unreadable" in notes[0]


def test_other_model_and_format_are_refused(tmp_path):
    run_url = str(tmp_path / "run")
    run_ranks(train_and_save, 2, tmp_path, "ddp", run_url, 3, 3)
    url = checkpoint.step_url(run_url, 3)
    bigger = JobSpec(workload={**GPT, "d_model": 128}, strategy="ddp", workers=2).build_workload()
    with pytest.raises(CheckpointError, match=r"from another model .*: \S+ is \[\d+(, \d+)*\] there, \[\d+"):
        checkpoint.check(url, fmt="dcp", shapes=checkpoint.model_shapes(bigger))
    with pytest.raises(CheckpointError, match="written in format 'dcp' by strategy 'ddp'; this strategy reads 'deepspeed'"):
        checkpoint.check(url, fmt="deepspeed", shapes={})
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        checkpoint.check(str(tmp_path / "nope"), fmt="dcp", shapes={})
    json.loads(open(os.path.join(url, "trainer.json")).read())  # stays readable
