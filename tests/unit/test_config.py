"""Bad input: one line naming the field, the value and what is allowed; exit 2; nothing started."""
import time

import pytest

from orchestrator.cli import main
from orchestrator.config import ConfigError, JobSpec, load_spec


def _cli(capsys, *args) -> tuple[int, str]:
    rc = main(["run", *args])
    err = capsys.readouterr().err.strip()
    return rc, err


BASE = ["--workload", "gpt-tiny", "--strategy", "ddp", "--workers", "2", "--steps", "2"]


@pytest.mark.parametrize("args, expected", [
    (["--workload", "gpt-tinny", "--strategy", "ddp"], "workload='gpt-tinny' is not registered; did you mean 'gpt-tiny'"),
    (["--workload", "gpt-tiny", "--strategy", "dpp"], "strategy='dpp' is not registered; did you mean 'ddp'"),
    (["--workload", "gpt-tiny", "--strategy", "ddp", "--workers", "0"], "workers=0: Input should be greater than or equal to 1"),
    ([*BASE, "--set", "batch_size=15"], "batch_size=15: must be divisible by workers(2) x grad_accum(1) = 2"),
    ([*BASE, "--set", "grad_accum=3", "--set", "batch_size=16"], "batch_size=16: must be divisible by workers(2) x grad_accum(3) = 6"),
    ([*BASE, "--set", "strategy.bucket_mb=big"], "strategy.bucket_mb='big': Input should be a valid number"),
    ([*BASE, "--set", "strategy.nope=1"], "strategy.nope: unknown key"),
    ([*BASE, "--set", "workload.d_model=100", "--set", "workload.n_heads=3"], "workload.d_model=100: must be divisible by n_heads=3"),
    ([*BASE, "--set", "colour=red"], "colour: unknown key (allowed: workload, strategy"),
    ([*BASE, "--set", "optim.lr=-1"], "optim.lr=-1: Input should be greater than 0"),
    ([*BASE, "--set", "optim.name=lion"], "optim.name='lion': Input should be 'adamw' or 'sgd'"),
    ([*BASE, "--set", "eval_every=-1"], "eval_every=-1: Input should be greater than or equal to 0"),
    ([*BASE, "--set", "eval_samples=0"], "eval_samples=0: Input should be greater than or equal to 1"),
    ([*BASE, "--set", "novalue"], "--set 'novalue': expected KEY=VALUE"),
    (["--workload", "gpt-tiny", "--strategy", "single", "--workers", "2"], "workers=2: strategy 'single' runs exactly 1 worker"),
    ([*BASE, "--storage", "/proc/polytrain-cannot-write-here"], "storage='/proc/polytrain-cannot-write-here': not writable"),
    ([*BASE, "--set", "workload.data=/nonexistent/shards"], "data='/nonexistent/shards': no such file or folder"),
])
def test_bad_input_is_one_line_exit_2(capsys, tmp_path, args, expected):
    if "--storage" not in args:
        args = [*args, "--storage", str(tmp_path)]
    rc, err = _cli(capsys, *args)
    assert rc == 2
    assert expected in err
    assert len(err.splitlines()) == 1, err


def test_unreachable_address_fails_fast(capsys, tmp_path):
    t0 = time.monotonic()
    rc, err = _cli(capsys, *BASE, "--storage", str(tmp_path), "--address", "127.0.0.1:1")
    assert rc == 2 and "address='127.0.0.1:1': cannot connect" in err
    assert time.monotonic() - t0 < 30
    assert not list(tmp_path.iterdir()), "nothing is written for a job that cannot start"


@pytest.mark.parametrize("content, expected", [
    ("workload: [unclosed", "malformed"),
    ("- a\n- b\n", "expected a mapping at the top level, got list"),
    ("workload: gpt-tiny\nstrategy: ddp\nwrkers: 2\n", "wrkers: unknown key"),
])
def test_bad_config_file(capsys, tmp_path, content, expected):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(content)
    rc, err = _cli(capsys, "--config", str(cfg), "--storage", str(tmp_path))
    assert rc == 2 and expected in err and len(err.splitlines()) == 1


def test_missing_config_file(capsys):
    rc, err = _cli(capsys, "--config", "/nonexistent/job.yaml")
    assert rc == 2 and "--config '/nonexistent/job.yaml': cannot read" in err


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--workers", "two"])
    assert e.value.code == 2


