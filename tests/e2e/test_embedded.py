"""The README's path: no address, so polytrain starts (and must stop) its own Ray."""
import os
import signal
import time

import pandas as pd
import pytest

from tests.e2e.procs import RayWatch, polytrain


@pytest.mark.slow
def test_embedded_run_oversubscribed_then_ctrl_c(tmp_path):
    # 4 workers on this 2-core machine: allowed on embedded Ray, with a note.
    proc = polytrain("--workload", "gpt-tiny", "--strategy", "ddp", "--workers", "4", "--steps", "3",
                     "--storage", str(tmp_path), "--run-id", "emb", "--set", "workload.d_model=64")
    ray = RayWatch(proc)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    if os.cpu_count() < 4:
        assert "note: 4 workers on" in err
    assert (tmp_path / "emb" / "metrics.parquet").exists()
    assert ray.seen and not ray.left(), "embedded Ray left processes behind"

    # Ctrl-C mid-run: exit 130, workers and Ray gone, metrics written so far kept.
    proc = polytrain("--workload", "gpt-tiny", "--strategy", "ddp", "--workers", "2", "--steps", "100000",
                     "--storage", str(tmp_path), "--run-id", "int", "--set", "workload.d_model=64")
    ray = RayWatch(proc)
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
    assert ray.seen and not ray.left(), "Ctrl-C left Ray processes behind"
    assert _rows(metrics) >= written


def _rows(path) -> int:
    try:
        return len(pd.read_parquet(path))
    except (FileNotFoundError, OSError):
        return 0
