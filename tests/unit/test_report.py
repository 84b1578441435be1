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
from orchestrator.metrics import EVENT_SCHEMA, TIMELINE_SCHEMA, metrics_table
from orchestrator.report import (Failure, ProjectOn, Report, build_report, expand_urls, load_run, render_markdown,
                                 report_from_urls, write_report)

T0 = 1_700_000_000.0


def _write(url: str, name: str, table: pa.Table) -> None:
    with fsspec.open(f"{url}/{name}", "wb") as f:
        pq.write_table(table, f)


def fake_run(storage: str, run_id: str, *, strategy: dict, scenario: str, steps: int = 8, workers: int = 2,
             step_s: float = 0.1, seed: int = 0, events=(), timeline: bool = False, val=None, eval_s: float = 0.0,
             load: float | None = None, nbytes=None, tokens: bool = True) -> str:
    """A run folder as the driver writes it: spec.yaml, metrics.parquet, events.parquet.
    ``val(step)``: the held-out loss after that step (None: no evaluation), evaluated in
    ``eval_s`` seconds after the step (in the wall-clock gap, not in step_time_s);
    ``load``: load_avg of every row (None: no column); ``nbytes(step, rank)``: bytes_sent;
    ``tokens``: False for an image model (0 tokens)."""
    url = f"{storage}/{run_id}"
    rng = np.random.default_rng(seed)
    rows, clock = [], T0
    for step in range(1, steps + 1):
        clock += step_s * (3 if step == 1 else 1)
        v = val(step) if val else None
        for rank in range(workers):
            t = step_s * (1 + 0.1 * rank) * (3 if step == 1 else 1)
            idle = t * 0.2
            rows.append(dict(run_id=run_id, workload="gpt-tiny", strategy=strategy["name"], scenario=scenario,
                             step=step, rank=rank, loss=5.0 - 0.1 * step + rng.normal(0, 0.01), step_time_s=t,
                             compute_s=t - idle, comm_s=t * 0.3, idle_s=idle,
                             bytes_sent=nbytes(step, rank) if nbytes else 1000 * (rank + 1) * step,
                             bytes_received=1000, samples=4 * (rank + 1), tokens=4 * 32 * (rank + 1) * tokens,
                             peak_mem_bytes=(100 + 10 * rank) * 2**20 + step, wall_time=clock,
                             **({"val_loss": float("nan") if v is None else v,
                                 "eval_s": 0.0 if v is None else eval_s} if val else {}),
                             **({"load_avg": load + 0.1 * step} if load is not None else {})))
        clock += eval_s if v is not None else 0.0  # evaluation happens after the step's wall_time
    _write(url, "metrics.parquet", metrics_table(rows))
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
    last = m[m.step == m.step.max()]
    return {"tokens_per_s": steady.tokens.sum() / slow.step_time_s.sum(),
            "samples_per_s": steady.samples.sum() / slow.step_time_s.sum(),
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


def test_a_model_without_tokens_is_ranked_by_samples_per_second(storage):
    urls = [fake_run(storage, n, strategy={"name": n}, scenario="local", tokens=False, step_s=s)
            for n, s in (("ddp", 0.1), ("fsdp", 0.2))]
    report = report_from_urls(urls, f"{storage}/rep", project_on=ProjectOn(scenario="none"))
    md = fsspec.open(report[1], "r").open().read()
    header = next(ln for ln in md.split("## Scenario `local`")[1].splitlines() if ln.startswith("| #"))
    assert "samples/s" in header and "tokens/s" not in header
    for name, url in zip(("ddp", "fsdp"), urls):
        assert _md_rows(md, "local")[name][3] == f"{expected_row(url)['samples_per_s']:,.0f}"
    assert "global batches differ" not in md  # both took 12 samples a step


def test_runs_on_different_global_batches_are_flagged(storage):
    urls = [fake_run(storage, "ddp", strategy={"name": "ddp"}, scenario="local", workers=2),
            fake_run(storage, "pipeline", strategy={"name": "pipeline"}, scenario="local", workers=3)]
    md = render_markdown(build_report(expand_urls(urls)))
    assert "The runs' global batches differ (" in md and "ddp 12" in md and "pipeline 24 samples a step" in md


def test_report_cli_from_memory_urls(storage, capsys):
    urls = [fake_run(storage, n, strategy={"name": n}, scenario="local") for n in ("ddp", "fsdp")]
    assert main(["report", *urls, "--out", f"{storage}/rep", "--project-on", "none"]) == 0
    fs = fsspec.filesystem("memory")
    assert fs.exists(f"{storage}/rep/report.html".removeprefix("memory://"))
    assert "report.md" in capsys.readouterr().out


def test_an_out_that_cannot_be_written_is_one_line_before_the_projection(storage, capsys, monkeypatch):
    import orchestrator.report as report_module

    monkeypatch.setattr(report_module, "project_runs", lambda *a: pytest.fail("profiled before --out was checked"))
    urls = [fake_run(storage, "ddp", strategy={"name": "ddp"}, scenario="local")]
    assert main(["report", *urls, "--out", "/proc/polytrain-cannot-write-here"]) == EXIT_INVALID
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--out '/proc/polytrain-cannot-write-here': not writable" in err


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


def test_a_matrix_takes_one_global_batch_whatever_each_strategys_replicas():
    """ddp on 4 workers takes 4 micro-batches a step, a 4-stage pipeline one, sp=2 two: the
    matrix runs all of them on ddp's (their least common multiple) unless the user set one."""
    from orchestrator.compare import common_batch, matrix_job

    strategies = [{"name": "ddp"}, {"name": "pipeline"}, {"name": "sequence", "ring": 2}]
    base = {"workload": {"name": "gpt-tiny", "n_layers": 4}, "workers": 4, "steps": 2}

    def specs(b):
        return [matrix_job(c, f, None) for c, f in matrix_specs(b, strategies, ["local"], "/tmp/s")]

    own = specs(base)
    assert [s.batch_size for s in own] == [32, 8, 16]
    assert common_batch(base, own) == 32
    assert {s.batch_size for s in specs({**base, "batch_size": 32})} == {32}  # every strategy takes it
    assert common_batch({**base, "batch_size": 16}, specs({**base, "batch_size": 16})) is None  # the user's stays
    assert common_batch(base, own[:1]) is None


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


# -- one definition per figure, steady bytes, held-out quality, repeats, tuning (issue 16) ------------

def _cells(md: str, scenario: str, label: str) -> dict[str, str]:
    """A ranking row's cells by column header."""
    section = md.split(f"## Scenario `{scenario}`")[1].split("## ")[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {r[1]: r for r in ([c.strip() for c in ln.strip("|").split("|")] for ln in lines[1:])}
    return dict(zip(header, rows[label]))


def test_the_step_parts_add_up_to_the_step_the_report_shows(storage):
    """The slowest rank differs from step to step; compute + idle = step all the same,
    and every figure is recomputed here from the Parquet rows."""
    from orchestrator.metrics import DEFINITIONS, summarize

    url = fake_run(storage, "p", strategy={"name": "ddp"}, scenario="local", steps=9)
    m = pd.read_parquet(fsspec.open(f"{url}/metrics.parquet", "rb").open())
    m.loc[(m.step == 6) & (m["rank"] == 0), ["step_time_s", "compute_s"]] = [0.5, 0.5 - 0.02]  # rank 0 slowest
    _write(url, "metrics.parquet", pa.Table.from_pandas(m, preserve_index=False))
    s = summarize(m)
    assert s["compute_s_per_step"] + s["idle_s_per_step"] == pytest.approx(s["median_step_s"], abs=1e-12)
    exp = expected_row(url)
    assert s["median_step_s"] == pytest.approx(exp["step_s"]) and s["idle_s_per_step"] == pytest.approx(exp["idle_s"])
    assert s["compute_s_per_step"] == pytest.approx(exp["compute_s"])
    md = render_markdown(Report(runs=[load_run(url)]))
    cells = _cells(md, "local", "ddp")
    assert cells["step (s)"] == f"{exp['step_s']:,.4f}" and cells["idle (s)"] == f"{exp['idle_s']:,.4f}"
    assert cells["compute (s)"] == f"{exp['compute_s']:,.4f}" and cells["comm (s)"] == f"{exp['comm_s']:,.4f}"
    assert DEFINITIONS in md  # the one definition, in the report's header


def test_steady_bytes_after_the_declared_warmup_beside_whole_run_totals(storage):
    """powersgd declares 10 uncompressed steps: its steady bytes are those of steps 11+,
    its whole-run total counts every step (the ERRATA's 20-step compare)."""
    dense, small = 19_000_000, 500_000
    p = fake_run(storage, "psgd", strategy={"name": "powersgd", "rank": 4}, scenario="local", steps=20,
                 nbytes=lambda step, rank: dense if step <= 10 else small)
    d = fake_run(storage, "ddp", strategy={"name": "ddp"}, scenario="local", steps=20, nbytes=lambda s, r: dense)
    md = render_markdown(Report(runs=[load_run(p), load_run(d)]))
    psgd, ddp = _cells(md, "local", "powersgd:rank=4"), _cells(md, "local", "ddp")
    assert psgd["bytes/step/rank (steady)"] == "488.28 KiB"  # steps 11-20 only
    assert psgd["bytes/rank (whole run)"] == f"{(10 * dense + 10 * small) / 2**20:.2f} MiB"
    assert ddp["bytes/step/rank (steady)"] == "18.12 MiB" and ddp["bytes/rank (whole run)"] == f"{20 * dense / 2**20:.2f} MiB"
    assert "Warm-up steps left out of steady figures: " in md and "powersgd:rank=4 10" in md and "ddp 3" in md


def test_ranked_by_heldout_loss_when_every_run_evaluated(storage):
    """Training loss says ddp is ahead; held-out loss says demo is: the ranking follows held-out loss,
    its target is the worst final held-out loss, and the header says which loss it is."""
    a = fake_run(storage, "a", strategy={"name": "ddp"}, scenario="local", steps=8, step_s=0.05,
                 val=lambda s: 4.0 if s % 4 == 0 else None)  # never improves
    b = fake_run(storage, "b", strategy={"name": "demo"}, scenario="local", steps=8, step_s=0.1,
                 val=lambda s: 5.0 - 0.2 * s if s % 4 == 0 or s == 8 else None)  # 4.2 at step 4, 3.4 at step 8
    md = render_markdown(Report(runs=[load_run(a), load_run(b)]))
    assert list(_md_rows(md, "local")) == ["ddp", "demo"]  # ddp reaches 4.0 at its first evaluation (step 4)
    assert "Target loss 4.0000 (held-out loss)" in md
    assert _cells(md, "local", "demo")["final held-out loss"] == "3.4000"
    md_b = render_markdown(Report(runs=[load_run(a), load_run(b)], target_loss=3.5))
    assert list(_md_rows(md_b, "local")) == ["demo", "ddp"]  # only demo ever reaches 3.5 held-out
    assert "Verdict: **demo** reaches the target held-out loss first" in md_b and "no other strategy" in md_b


def test_a_run_without_heldout_loss_ranks_the_scenario_by_training_loss_and_says_so(storage):
    a = fake_run(storage, "a", strategy={"name": "ddp"}, scenario="local", val=lambda s: 4.0 if s == 8 else None)
    b = fake_run(storage, "b", strategy={"name": "fsdp"}, scenario="local")
    md = render_markdown(Report(runs=[load_run(a), load_run(b)]))
    assert "ranked by training loss: no held-out evaluation in fsdp" in md
    assert "reaches the target training loss first" in md


def test_time_to_target_leaves_evaluation_out(storage):
    """Evaluations after steps 2 and 4 take 5 s each (in the wall-clock gaps): time to a
    target first reached at step 6 is the training time only."""
    url = fake_run(storage, "e", strategy={"name": "ddp"}, scenario="local", steps=8, step_s=0.5,
                   val=lambda s: 10.0 - s if s % 2 == 0 else None, eval_s=5.0)
    md = render_markdown(Report(runs=[load_run(url)], target_loss=4.0))  # val 4.0 after step 6
    # the run began 1.65 s before step 1 ended (T0 + 1.5); step 6 ended 5 x 0.5 s of training later
    assert _cells(md, "local", "ddp")["time to target (s)"] == f"{0.15 + 1.5 + 5 * 0.5:,.3f}"
    runs = md.split("## Runs")[1]
    assert "| ddp | local | 1 | " in runs and " | 20.0 | " in runs  # 4 evaluations x 5 s, shown apart


def _repeated(storage, times: dict[str, list[float]]) -> Report:
    runs = []
    for rep in range(len(next(iter(times.values())))):  # round-robin, as compare --repeat writes them
        for name, per_rep in times.items():
            url = fake_run(storage, f"{name}-{rep}", strategy={"name": name}, scenario="local", steps=6,
                           step_s=per_rep[rep], seed=rep, load=1.0 + rep)
            runs.append(load_run(url, repeat=rep))
    return Report(runs=runs, target_loss=4.75)  # reached at step 3 (noise 0.01)


def test_repeats_show_medians_with_their_spread_and_mark_a_ranking_within_noise(storage):
    md = render_markdown(_repeated(storage, {"ddp": [0.10, 0.12, 0.20], "fsdp": [0.11, 0.13, 0.14]}))
    # step 3 ends 3 s + 2 s after T0 (step 1 takes 3 x); the run began when step 1's slowest rank (3.3 s) began
    t = lambda s: 5.3 * s  # noqa: E731
    ddp, fsdp = _cells(md, "local", "ddp"), _cells(md, "local", "fsdp")
    assert ddp["time to target (s)"] == f"{t(0.12):,.3f} ({t(0.10):,.3f}–{t(0.20):,.3f})"
    assert list(_md_rows(md, "local")) == ["ddp", "fsdp"] and fsdp["vs the row above"] == "within noise"
    assert "3 repeats per strategy, run round-robin" in md and "min–max" in md
    assert "the margin is within noise (their ranges over 3 repeats overlap: not a result)" in md
    assert ddp["load (1-min avg)"].startswith("2.")  # the median run's load, its spread beside
    assert len([ln for ln in md.split("## Runs")[1].splitlines() if ln.startswith("| ddp |")]) == 3

    md = render_markdown(_repeated(f"{storage}-b", {"ddp": [0.10, 0.10, 0.11], "fsdp": [0.2, 0.21, 0.22]}))
    assert _cells(md, "local", "fsdp")["vs the row above"] == "beyond noise"
    assert "the margin is beyond the noise (their ranges over 3 repeats do not overlap)" in md
    assert "**ddp** reaches the target training loss first" in md


def test_one_run_each_says_rankings_are_unchecked_for_noise(storage):
    urls = [fake_run(storage, n, strategy={"name": n}, scenario="local", step_s=s) for n, s in
            (("ddp", 0.1), ("fsdp", 0.2))]
    md = render_markdown(Report(runs=[load_run(u) for u in urls]))
    assert "One run per strategy: rankings are unchecked for noise" in md
    assert "the margin is unchecked for noise" in md and _cells(md, "local", "fsdp")["vs the row above"] == "unchecked"
    assert "(" not in _cells(md, "local", "ddp")["step (s)"]  # no spread to show


def test_tuning_section_shows_every_grid_point_and_the_chosen_one(storage):
    from orchestrator.report import Tuned

    pts = {"optim.lr=1e-3": 3.0, "optim.lr=3e-3": 2.5}
    tuned = [Tuned(label="ddp", setting=k, wall_s=2.0, chosen=v == 2.5, run=load_run(fake_run(
        storage, k, strategy={"name": "ddp"}, scenario="local", val=lambda s, v=v: v if s == 8 else None)))
             for k, v in pts.items()]
    tuned.append(Tuned(label="ddp", setting="optim.lr=1e-1", run=None, error="rank 0 failed: nan", wall_s=1.5))
    main_run = load_run(fake_run(storage, "m", strategy={"name": "ddp"}, scenario="local"), setting="optim.lr=3e-3")
    md = render_markdown(Report(runs=[main_run], tuning=tuned, tuning_note="Each ran 2 steps."))
    section = md.split("## Tuning")[1].split("## ")[0]
    assert "Each ran 2 steps. Cost: 3 runs, 5.5 s." in section
    assert "| ddp | optim.lr=1e-3 | 3.0000 |" in section and "| ddp | optim.lr=3e-3 | 2.5000 |" in section
    assert section.count("| chosen |") == 1 and "failed: rank 0 failed: nan" in section
    assert "ddp [optim.lr=3e-3]" in _md_rows(md, "local")  # the comparison names the setting it ran at


def test_run_folders_of_one_strategy_given_apart_are_its_repeats(storage, tmp_path):
    urls = [fake_run(storage, f"d{i}", strategy={"name": "ddp"}, scenario="local", step_s=s, seed=i)
            for i, s in enumerate((0.1, 0.3))]
    report_from_urls(urls, f"{storage}/rep", project_on=ProjectOn(scenario="none"))
    md = fsspec.open(f"{storage}/rep/report.md", "r").open().read()
    assert "2 repeats per strategy" in md and len(_md_rows(md, "local")) == 1
    assert [ln.split(" | ")[2] for ln in md.split("## Runs")[1].splitlines() if ln.startswith("| ddp")] == ["1", "2"]


def test_over_repeats_the_parts_still_add_up_to_the_median_step(storage):
    """Three repeats whose idle shares differ: the median of each part would not add up;
    the parts of the median run do."""
    runs = []
    for rep, (step_s, idle_share) in enumerate(((0.1, 0.1), (0.2, 0.5), (0.3, 0.2))):
        url = fake_run(storage, f"r{rep}", strategy={"name": "ddp"}, scenario="local", step_s=step_s, seed=rep)
        m = pd.read_parquet(fsspec.open(f"{url}/metrics.parquet", "rb").open())
        m["idle_s"] = m.step_time_s * idle_share
        m["compute_s"] = m.step_time_s - m.idle_s
        _write(url, "metrics.parquet", pa.Table.from_pandas(m, preserve_index=False))
        runs.append(load_run(url, repeat=rep))
    cells = _cells(render_markdown(Report(runs=runs)), "local", "ddp")
    step, compute, idle = (float(cells[k].split(" ")[0]) for k in ("step (s)", "compute (s)", "idle (s)"))
    assert step == pytest.approx(0.22) and idle == pytest.approx(0.11) and compute + idle == pytest.approx(step)


def test_replicas_spread_is_named_beside_the_heldout_loss_of_their_average(storage):
    url = fake_run(storage, "g", strategy={"name": "gossip"}, scenario="local", val=lambda s: 4.0 if s == 8 else None)
    m = pd.read_parquet(fsspec.open(f"{url}/metrics.parquet", "rb").open())
    m["val_spread"] = np.where(m.step == 8, 0.0125, np.nan)
    _write(url, "metrics.parquet", pa.Table.from_pandas(m, preserve_index=False))
    md = render_markdown(Report(runs=[load_run(url)]))
    assert "their own final held-out losses span gossip 0.0125 (max − min)" in md
    assert "Replicas differ" not in render_markdown(Report(runs=[load_run(fake_run(storage, "d", strategy={
        "name": "ddp"}, scenario="local", val=lambda s: 4.0 if s == 8 else None))]))


@pytest.mark.parametrize("strategy, steps", [
    ({"name": "powersgd", "rank": 4}, 10), ({"name": "powersgd", "warmup_steps": 2}, 2), ({"name": "int8"}, 0),
    ("ddp", 0), ({"name": "mesh", "fsdp": 2, "outer": "powersgd"}, 10), ({"name": "mesh", "fsdp": 2, "outer": "demo"}, 0),
    ({"name": "no/such/plugin.py:Nope"}, 0),
])
def test_the_warmup_each_strategy_declares(strategy, steps):
    from orchestrator.metrics import declared_warmup

    assert declared_warmup(strategy) == steps
