"""polytrain compare end to end: strategies x scenarios on one Ray, run folders,
report files whose numbers equal those computed from the Parquet files, and a
combination failing at run time reported instead of stopping the rest (bad
input in any combination stops the whole matrix before the first run)."""
import base64
import os
import re

import pandas as pd
import pytest
import yaml

from orchestrator.cli import main

TINY = ["--set", "workload.n_layers=2", "--set", "workload.d_model=64", "--set", "workload.seq_len=32"]


def _md_rows(md: str, scenario: str) -> dict[str, list[str]]:
    section = md.split(f"## Scenario `{scenario}`")[1].split("## ")[0]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in section.splitlines() if ln.startswith("| ")]
    return {r[1]: r for r in rows[1:]}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_compare_two_strategies_two_scenarios(ray_address, tmp_path, capsys, monkeypatch):
    import importlib

    from orchestrator.controller import RunFailed

    compare = importlib.import_module("orchestrator.compare")  # the package exports a function of that name

    out = tmp_path / "cmp"
    args = ["--scenarios", "local,internet-1g", "--workers", "2", "--steps", "3", "--seed", "3", *TINY,
            "--out", str(out), "--address", ray_address, "--quiet"]
    # an invalid option in one combination: the whole matrix is refused before any run
    assert main(["compare", "--workload", "gpt-tiny", "--strategies", "ddp,fsdp,ddp:no_such_option=1", *args]) == 2
    printed = capsys.readouterr()
    assert printed.err.count("\n") == 1 and "strategy.no_such_option: unknown key" in printed.err
    assert not out.exists()

    real_run = compare.run

    def failing_bucket(spec, **kw):  # a failure at run time, after validation
        if spec.strategy.options.get("bucket_mb") == 7:
            raise RunFailed("rank 1 failed: injected by the test (no_such_option)")
        return real_run(spec, **kw)

    monkeypatch.setattr(compare, "run", failing_bucket)
    rc = main(["compare", "--workload", "gpt-tiny", "--strategies", "ddp,fsdp,ddp:bucket_mb=7", *args])
    assert rc == 0
    printed = capsys.readouterr()
    assert "4/6 runs succeeded" in printed.out and "[6/6]" in printed.err

    matrix = yaml.safe_load((out / "matrix.yaml").read_text())["combinations"]
    ok = [c for c in matrix if c["status"] == "ok"]
    failed = [c for c in matrix if c["status"] == "failed"]
    assert sorted((c["label"], c["scenario"]) for c in ok) == sorted(
        (s, sc) for s in ("ddp", "fsdp") for sc in ("local", "internet-1g"))
    assert len(failed) == 2 and all("no_such_option" in c["error"] for c in failed)
    for c in ok:  # each run folder complete, same seed for all
        assert {"spec.yaml", "metrics.parquet", "events.parquet"} <= set(os.listdir(c["url"]))
        assert yaml.safe_load(open(os.path.join(c["url"], "spec.yaml")))["seed"] == 3

    html = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    images = [base64.b64decode(b) for b in re.findall(r"src='data:image/png;base64,([^']+)'", html)]
    # 2 per scenario-combination, and the projection's step time against N (on `local`: this machine)
    assert len(images) == 2 * 6 + 1 and all(i.startswith(b"\x89PNG") for i in images)
    projection = md.split("## Projection")[1].split("## Runs")[0]
    assert "| ddp | 1024 |" in projection and "| fsdp | 8 |" in projection
    assert md.count("ddp:bucket_mb=7 failed") == 2 and "no_such_option" in html

    for c in ok:
        m = pd.read_parquet(os.path.join(c["url"], "metrics.parquet"))
        per_step = m.groupby("step").agg(t=("step_time_s", "max"), tok=("tokens", "sum"))  # 3 steps: no warm-up cut
        last = m[m.step == 3]
        cells = _md_rows(md, c["scenario"])[c["label"]]
        assert cells[3] == f"{per_step.tok.sum() / per_step.t.sum():,.0f}"
        assert cells[10] == f"{(last.loss * last.samples).sum() / last.samples.sum():,.4f}"
        assert cells[3] in html
    # same seed and data: ddp and fsdp train the same model to the same loss (float tolerance)
    for sc in ("local", "internet-1g"):
        rows = _md_rows(md, sc)
        assert abs(float(rows["ddp"][10]) - float(rows["fsdp"][10])) <= 2e-4

    # the same report rendered again from the run folders (`polytrain report`)
    # (the projection profiles afresh: its measured times differ, the rest is the same)
    assert main(["report", str(out), "--out", str(tmp_path / "again")]) == 0
    again = (tmp_path / "again" / "report.md").read_text()
    without = lambda text: text.split("## Projection")[0] + text.split("## Runs")[1]  # noqa: E731
    assert "## Projection" in again and without(again) == without(md)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compare_tuned_and_repeated(ray_address, tmp_path, capsys):
    """--tune on a one-step budget, then the matrix twice round-robin: the report shows
    the grid, the chosen point, medians of the two repeats and their spread."""
    import statistics

    out = tmp_path / "tuned"
    rc = main(["compare", "--workload", "gpt-tiny", "--strategies", "ddp", "--workers", "1", "--steps", "4",
               "--tune", "optim.lr=1e-3,3e-2", "--tune-steps", "1", "--repeat", "2", *TINY, "--out", str(out),
               "--address", ray_address, "--quiet"])
    assert rc == 0, capsys.readouterr().err[-2000:]
    doc = yaml.safe_load((out / "matrix.yaml").read_text())
    assert [t["status"] for t in doc["tuning"]] == ["ok", "ok"] and sum(t["chosen"] for t in doc["tuning"]) == 1
    chosen = next(t["setting"] for t in doc["tuning"] if t["chosen"])
    assert [(c["repeat"], c["setting"], c["status"]) for c in doc["combinations"]] == [(0, chosen, "ok"),
                                                                                       (1, chosen, "ok")]
    md = (out / "report.md").read_text()
    assert "## Tuning" in md and "Cost: 2 runs" in md and "| chosen |" in md
    assert "2 repeats per strategy, run round-robin" in md and "Verdict: **ddp" in md
    # the step figure: the median over the repeats of each run's median slowest-rank step after the 3 warm-up steps
    frames = [pd.read_parquet(os.path.join(c["url"], "metrics.parquet")) for c in doc["combinations"]]
    per_run = [m[m.step > 3].groupby("step").step_time_s.max().median() for m in frames]
    cells = _md_rows(md, "local")[f"ddp [{chosen}]"]
    lo, hi = min(per_run), max(per_run)
    assert cells[4] == f"{statistics.median(per_run):,.4f} ({lo:,.4f}–{hi:,.4f})"
