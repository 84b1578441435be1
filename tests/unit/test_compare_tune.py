"""compare --tune and --repeat without Ray: grids parsed and validated, tuning runs on the
short budget before the comparison, each strategy compared at its best grid point, the
matrix run round-robin. ``run`` is replaced by a fake that writes a run folder whose
held-out loss is a known function of the setting."""
import importlib
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from orchestrator.cli import main
from orchestrator.compare import choose, file_tune, grid_points, matrix_job, matrix_specs, parse_tune
from orchestrator.config import ConfigError
from orchestrator.metrics import metrics_table

compare = importlib.import_module("orchestrator.compare")  # the package exports a function of that name


def test_grids_parse_into_a_cartesian_product():
    grid = parse_tune(["optim.lr=1e-3,3e-3", "optim.betas=[0.9,0.95],[0.9,0.99]"])
    assert grid == {"optim.lr": ["1e-3", "3e-3"], "optim.betas": ["[0.9,0.95]", "[0.9,0.99]"]}
    assert grid_points(grid)[1] == ["optim.lr=1e-3", "optim.betas=[0.9,0.99]"] and len(grid_points(grid)) == 4
    assert grid_points({}) == [[]]
    assert file_tune({"strategy.lr": [1e-3, "3e-3"], "optim.weight_decay": 0}, "tune") == {
        "strategy.lr": ["0.001", '"3e-3"'], "optim.weight_decay": ["0"]}


@pytest.mark.parametrize("items, text", [
    (["optim.lr="], "empty grid"), (["optim.lr= , "], "empty grid"), (["optim.lr"], "expected KEY=v1,v2"),
    (["steps=1,2"], "key 'steps' cannot be tuned"), (["optim.lr=1", "optim.lr=2"], "optim.lr given twice"),
])
def test_bad_grids(items, text):
    with pytest.raises(ConfigError, match=text):
        parse_tune(items)


def test_choose_the_lowest_heldout_loss_never_a_diverged_run():
    val = lambda v: {"final_val_loss": v, "final_loss": 9.0}  # noqa: E731
    assert choose([("a", val(3.0)), ("b", val(float("nan"))), ("c", val(2.0)), ("d", None)]) == "c"
    assert choose([("a", {"final_val_loss": math.nan, "final_loss": 4.0}),
                   ("b", {"final_val_loss": math.nan, "final_loss": 3.0})]) == "b"  # no held-out: training loss
    assert choose([("a", None)]) is None


def test_repeat_runs_the_whole_matrix_round_robin_at_each_strategys_setting():
    combos = matrix_specs({"workload": "gpt-tiny"}, [{"name": "ddp"}, {"name": "demo"}], ["local", "internet-1g"],
                          "/tmp/s", repeat=2, settings=[["optim.lr=1e-3"], ["strategy.lr=0.01"]])
    assert [(c.label, c.scenario, c.repeat) for c, _ in combos] == [
        (label, sc, rep) for rep in (0, 1) for sc in ("local", "internet-1g") for label in ("ddp", "demo:lr=0.01")]
    assert len({c.run_id for c, _ in combos}) == 8 and matrix_job(*combos[0], None).optim.lr == 1e-3
    assert combos[1][1]["strategy"] == {"name": "demo", "lr": 0.01} and combos[1][0].setting == "strategy.lr=0.01"


def _fake_run_folder(spec) -> str:
    """A finished run whose final held-out loss is lowest where optim.lr x strategy.lr (demo's) = 3e-3."""
    lr = spec.optim.lr * spec.strategy.options.get("lr", 1.0)
    val = 3.0 + abs(math.log10(lr / 3e-3))
    url = f"{spec.storage}/{spec.run_id}"
    rows = [dict(run_id=spec.run_id, workload="gpt-tiny", strategy=spec.strategy.name, scenario=spec.scenario_name,
                 step=s, rank=r, loss=5.0, step_time_s=0.1, compute_s=0.08, comm_s=0.01, idle_s=0.02, bytes_sent=10,
                 bytes_received=10, samples=4, tokens=128, peak_mem_bytes=1, wall_time=1e9 + 0.1 * s,
                 val_loss=val if s == spec.steps else math.nan, eval_s=0.0, load_avg=1.0)
            for s in range(1, spec.steps + 1) for r in range(spec.workers)]
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(path, exist_ok=True)
    pq.write_table(metrics_table(rows), f"{path}/metrics.parquet")
    pq.write_table(pa.table({"kind": pa.array([], pa.string())}), f"{path}/events.parquet")
    fs.pipe_file(f"{path}/spec.yaml", spec.to_yaml().encode())
    return url


