"""Sharded checkpoints: exact resume, resharding across world sizes and
strategies, commit markers, and what a broken checkpoint is told."""
import io
import json
import os
import pickle
import shutil

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


def resume_and_save(rank, world, strategy, url, run_url, save_at, steps):
    t, spec = _trainer(rank, world, strategy, steps)
    checkpoint.restore(t, url)
    ck = Checkpointer(run_url, every=save_at, keep=2, rank=rank, world=world, meta=_meta(t, spec))
    while t.step < steps:
        t.train_step()
        if ck.due(t.step):
            ck.save(t)


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


# -- verification against the manifest ----------------------------------------------------------


def flip_float_bit(file: str, tensor: torch.Tensor) -> None:
    """Flip the top exponent bit of the first float of ``tensor``, whose bytes ``file`` holds."""
    with open(file, "r+b") as f:
        data = f.read()
        at = data.index(tensor.detach().contiguous().numpy().tobytes()) + 3  # little-endian: sign and exponent byte
        f.seek(at)
        f.write(bytes([data[at] ^ 0x40]))


def flip_dcp_weight(state: str) -> str:
    """Flip one bit of one float of a model weight in a DCP folder; returns the shard's name."""
    from strategies.dcp import read_metadata

    key, info = next((k, v) for k, v in read_metadata(state).storage_data.items() if k.fqn.endswith("weight"))
    with open(os.path.join(state, info.relative_path), "rb") as f:
        f.seek(info.offset)
        weight = torch.load(io.BytesIO(f.read(info.length)), weights_only=True)
    flip_float_bit(os.path.join(state, info.relative_path), weight)
    return info.relative_path


def _one_line_errors(excinfo, world: int) -> list[str]:
    """The CheckpointError line each rank raised (run_ranks joins their tracebacks)."""
    prefix = f"{CheckpointError.__module__}.CheckpointError: "  # the module that defines it (orchestrator.errors)
    lines = [ln for ln in str(excinfo.value).splitlines() if ln.startswith(prefix)]
    assert len(lines) == world, str(excinfo.value)
    return [ln.removeprefix(prefix) for ln in lines]


def test_flipped_bit_in_a_shard_fails_restore_and_latest_falls_back(tmp_path):
    """The driver reads no shard (sizes are unchanged, so check passes); the ranks
    hash their shares before loading, all fail with the one line naming the
    file, and mark the checkpoint so that `latest` falls back past it."""
    run_url = str(tmp_path / "run")
    run_ranks(train_and_save, 2, tmp_path, "ddp", run_url, 2, 4)  # steps 2 and 4
    shapes = checkpoint.model_shapes(_trainer(0, 1, "single")[0].workload)
    url = checkpoint.step_url(run_url, 4)
    shard = flip_dcp_weight(os.path.join(url, "state"))
    assert checkpoint.check(url, fmt="dcp", shapes=shapes)["manifest"] == "sha256"
    with pytest.raises(AssertionError) as e:
        run_ranks(resume_and_train, 2, tmp_path, "ddp", url)
    errors = _one_line_errors(e, 2)
    assert errors[0] == errors[1] and errors[0].startswith(f"{url}/state/{shard}: does not match the manifest"), errors
    found, meta, notes = checkpoint.resolve("latest", run_url=run_url, fmt="dcp", shapes=shapes)
    assert meta["step"] == 2 and len(notes) == 1
    assert f"step_4: found corrupt when last loaded ({url}/state/{shard}: does not match" in notes[0], notes
    with pytest.raises(CheckpointError, match=f"state/{shard}: does not match the manifest"):
        checkpoint.check(url, fmt="dcp", shapes=shapes)  # an explicit --resume of it: one line, exit 2
    run_ranks(resume_and_save, 2, tmp_path, "ddp", found, run_url, 2, 4)  # the restart saves step 4 anew
    assert checkpoint.check(url, fmt="dcp", shapes=shapes)["step"] == 4


class _MakesAFolder:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_metadata_is_verified_before_it_is_unpickled(tmp_path):
    run_url = str(tmp_path / "run")
    full = run_ranks(train_and_save, 2, tmp_path, "ddp", run_url, 3)
    shapes = checkpoint.model_shapes(_trainer(0, 1, "single")[0].workload)
    url = checkpoint.step_url(run_url, 3)
    metadata = os.path.join(url, "state", ".metadata")
    good = open(metadata, "rb").read()
    evidence = tmp_path / "code-ran"
    with open(metadata, "wb") as f:
        pickle.dump(_MakesAFolder(str(evidence)), f)
    with pytest.raises(CheckpointError, match=r"state/\.metadata: does not match the manifest \(\d+ bytes"):
        checkpoint.check(url, fmt="dcp", shapes=shapes)
    assert not evidence.exists()
    with open(metadata, "wb") as f:
        f.write(good)
    # truncated, missing and added files are caught from one listing, without reading them
    rng = os.path.join(url, "rng_rank1.pt")
    rng_bytes = open(rng, "rb").read()
    with open(rng, "r+b") as f:
        f.truncate(10)
    with pytest.raises(CheckpointError, match=r"/rng_rank1\.pt: truncated \(10 bytes, the manifest says \d+\)$"):
        checkpoint.check(url, fmt="dcp", shapes=shapes)
    os.remove(rng)
    with pytest.raises(CheckpointError, match=r"/rng_rank1\.pt: missing$"):
        checkpoint.check(url, fmt="dcp", shapes=shapes)
    with open(rng, "wb") as f:
        f.write(rng_bytes)
    with open(os.path.join(url, "state", "notes.txt"), "w") as f:
        f.write("added later")
    with pytest.raises(CheckpointError, match=r"state/notes\.txt: not in the manifest"):
        checkpoint.check(url, fmt="dcp", shapes=shapes)
    os.remove(os.path.join(url, "state", "notes.txt"))
    # a manifest lost from a checkpoint that had one is refused
    shutil.rmtree(os.path.join(url, "manifest"))
    with pytest.raises(CheckpointError, match=r"/manifest: missing \(trainer.json says it was written\)"):
        checkpoint.check(url, fmt="dcp", shapes=shapes)
    # one written before manifests existed passes without `manifest` in its metadata
    # (the driver warns, one line) and the ranks load it
    record = json.loads(open(os.path.join(url, "trainer.json")).read())
    del record["manifest"]
    with open(os.path.join(url, "trainer.json"), "w") as f:
        json.dump(record, f)
    assert "manifest" not in checkpoint.check(url, fmt="dcp", shapes=shapes)
    assert "\n" not in checkpoint.NO_MANIFEST
    resumed = run_ranks(resume_and_train, 2, tmp_path, "ddp", url)
    assert resumed[0]["losses"] == full[0]["losses"][3:]


def test_shares_split_files_by_bytes():
    sizes = {"a": 100, "b": 60, "c": 50, "d": 10, "e": 1}
    got = checkpoint.shares(sizes, 2)
    assert got == [["a", "d", "e"], ["b", "c"]]  # 111 and 110 bytes
    assert sorted(sum(got, [])) == sorted(sizes)
    assert checkpoint.shares(sizes, 8)[5:] == [[], [], []]  # more ranks than files: some hash nothing
