"""`polytrain project` through the real command: bad input is one line and exit 2
(before any profiling), a valid one prints the table and writes only with --out."""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pandas as pd
import pytest

from orchestrator.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PJ = ["project", "--workload", "gpt-tiny"]

CASES = [
    ("speed-zero", [*PJ, "--strategies", "ddp", "--scenario", "internet-1g", "--speed", "0"], "--speed 0.0"),
    ("speed-negative", [*PJ, "--strategies", "ddp", "--speed", "-2"], "--speed -2.0"),
    ("unparsable-cluster", [*PJ, "--strategies", "ddp", "--scenario", "per_node=2,inter=fast"], "inter='fast'"),
    ("unknown-scenario", [*PJ, "--strategies", "ddp", "--scenario", "mars"], "--scenario 'mars'"),
    ("n-not-a-multiple-of-per-node", [*PJ, "--strategies", "ddp", "--workers", "12", "--scenario",
                                      "per_node=8,inter=25gbit,intra=400gbit"],
     "--workers 12: not a multiple of the scenario's 8 workers per node"),
    ("more-workers-than-nodes", [*PJ, "--strategies", "ddp", "--workers", "8", "--scenario",
                                 "nodes=2,per_node=2,inter=1gbit"], "workers=8"),
    ("strategy-cannot-run-at-that-n", [*PJ, "--strategies", "pipeline", "--workers", "1"],
     "strategy='pipeline' cannot run workload='gpt-tiny' at any of --workers 1"),
    ("strategy-cannot-run-the-workload", ["project", "--workload", "mlp-wide", "--strategies", "sequence"],
     "strategy='sequence' cannot train workload='mlp-wide'"),
    ("unknown-strategy", [*PJ, "--strategies", "ddp,nosuch"], "strategy='nosuch'"),
    ("bad-strategy-option", [*PJ, "--strategies", "powersgd:rank=0"], "strategy.rank=0"),
    ("bad-workers", [*PJ, "--strategies", "ddp", "--workers", "2,zero"], "--workers '2,zero'"),
    ("target-loss-nan", [*PJ, "--strategies", "ddp", "--target-loss", "nan"], "--target-loss nan"),
    ("bad-workload-option", [*PJ, "--strategies", "ddp", "--set", "workload.n_layers=-1"], "workload.n_layers"),
    ("out-not-writable", [*PJ, "--strategies", "ddp", "--out", "/proc/polytrain-cannot-write-here"],
     "--out '/proc/polytrain-cannot-write-here': not writable"),
]


@pytest.fixture(scope="module")
def results():
    dirs = [tempfile.mkdtemp(prefix="pt-pj-", dir="/tmp") for _ in CASES]
    try:
        todo = [{"argv": argv, "dir": d} for (_, argv, _), d in zip(CASES, dirs)]
        p = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "unit", "cli_cases.py")],
                           input=json.dumps(todo), env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, check=False,
                           text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        out = json.loads(p.stdout)
        for r, d in zip(out, dirs):
            r["left"] = os.listdir(d)
        yield {c[0]: r for c, r in zip(CASES, out)}
    finally:
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("name, argv, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2(results, name, argv, expected):
    r = results[name]
    assert r["rc"] == 2, r["err"][-2000:]
    lines = r["err"].splitlines()
    assert len(lines) == 1 and lines[0].startswith("polytrain: error: ") and expected in lines[0], r["err"]
    assert "profiled" not in r["out"]  # answered before the profiling run
    assert r["left"] == []


def test_prints_without_writing_and_writes_with_out(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [*PJ, "--strategies", "ddp,pipeline", "--workers", "1,2,64", "--scenario", "internet-1g", "--speed", "4",
            "--set", "workload.d_model=64", "--set", "workload.seq_len=32"]  # small: the profile takes a second
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []
    assert "profiled gpt-tiny on one rank in" in out and "note: pipeline on 1 workers" in out
    assert "the global batch grows with N" in out and "dataset-size check is skipped" in out
    assert len([line for line in out.splitlines() if line.startswith(("ddp ", "pipeline "))]) == 5
    assert main([*argv, "--out", str(tmp_path / "p")]) == 0
    df = pd.read_parquet(tmp_path / "p" / "projection.parquet")
    for col in ("strategy", "workers", "scenario", "predicted_step_s", "predicted_compute_s", "predicted_comm_s",
                "predicted_bubble_s", "bytes_intra", "bytes_inter", "param_bytes_per_rank"):
        assert col in df, col
    assert len(df) == 5 and set(df.scenario) == {"internet-1g"}
    assert (df.predicted_step_s == df.predicted_compute_s + df.predicted_comm_s + df.predicted_bubble_s).all()
    assert (df.predicted_step_low_s <= df.predicted_step_s).all() and (df.predicted_step_s <= df.predicted_step_high_s).all()
    assert "range: the step again with compute as fast and as slow" in out
    assert (tmp_path / "p" / "projection.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