def test_precedence_file_then_flags_then_set(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("workload: {name: gpt-tiny, d_model: 128}\nstrategy: ddp\nworkers: 4\nsteps: 7\noptim: {lr: 0.01}\n")
    spec = load_spec(config=str(cfg), workers=2, overrides=["optim.lr=3e-3", "strategy.bucket_mb=10"])
    assert spec.workers == 2 and spec.steps == 7
    assert spec.optim.lr == pytest.approx(3e-3)
    assert spec.workload.options == {"d_model": 128}
    assert spec.strategy_options().bucket_mb == 10
    assert spec.global_batch == 8 * 2 and spec.micro_batch == 8


def test_toml_config(tmp_path):
    cfg = tmp_path / "job.toml"
    cfg.write_text('workload = "gpt-tiny"\nstrategy = "single"\nsteps = 3\n[optim]\nlr = 0.002\n')
    spec = load_spec(config=str(cfg))
    assert spec.steps == 3 and spec.optim.lr == 0.002


def test_evaluation_defaults_to_a_few_times_a_run_and_is_recorded():
    spec = JobSpec(workload="gpt-tiny", strategy="ddp", workers=2, steps=100)
    assert spec.eval_every == 25  # and after the last step, always
    assert JobSpec(workload="gpt-tiny", strategy="ddp", steps=3).eval_every == 1
    assert JobSpec.model_validate(spec.model_dump()).eval_every == 25


def test_spec_round_trips_through_yaml(tmp_path):
    import yaml

    spec = JobSpec(workload={"name": "gpt-tiny", "d_model": 64}, strategy="ddp", workers=2, batch_size=4)
    again = JobSpec(**yaml.safe_load(spec.to_yaml()))
    assert again == spec


def test_the_spec_holds_parsed_injections_and_scenarios_that_read_back_as_strings(tmp_path):
    import json

    import yaml

    from cluster.faults import Injection
    from cluster.network import Scenario

    spec = load_spec(workload="gpt-tiny", strategy="ddp", workers=4, scenario=" nodes=2,per_node=2,inter=1gbit ",
                     inject=["slow:rank=1,factor=2.0", "kill:rank=3,step=2"])
    assert all(isinstance(i, Injection) for i in spec.inject) and isinstance(spec.scenario, Scenario)
    assert (spec.inject[0].kind, spec.inject[0].factor, spec.inject[1].rank) == ("slow", 2.0, 3)
    assert spec.scenario.per_node == 2 and spec.scenario_name == "nodes=2,per_node=2,inter=1gbit"
    dumped = yaml.safe_load(spec.to_yaml())  # the strings a user writes, in canonical form
    assert dumped["inject"] == ["slow:rank=1,factor=2", "kill:rank=3,step=2"]
    assert dumped["scenario"] == "nodes=2,per_node=2,inter=1gbit"
    assert JobSpec(**dumped) == spec and JobSpec(**json.loads(spec.model_dump_json())) == spec
    local = JobSpec(workload="gpt-tiny", strategy="ddp")
    assert local.scenario is None and local.scenario_name == "local" and local.model_dump()["scenario"] == "local"


def test_python_api_raises_config_error():
    with pytest.raises(ConfigError, match=r"workers=-1"):
        JobSpec(workload="gpt-tiny", strategy="ddp", workers=-1)


def test_failed_run_exits_1(monkeypatch, capsys):
    import orchestrator.driver as driver
    from orchestrator.errors import RunFailed

    def boom(spec, **kw):
        raise RunFailed("rank 1 failed: RuntimeError: injected")

    monkeypatch.setattr(driver, "run", boom)
    rc = main(["run", "--workload", "gpt-tiny", "--strategy", "single", "--steps", "1"])
    assert rc == 1 and "rank 1 failed: RuntimeError: injected" in capsys.readouterr().err


def test_listing_commands(capsys):
    assert main(["workloads"]) == 0
    out = capsys.readouterr().out
    assert "gpt-tiny" in out and "d_model" in out and "default 256" in out
    assert main(["strategies"]) == 0
    out = capsys.readouterr().out
    assert "ddp" in out and "bucket_mb" in out and "single" in out