@pytest.fixture
def no_ray(monkeypatch):
    """run_matrix's Ray start and each run, faked; returns the specs run, in order."""
    from cluster import runtime

    ran = []

    class Runtime:
        def shutdown(self):
            pass

    def fake_run(spec, **kw):
        ran.append(spec)
        return type("R", (), {"url": _fake_run_folder(spec)})()

    monkeypatch.setattr(runtime, "start", lambda address=None: Runtime())
    monkeypatch.setattr(compare, "run", fake_run)
    return ran


def test_tune_then_compare_each_strategy_at_its_best(no_ray, tmp_path, capsys):
    cfg = tmp_path / "cmp.yaml"
    cfg.write_text(yaml.safe_dump({
        "workload": "gpt-tiny", "workers": 2, "steps": 8, "repeat": 2,
        "strategies": ["ddp", {"name": "demo", "tune": {"strategy.lr": [3.0, 1.0]}}]}))
    out = tmp_path / "out"
    rc = main(["compare", "--config", str(cfg), "--tune", "optim.lr=1e-3,3e-3", "--out", str(out), "--quiet",
               "--project-on", "none"])  # a projection profiles for seconds: the e2e test covers it
    assert rc == 0
    tune, matrix = no_ray[:6], no_ray[6:]
    # ddp: 2 points; demo: 2 x 2; interleaved across strategies; a quarter of the steps each
    assert [(s.strategy.name, s.optim.lr, s.strategy.options.get("lr")) for s in tune] == [
        ("ddp", 1e-3, None), ("demo", 1e-3, 3.0), ("ddp", 3e-3, None), ("demo", 1e-3, 1.0),
        ("demo", 3e-3, 3.0), ("demo", 3e-3, 1.0)]
    assert {s.steps for s in tune} == {2} and {s.steps for s in matrix} == {8}
    # each strategy at its best point (optim.lr x strategy.lr = 3e-3), the matrix round-robin
    assert [(s.strategy.name, s.optim.lr, s.strategy.options.get("lr")) for s in matrix] == [
        ("ddp", 3e-3, None), ("demo", 1e-3, 3.0)] * 2
    doc = yaml.safe_load((out / "matrix.yaml").read_text())
    assert {t["label"]: t["setting"] for t in doc["tuning"] if t["chosen"]} == {
        "ddp": "optim.lr=3e-3", "demo": "optim.lr=1e-3,strategy.lr=3.0"}
    assert [c["repeat"] for c in doc["combinations"]] == [0, 0, 1, 1]
    md = (out / "report.md").read_text()
    assert "## Tuning" in md and "Cost: 6 runs" in md and "for 2 of the comparison's 8 steps" in md
    assert md.count("| chosen |") == 2 and "| demo | optim.lr=1e-3,strategy.lr=3.0 | 3.0000 |" in md
    assert "ddp [optim.lr=3e-3]" in md and "demo:lr=3.0 [optim.lr=1e-3]" in md
    runs = md.split("## Runs")[1]  # each run names the update rule it ran with
    assert "| adamw lr=0.003 |" in runs and "| demo sign step lr=3 |" in runs
    assert "tuned demo: optim.lr=1e-3,strategy.lr=3.0" in capsys.readouterr().err
    # rendered again from the folder: the same report
    assert main(["report", str(out), "--out", str(tmp_path / "again"), "--project-on", "none"]) == 0
    assert (tmp_path / "again" / "report.md").read_text() == md


def test_a_key_only_one_strategy_has_is_refused_on_the_command_line(no_ray, tmp_path, capsys):
    rc = main(["compare", "--workload", "gpt-tiny", "--strategies", "ddp,demo", "--steps", "4",
               "--tune", "strategy.lr=1e-3,1e-2", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "strategy.lr: unknown key" in err and "own tune:" in err
    assert no_ray == [] and not (tmp_path / "o").exists()
