"""A driver killed outright keeps every row up to its last committed checkpoint,
a resume then holds every step exactly once, and SIGTERM stops a run as
Ctrl-C does (exit 143, rows compacted, no Ray process left)."""
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from orchestrator.checkpoint import committed
from orchestrator.metrics import final_attempt, read_log
from orchestrator.storage import PARTS, RunFolder
from tests.e2e.procs import descendants, polytrain, ray_pids

TINY = ["--set", "workload.d_model=32", "--set", "workload.n_layers=1", "--set", "workload.seq_len=32"]


@pytest.mark.slow
def test_a_driver_killed_after_a_commit_keeps_its_rows_and_resume_fills_every_step(ray_address, tmp_path):
    from orchestrator.cli import main

    common = ["--workload", "gpt-tiny", "--strategy", "ddp", "--workers", "2", "--steps", "15",
              "--checkpoint-every", "3", "--storage", str(tmp_path), "--run-id", "k", "--address", ray_address,
              "--quiet", *TINY]
    run_url = str(tmp_path / "k")
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", *common],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline and not [s for s, _ in committed(run_url) if s >= 6]:
        time.sleep(0.01)
    assert proc.poll() is None, proc.stderr.read()
    proc.kill()  # SIGKILL right after a COMMITTED marker appeared: no finally, no flush
    proc.wait()
    time.sleep(2)  # Ray ends the dead driver's workers
    newest = committed(run_url)[0][0]
    folder = RunFolder.from_url(run_url)
    metrics, events = read_log(folder, "metrics"), read_log(folder, "events")
    have = set(zip(metrics.step, metrics["rank"]))
    assert {(s, r) for s in range(1, newest + 1) for r in (0, 1)} <= have
    assert newest in set(events[events.kind == "checkpoint"].step)

    assert main(["run", *common, "--resume", "latest"]) == 0
    assert not os.path.exists(os.path.join(run_url, PARTS))  # single files again
    final = final_attempt(pd.read_parquet(os.path.join(run_url, "metrics.parquet")))
    assert sorted(zip(final.step, final["rank"])) == [(s, r) for s in range(1, 16) for r in (0, 1)]  # once each
    events = pd.read_parquet(os.path.join(run_url, "events.parquet"))
    assert "gap" not in set(events.kind)
    assert events[events.kind == "resume"].step.tolist() == [newest]


@pytest.mark.slow
def test_sigterm_stops_a_run_like_ctrl_c(tmp_path):
    proc = polytrain("--workload", "gpt-tiny", "--strategy", "ddp", "--workers", "2", "--steps", "100000",
                      "--storage", str(tmp_path), "--run-id", "term", *TINY)
    folder = RunFolder(str(tmp_path), "term")
    deadline = time.monotonic() + 120
    while (seen := _rows(folder)) == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert seen > 0
    ours = descendants(proc.pid) & ray_pids()  # the embedded Ray: its head processes and workers
    assert ours
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "interrupted (SIGTERM)" in err
    deadline = time.monotonic() + 15
    while (left := ours & ray_pids()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, "SIGTERM left Ray processes behind"
    assert not os.path.exists(tmp_path / "term" / PARTS)
    assert len(pd.read_parquet(tmp_path / "term" / "metrics.parquet")) >= seen
    events = pd.read_parquet(tmp_path / "term" / "events.parquet")
    assert events[events.kind == "interrupted"].detail.tolist() == ["SIGTERM"]


def _rows(folder) -> int:
    metrics = read_log(folder, "metrics")
    return 0 if metrics is None else len(metrics)
