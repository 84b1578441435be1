"""The README's path: no address, so polytrain starts (and must stop) its own Ray."""
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

RAY_PROCESS_NAMES = ("raylet", "gcs_server", "ray::", "default_worker", "dashboard")


def _ray_pids() -> set[int]:
    pids = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if any(n in cmd for n in RAY_PROCESS_NAMES):
                pids.add(int(pid))
    return pids


def _wait_no_new_ray(before: set[int], timeout_s: float = 15) -> set[int]:
    deadline = time.monotonic() + timeout_s
    while (left := _ray_pids() - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def _polytrain(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.slow
def test_embedded_run_oversubscribed_then_ctrl_c(tmp_path):
    before = _ray_pids()
    # 4 workers on this 2-core machine: allowed on embedded Ray, with a note.
    proc = _polytrain("--workload", "gpt-tiny", "--strategy", "ddp", "--workers", "4", "--steps", "3",
                      "--storage", str(tmp_path), "--run-id", "emb", "--set", "workload.d_model=64")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    if os.cpu_count() < 4:
        assert "note: 4 workers on" in err
    assert (tmp_path / "emb" / "metrics.parquet").exists()
    assert not _wait_no_new_ray(before), "embedded Ray left processes behind"

    # Ctrl-C mid-run: exit 130, workers and Ray gone, metrics written so far kept.
    proc = _polytrain("--workload", "gpt-tiny", "--strategy", "ddp", "--workers", "2", "--steps", "100000",
                      "--storage", str(tmp_path), "--run-id", "int", "--set", "workload.d_model=64")
    metrics = tmp_path / "int" / "metrics.parquet"
    deadline = time.monotonic() + 120
    while _rows(metrics) == 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    written = _rows(metrics)
    assert written > 0
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert not _wait_no_new_ray(before), "Ctrl-C left Ray processes behind"
    assert _rows(metrics) >= written


def _rows(path) -> int:
    try:
        return len(pd.read_parquet(path))
    except (FileNotFoundError, OSError):
        return 0
