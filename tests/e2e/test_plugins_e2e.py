"""User code reaches the Ray workers: a file reference from the CLI, and the
docs example, whose workload class lives in a script's __main__."""
import os
import re
import subprocess
import sys

import pandas as pd
import pytest

from tests import plugin_sources as src

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_cli_file_workload_on_ray(ray_address, tmp_path):
    model_dir = tmp_path / "elsewhere"
    model_dir.mkdir()
    (model_dir / "ray_user_model.py").write_text(src.GOOD.format(name="ray-file-reg"))
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "run", "--workload", "ray_user_model.py:TinyReg",
         "--strategy", "ddp", "--workers", "2", "--steps", "3", "--storage", str(tmp_path), "--run-id", "u",
         "--address", ray_address, "--quiet"],
        capture_output=True, text=True, timeout=300, cwd=model_dir,  # a relative path, from its folder
    )
    assert proc.returncode == 0, proc.stderr
    df = pd.read_parquet(tmp_path / "u" / "metrics.parquet")
    assert len(df) == 6 and (df.tokens == 0).all() and (df.samples == 8).all()


@pytest.mark.slow
def test_docs_example_runs(tmp_path):
    """As a user runs it: a script whose workload class lives in its __main__, on
    its own embedded Ray. (Joining the session's Ray after the other e2e tests
    was seen to stall after step 1; not yet diagnosed, see the issue notes.)"""
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "docs", "examples", "custom_workload.py"), "--steps", "150",
         "--storage", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
    )
    assert proc.returncode == 0, proc.stderr
    first, last = map(float, re.search(r"first step ([\d.]+), last step ([\d.]+)", proc.stdout).groups())
    assert last < first / 2, proc.stdout  # y = sin(3x) is learnable: the MSE falls (measured 0.37 -> 0.04)
