"""polytrain run end to end on Ray: exit code, run folder, metric rows and columns."""
import json
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from orchestrator import JobSpec, checkpoint, run
from orchestrator.metrics import METRIC_COLUMNS
from tests.distributed.test_checkpoint import flip_dcp_weight


def _check_metrics(df: pd.DataFrame, *, steps: int, workers: int, strategy: str) -> None:
    assert list(df.columns[: len(METRIC_COLUMNS)]) == METRIC_COLUMNS
    assert len(df) == steps * workers
    assert sorted(set(zip(df.step, df["rank"]))) == [(s, r) for s in range(1, steps + 1) for r in range(workers)]
    assert (df.strategy == strategy).all() and (df.scenario == "local").all()
    assert df.loss.notna().all() and (df.step_time_s > 0).all() and (df.compute_s > 0).all()
    assert (df.samples == 8).all() and (df.tokens == 8 * 128).all()
    if workers > 1:  # every gradient all-reduced once per step
        assert (df.bytes_sent > 0).all() and (df.comm_s > 0).all()


def test_python_api_ddp_two_workers(ray_address, tmp_path):
    spec = JobSpec(workload="gpt-tiny", strategy="ddp", workers=2, steps=3, storage=str(tmp_path), eval_every=2)
    result = run(spec, progress=False)
    df = result.metrics
    _check_metrics(df, steps=3, workers=2, strategy="ddp")
    # held-out loss after steps 2 (eval_every) and 3 (the last), the same on both ranks; NaN between
    evaluated = df[df.val_loss.notna()]
    assert sorted(set(evaluated.step)) == [2, 3] and (df[df.step == 1].eval_s == 0).all()
    assert (evaluated.groupby("step").val_loss.nunique() == 1).all() and (evaluated.eval_s > 0).all()
    assert (df.load_avg >= 0).all()
    params = 3_323_392  # gpt-tiny's default shape
    assert (df.bytes_sent == params * 4).all()  # ring all-reduce at 2 ranks: 2 (n-1)/n x 4 bytes
    saved = yaml.safe_load(open(os.path.join(result.url, "spec.yaml")))
    assert JobSpec(**saved) == spec
    phases = set(result.events.kind)
    assert {"phase:data", "phase:ray_start", "phase:placement", "phase:actors", "phase:worker_setup",
            "phase:first_step", "finished"} <= phases


def test_memory_storage(ray_address):
    result = run(JobSpec(workload="gpt-tiny", strategy="single", steps=2, storage="memory://polytrain-e2e"),
                 progress=False)
    assert result.url.startswith("memory://")
    _check_metrics(result.metrics, steps=2, workers=1, strategy="single")


def test_cli_joins_a_cluster(ray_address, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "run", "--workload", "gpt-tiny", "--strategy", "ddp",
         "--workers", "2", "--steps", "2", "--storage", str(tmp_path), "--run-id", "cli", "--address", ray_address],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "run folder:" in proc.stdout and "step 2/2" in proc.stderr
    _check_metrics(pd.read_parquet(tmp_path / "cli" / "metrics.parquet"), steps=2, workers=2, strategy="ddp")


def test_too_many_workers_for_the_cluster_is_an_error(ray_address, tmp_path, capsys):
    from orchestrator.cli import main

    rc = main(["run", "--workload", "gpt-tiny", "--strategy", "ddp", "--workers", "6", "--steps", "1",
               "--storage", str(tmp_path), "--address", ray_address])
    assert rc == 2
    assert "workers=6: needs 6 CPUs at cluster.cpus_per_worker=1, the cluster has 4" in capsys.readouterr().err


def test_checkpoint_then_resume_latest_in_the_same_run(ray_address, tmp_path, capsys):
    from orchestrator.cli import main

    common = ["--workload", "gpt-tiny", "--strategy", "fsdp", "--workers", "2", "--storage", str(tmp_path),
              "--run-id", "ck", "--address", ray_address, "--quiet", "--set", "workload.d_model=64",
              "--checkpoint-every", "2"]
    assert main(["run", *common, "--steps", "4"]) == 0
    assert "last checkpoint:" in capsys.readouterr().out
    assert main(["run", *common, "--steps", "6", "--resume", "latest"]) == 0
    err = capsys.readouterr().err
    df = pd.read_parquet(tmp_path / "ck" / "metrics.parquet")
    assert sorted(set(df.step)) == [1, 2, 3, 4, 5, 6] and len(df) == 12  # history kept, nothing twice
    assert {"param_bytes", "grad_bytes", "optim_bytes"} <= set(df.columns)
    assert df[df.step >= 2].param_bytes.notna().all()
    events = pd.read_parquet(tmp_path / "ck" / "events.parquet")
    assert (events.kind == "resume").sum() == 1 and events[events.kind == "resume"].step.iloc[0] == 4
    assert sorted(os.listdir(tmp_path / "ck" / "checkpoints")) == ["step_4", "step_6"]  # keep 2
    # an explicit URL that is not there: one line, exit 2
    assert main(["run", *common, "--steps", "6", "--resume", str(tmp_path / "nope")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    # a .metadata that is not what was written: refused before it is unpickled, one line, exit 2
    step6, step4 = tmp_path / "ck" / "checkpoints" / "step_6", tmp_path / "ck" / "checkpoints" / "step_4"
    (step6 / "state" / ".metadata").write_bytes(b"not what was written")
    assert main(["run", *common, "--steps", "6", "--resume", str(step6)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "step_6/state/.metadata: does not match the manifest" in err, err
    # `latest` falls back past it to step 4, written before manifests existed: loaded, with a warning
    shutil.rmtree(step4 / "manifest")
    record = json.loads((step4 / "trainer.json").read_text())
    del record["manifest"]
    (step4 / "trainer.json").write_text(json.dumps(record))
    assert main(["run", *common, "--steps", "6", "--resume", "latest"]) == 0  # and saves step 6 anew
    events = pd.read_parquet(tmp_path / "ck" / "events.parquet")
    assert "step_6/state/.metadata: does not match" in events[events.kind == "resume_fallback"].detail.iloc[-1]
    assert events[events.kind == "resume_unverified"].detail.iloc[-1].endswith(f"step_4: {checkpoint.NO_MANIFEST}")
    # a flipped bit in a shard: the driver cannot see it, the ranks refuse it before loading, the
    # restart falls back to step 4
    shard = flip_dcp_weight(str(step6 / "state"))
    assert main(["run", *common, "--steps", "6", "--resume", "latest", "--max-failures", "1"]) == 0
    events = pd.read_parquet(tmp_path / "ck" / "events.parquet")
    failure = events[events.kind == "failure:error"].detail.iloc[-1]
    assert f"CheckpointError: {step6}/state/{shard}: does not match the manifest" in failure and "\n" not in failure
    assert events[events.kind == "restart"].step.iloc[-1] == 4
