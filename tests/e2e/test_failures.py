"""Failures on Ray: workers killed (by injection and from outside), hung, or killed
while writing a checkpoint; the run recovers and ends with exactly the
parameters of an uninterrupted run. Exhausted retries fail cleanly."""
import os
import signal
import threading
import time
import warnings

import pandas as pd
import pytest
import torch

from orchestrator import JobSpec, run
from orchestrator.checkpoint import check, committed, model_shapes, restore
from orchestrator.trainer import RankTrainer
from tests.e2e.procs import session_actor_pids

W = {"name": "gpt-tiny", "n_layers": 1, "d_model": 32, "seq_len": 32}
STEPS = 12


def _run(tmp_path, run_id: str, ray_address: str, checkpoint_every: int = 4, strategy: str = "ddp", **kw):
    spec = JobSpec(workload=W, strategy=strategy, workers=2, steps=STEPS, batch_size=8, seed=7, storage=str(tmp_path),
                   run_id=run_id, checkpoint_every=checkpoint_every, cluster={"address": ray_address}, **kw)
    return run(spec, progress=False)


def final_params(url: str) -> dict:
    """The state of a run's final checkpoint, loaded into one process."""
    spec = JobSpec(workload=W, strategy="single", steps=STEPS, batch_size=8, seed=7)
    trainer = RankTrainer(spec, rank=0, world=1, device=torch.device("cpu"))
    with warnings.catch_warnings():  # DCP: "assuming the intent is to load in a single process" (it is)
        warnings.simplefilter("ignore")
        restore(trainer, url)
    assert trainer.step == STEPS
    return {k: v.clone() for k, v in trainer.strategy.module.state_dict().items()}


def _assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # CPU, same seed, same data: bit for bit


@pytest.fixture(scope="module")
def baseline(ray_address, tmp_path_factory):
    result = _run(tmp_path_factory.mktemp("clean"), "clean", ray_address)
    return final_params(result.checkpoint)


@pytest.fixture(scope="module")
def fsdp_baseline(ray_address, tmp_path_factory):
    result = _run(tmp_path_factory.mktemp("clean-fsdp"), "clean-fsdp", ray_address, strategy="fsdp")
    return final_params(result.checkpoint)


@pytest.mark.slow
def test_kill_and_hang_recover_to_the_uninterrupted_parameters(ray_address, tmp_path, baseline):
    # the full restart, as for strategies that cannot heal in place (healing: the tests below)
    result = _run(tmp_path, "faults", ray_address, checkpoint_every=STEPS,  # only the final one: restore snapshots
                  inject=["kill:rank=1,step=5", "hang:rank=0,step=9"], failure={"max_failures": 2, "snapshot_every": 3, "hang_floor_s": 10, "backoff_s": 0.1, "heal": False})
    ev = result.events
    assert list(ev[ev.kind.str.startswith("failure:")].kind) == ["failure:died", "failure:hang"]
    restarts = ev[ev.kind == "restart"]
    assert list(restarts.step) == [3, 6]  # the newest whole snapshots: step 3, then step 6
    assert restarts.detail.str.contains("in-memory snapshot").all()
    assert (ev.kind == "recovered").sum() == 2
    _assert_identical(final_params(result.checkpoint), baseline)
    df = result.metrics
    assert set(df.attempt) == {0.0, 1.0, 2.0}  # redone steps are kept, tagged with their attempt


@pytest.mark.slow
def test_a_kill_during_a_checkpoint_write_recovers_from_the_previous_checkpoint(ray_address, tmp_path, baseline):
    result = _run(tmp_path, "ckpt", ray_address, inject=["kill:rank=1,step=8,at=checkpoint"],
                  failure={"max_failures": 1, "snapshots": False, "backoff_s": 0.1, "heal": False})
    ev = result.events
    restart = ev[ev.kind == "restart"].iloc[0]
    assert restart.step == 4 and "checkpoint" in restart.detail
    _assert_identical(final_params(result.checkpoint), baseline)


def _pids(ev: pd.DataFrame, kind: str) -> dict[int, int]:
    """rank -> the pid its events of ``kind`` name (the last of each rank)."""
    rows = ev[ev.kind == kind]
    return {int(r.rank): int(r.detail.split("pid ")[1].split()[0].rstrip(":;")) for r in rows.itertuples()}


