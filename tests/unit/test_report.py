"""Reports from run folders on memory:// (no Ray): tables equal figures computed
here from the Parquet rows, every plot embedded, failures and bad input on one line."""
import base64
import math
import re
import uuid

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from orchestrator.cli import EXIT_INVALID, main
from orchestrator.compare import matrix_specs, parse_strategies
from orchestrator.config import ConfigError
from orchestrator.metrics import EVENT_SCHEMA, METRIC_SCHEMA, TIMELINE_SCHEMA
from orchestrator.report import Failure, Report, load_run, render_markdown, report_from_urls, write_report

T0 = 1_700_000_000.0


def _write(url: str, name: str, table: pa.Table) -> None:
    with fsspec.open(f"{url}/{name}", "wb") as f:
        pq.write_table(table, f)


def fake_run(storage: str, run_id: str, *, strategy: dict, scenario: str, steps: int = 8, workers: int = 2,
             step_s: float = 0.1, seed: int = 0, events=(), timeline: bool = False) -> str:
    """A run folder as the driver writes it: spec.yaml, metrics.parquet, events.parquet."""
    url = f"{storage}/{run_id}"
    rng = np.random.default_rng(seed)
    rows, clock = [], T0
    for step in range(1, steps + 1):
        clock += step_s * (3 if step == 1 else 1)
        for rank in range(workers):
            t = step_s * (1 + 0.1 * rank) * (3 if step == 1 else 1)
            idle = t * 0.2
            rows.append(dict(run_id=run_id, workload="gpt-tiny", strategy=strategy["name"], scenario=scenario,
                             step=step, rank=rank, loss=5.0 - 0.1 * step + rng.normal(0, 0.01), step_time_s=t,
                             compute_s=t - idle, comm_s=t * 0.3, idle_s=idle, bytes_sent=1000 * (rank + 1) * step,
                             bytes_received=1000, samples=4 * (rank + 1), tokens=4 * 32 * (rank + 1),
                             peak_mem_bytes=(100 + 10 * rank) * 2**20 + step, wall_time=clock))
    _write(url, "metrics.parquet", pa.Table.from_pylist(rows, schema=METRIC_SCHEMA))
    ev = [dict(run_id=run_id, wall_time=T0 + w, kind=k, rank=1, step=s, seconds=float("nan"), detail="d")
          for k, w, s in events]
    _write(url, "events.parquet", pa.Table.from_pylist(ev, schema=EVENT_SCHEMA))
    if timeline:
        tl = [dict(run_id=run_id, step=steps, rank=r, action=f"{r}{op}{mb}", start=T0 + i * 0.01 + r * 0.005,
                   end=T0 + i * 0.01 + r * 0.005 + 0.004)
              for r in range(workers) for i, (op, mb) in enumerate([("F", 0), ("F", 1), ("B", 0), ("B", 1)])]
        _write(url, "timeline.parquet", pa.Table.from_pylist(tl, schema=TIMELINE_SCHEMA))
    with fsspec.open(f"{url}/spec.yaml", "w") as f:
        yaml.safe_dump({"workload": {"name": "gpt-tiny"}, "strategy": strategy, "scenario": scenario}, f)
    return url


def expected_row(url: str, warmup: int = 3) -> dict:
    """The ranking figures, straight from the Parquet file (independent of report.py and
    metrics.py): steady steps after ``warmup`` (all steps when the run is no longer); per
    step the slowest rank's row; the parts are their share of its steady time, of the median step."""
    with fsspec.open(f"{url}/metrics.parquet", "rb") as f:
        m = pq.read_table(f).to_pandas()
    steady = m[m.step > warmup] if m.step.max() > warmup else m
    slow = pd.DataFrame([g.sort_values("step_time_s").iloc[-1] for _, g in steady.groupby("step")])
    step = float(np.median(slow.step_time_s))
    tokens = steady.groupby("step").tokens.sum()
    last = m[m.step == m.step.max()]
    return {"tokens_per_s": tokens.sum() / slow.step_time_s.sum(),
            "final_loss": (last.loss * last.samples).sum() / last.samples.sum(),
            "step_s": step, "comm_s": step * slow.comm_s.sum() / slow.step_time_s.sum(),
            "idle_s": step * slow.idle_s.sum() / slow.step_time_s.sum(),
            "compute_s": step * slow.compute_s.sum() / slow.step_time_s.sum(),
            "bytes_steady": steady.bytes_sent.mean(), "bytes_run": m.bytes_sent.sum() / m["rank"].nunique()}


@pytest.fixture
def storage():
    return f"memory://report-{uuid.uuid4().hex[:8]}"


def _images(html: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r"src='data:image/png;base64,([^']+)'", html)]


def _md_rows(md: str, scenario: str) -> dict[str, list[str]]:
    section = md.split(f"## Scenario `{scenario}`")[1].split("## ")[0]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in section.splitlines() if ln.startswith("| ")]
    return {r[1]: r for r in rows[1:]}  # by strategy label, header row dropped


def test_report_tables_plots_and_failures(storage):
    a = fake_run(storage, "a", strategy={"name": "ddp"}, scenario="local", step_s=0.1)
    b = fake_run(storage, "b", strategy={"name": "powersgd", "rank": 4}, scenario="local", step_s=0.05, seed=1,
                 events=[("straggler", 0.5, 3), ("failure:died", 0.7, 4), ("restart", 0.9, 4)])
    c = fake_run(storage, "c", strategy={"name": "pipeline"}, scenario="internet-1g", timeline=True)
    report = Report(runs=[load_run(u) for u in (a, b, c)],
                    failures=[Failure(label="fsdp", scenario="internet-1g", error="rank 1 failed: boom")])
    html_url, md_url = write_report(report, f"{storage}/out")
    html = fsspec.open(html_url, "r").open().read()
    md = fsspec.open(md_url, "r").open().read()

    images = _images(html)
    # 6 plots per scenario + 1 Gantt + 1 event timeline, every one a real PNG and nothing linked from outside
    assert len(images) == 2 * 6 + 2 and all(i.startswith(b"\x89PNG") for i in images)
    assert "http" not in re.sub(r"data:image/png;base64,[^']+", "", html)
    assert "fsdp failed" in md and "rank 1 failed: boom" in md and "rank 1 failed: boom" in html

    local = _md_rows(md, "local")
    assert list(local) == ["powersgd:rank=4", "ddp"]  # the faster run reaches the target first
    for label, url, warmup in (("ddp", a, 3), ("powersgd:rank=4", b, 10)):  # powersgd declares 10 (> 8 steps)
        exp, cells = expected_row(url, warmup), local[label]
        assert cells[3] == f"{exp['tokens_per_s']:,.0f}"
        assert cells[4] == f"{exp['step_s']:,.4f}"
        assert cells[6] == f"{exp['comm_s']:,.4f}"
        assert cells[10] == f"{exp['final_loss']:,.4f}"
        assert cells[3] in html and cells[10] in html
    # target loss = the worst final loss; the slower run reaches it exactly at its last step
    worst = max(expected_row(u)["final_loss"] for u in (a, b))
    assert f"Target loss {worst:.4f}" in md


def test_time_to_target_is_measured_from_the_first_step(storage):
    url = fake_run(storage, "t", strategy={"name": "ddp"}, scenario="local", steps=6, step_s=0.5)
    run = load_run(url)
    report = Report(runs=[run], target_loss=5.0 - 0.1 * 4 + 0.05)  # first reached at step 4 (noise 0.01)
    md = render_markdown(report)  # tables only: no plots needed here
    # the run began when step 1's slowest rank started (1.65 s before step 1 ended at T0 + 1.5);
    # step 4 ended 3 x 0.5 s after step 1
    assert _md_rows(md, "local")["ddp"][2] == f"{0.15 + 1.5 + 3 * 0.5:,.3f}"