@pytest.mark.slow
def test_ddp_heals_in_place_keeping_the_survivors_processes(ray_address, tmp_path, baseline):
    """A kill, then a hang of another rank: each time only the lost rank's worker
    is new, the survivor keeps its process and gives its state (at most the
    failed step is redone), and the run ends bit-identical to the clean one."""
    result = _run(tmp_path, "heal", ray_address, checkpoint_every=STEPS,
                  inject=["kill:rank=1,step=5", "hang:rank=0,step=9"],
                  failure={"max_failures": 2, "snapshot_every": 3, "hang_floor_s": 4, "backoff_s": 30})
    ev = result.events
    assert list(ev[ev.kind.str.startswith("failure:")].kind) == ["failure:died", "failure:hang"]
    heals = ev[ev.kind == "heal"]
    assert list(heals["rank"]) == [1, 0] and (ev.kind == "restart").sum() == 0  # no backoff_s waited either
    assert list(heals.step) == [4, 8]  # the survivors' own state: only the failed step is redone
    first = _pids(ev[ev.detail.str.contains("pid") & (ev.kind == "phase:worker_setup")].iloc[:2], "phase:worker_setup")
    reform = ev[ev.kind == "heal:reform"]
    once = _pids(reform.iloc[:2], "heal:reform")
    assert once[0] == first[0] and once[1] != first[1]  # rank 0 kept its process, rank 1's is new
    twice = _pids(reform.iloc[2:], "heal:reform")
    assert twice[1] == once[1] and twice[0] != once[0]
    assert {"heal:detect", "heal:reform", "heal:transfer", "heal:first_step", "recovered"} <= set(ev.kind)
    _assert_identical(final_params(result.checkpoint), baseline)
    assert set(result.metrics.attempt) == {0.0, 1.0, 2.0}


@pytest.mark.slow
def test_fsdp_heals_in_place_from_the_snapshot(ray_address, tmp_path, fsdp_baseline):
    """FSDP's shards of the lost rank are held by no peer: every rank restores the
    in-memory snapshot on the re-formed group, the survivor in its own process."""
    result = _run(tmp_path, "heal-fsdp", ray_address, checkpoint_every=STEPS, strategy="fsdp",
                  inject=["kill:rank=0,step=6"], failure={"max_failures": 1, "snapshot_every": 4, "backoff_s": 30})
    ev = result.events
    heal = ev[ev.kind == "heal"]
    assert len(heal) == 1 and heal.step.iloc[0] == 4 and "in-memory snapshot" in heal.detail.iloc[0]
    first = _pids(ev[ev.kind == "phase:worker_setup"].iloc[:2], "phase:worker_setup")
    once = _pids(ev[ev.kind == "heal:reform"], "heal:reform")
    assert once[1] == first[1] and once[0] != first[0]
    _assert_identical(final_params(result.checkpoint), fsdp_baseline)


@pytest.mark.slow
def test_a_worker_killed_from_outside_is_replaced(ray_address, tmp_path, baseline):
    folder = tmp_path / "outside"
    killed = []

    def killer():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            time.sleep(0.2)
            if (folder / "metrics.parquet").exists():  # training is under way
                pids = sorted(session_actor_pids("RankWorker"))  # this session's, not another job's
                if pids:
                    os.kill(pids[-1], signal.SIGKILL)
                    killed.append(pids[-1])

    threading.Thread(target=killer, daemon=True).start()
    # rank 0 slowed 10x (a sleep: the arithmetic is unchanged) so the kill lands mid-run
    result = _run(tmp_path, "outside", ray_address, inject=["slow:rank=0,factor=10"],
                  failure={"max_failures": 1, "snapshot_every": 2, "backoff_s": 0.1})
    assert killed and (result.events.kind == "failure:died").sum() == 1
    _assert_identical(final_params(result.checkpoint), baseline)


def test_exhausted_failures_exit_1_and_keep_what_was_written(ray_address, tmp_path, capsys):
    from orchestrator.cli import main

    code = main(["run", "--workload", "gpt-tiny", "--strategy", "ddp", "--workers", "2", "--steps", str(STEPS),
                 "--storage", str(tmp_path), "--run-id", "dies", "--address", ray_address, "--quiet",
                 "--set", "workload.d_model=32", "--set", "workload.n_layers=1", "--set", "workload.seq_len=32",
                 "--checkpoint-every", "2", "--inject", "kill:rank=1,step=6"])
    assert code == 1
    out, err = capsys.readouterr()
    assert "rank 1 failed: its worker process died" in err and "failure.max_failures=0" in err
    assert "(injected kill:rank=1,step=6)" in err and "OOM killer" not in out + err  # ours, not Ray's advice
    df = pd.read_parquet(tmp_path / "dies" / "metrics.parquet")
    assert sorted(set(df.step)) == [1, 2, 3, 4, 5]
    url = str(tmp_path / "dies" / "checkpoints" / "step_4")
    assert [s for s, _ in committed(str(tmp_path / "dies"))] == [4, 2]
    spec = JobSpec(workload=W, strategy="ddp", workers=2)
    assert check(url, fmt="dcp", shapes=model_shapes(spec.build_workload()))["step"] == 4