def test_report_cli_from_memory_urls(storage, capsys):
    urls = [fake_run(storage, n, strategy={"name": n}, scenario="local") for n in ("ddp", "fsdp")]
    assert main(["report", *urls, "--out", f"{storage}/rep"]) == 0
    fs = fsspec.filesystem("memory")
    assert fs.exists(f"{storage}/rep/report.html".removeprefix("memory://"))
    assert "report.md" in capsys.readouterr().out


def test_run_folder_without_metrics_is_one_line_error(storage, capsys):
    with fsspec.open(f"{storage}/empty/spec.yaml", "w") as f:
        f.write("workload: gpt-tiny\n")
    with pytest.raises(ConfigError, match="no metrics.parquet"):
        report_from_urls([f"{storage}/empty"], f"{storage}/o")
    assert main(["report", f"{storage}/empty", "--out", f"{storage}/o"]) == EXIT_INVALID
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no metrics.parquet" in err


def test_parse_strategies_and_matrix():
    got = parse_strategies("ddp,fsdp,pipeline:schedule=zb-h1,powersgd:rank=4,min_compress=1,demo")
    assert got == [{"name": "ddp"}, {"name": "fsdp"}, {"name": "pipeline", "schedule": "zb-h1"},
                   {"name": "powersgd", "rank": 4, "min_compress": 1}, {"name": "demo"}]
    combos = matrix_specs({"workload": "gpt-tiny", "seed": 7}, got[:2], ["local", "internet-1g"], "/tmp/s")
    assert [(c.label, c.scenario) for c, _ in combos] == [("ddp", "local"), ("fsdp", "local"),
                                                          ("ddp", "internet-1g"), ("fsdp", "internet-1g")]
    assert {f["seed"] for _, f in combos} == {7} and len({c.run_id for c, _ in combos}) == 4


@pytest.mark.parametrize("text", ["", " , ", "k=v"])
def test_bad_strategy_lists(text):
    with pytest.raises(ConfigError, match="--strategies"):
        parse_strategies(text)


def test_empty_strategy_list_cli(capsys):
    assert main(["compare", "--workload", "gpt-tiny", "--strategies", ",", "--out", "/tmp/never"]) == EXIT_INVALID
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "empty" in err


def test_nan_formatting_for_a_run_that_never_reaches_the_target(storage):
    url = fake_run(storage, "n", strategy={"name": "ddp"}, scenario="local")
    md = render_markdown(Report(runs=[load_run(url)], target_loss=0.0))
    assert _md_rows(md, "local")["ddp"][2] == "-"
    assert not math.isnan(expected_row(url)["final_loss"])


def test_compare_matrix_from_yaml(tmp_path, monkeypatch):
    """--config YAML carries the matrix; flags and --set win over it (the runs themselves: tests/e2e)."""
    import sys

    from orchestrator.compare import Combination

    compare = sys.modules["orchestrator.compare"]  # the package exports a function of the same name
    seen = {}

    def fake_run_matrix(base, strategies, scenarios, out, **kw):
        seen.update(base=base, strategies=strategies, scenarios=scenarios, out=out)
        return [Combination(label="ddp", scenario="local", run_id="r", status="ok")], "h", "m"

    monkeypatch.setattr(compare, "run_matrix", fake_run_matrix)
    cfg = tmp_path / "m.yaml"
    cfg.write_text(yaml.safe_dump({"workload": "gpt-tiny", "workers": 2, "steps": 5,
                                   "strategies": ["ddp", {"name": "powersgd", "rank": 4}],
                                   "scenarios": ["local", "internet-1g"], "out": str(tmp_path / "o")}))
    assert main(["compare", "--config", str(cfg), "--steps", "7", "--set", "workload.d_model=32"]) == 0
    assert seen["strategies"] == [{"name": "ddp"}, {"name": "powersgd", "rank": 4}]
    assert seen["scenarios"] == ["local", "internet-1g"] and seen["out"] == str(tmp_path / "o")
    assert seen["base"] == {"workload": {"name": "gpt-tiny", "d_model": 32}, "workers": 2, "steps": 7}
