"""compare(), and a worker that fails mid-run."""
import pandas as pd

from orchestrator import JobSpec, compare
from orchestrator.cli import main
from tests import plugin_sources as src

MLP = {"name": "mlp-wide", "in_dim": 32, "hidden": 128, "layers": 2, "n_samples": 512}


def test_compare_summarises_each_run(ray_address, tmp_path):
    specs = [JobSpec(workload=MLP, strategy=s, workers=w, steps=6, batch_size=16, storage=str(tmp_path))
             for s, w in (("single", 1), ("ddp", 2))]
    result = compare(specs, progress=False)
    summary = result.summary
    assert summary.strategy.tolist() == ["single", "ddp"] and summary.workers.tolist() == [1, 2]
    assert summary.bytes_sent_per_step.tolist()[0] == 0 and summary.bytes_sent_per_step.tolist()[1] > 0
    assert (summary.median_step_s > 0).all() and summary.final_accuracy.between(0, 1).all()
    # same seed, same global batches: ddp tracks single's loss
    assert abs(summary.final_loss[0] - summary.final_loss[1]) < 1e-4


def test_worker_failure_exits_1_and_keeps_what_was_written(ray_address, tmp_path, capsys):
    path = tmp_path / "failing_model.py"
    path.write_text(src.FAILS_AT_STEP_3.format(name="fails-reg"))
    rc = main(["run", "--workload", f"{path}:FailsAtStep3", "--strategy", "ddp", "--workers", "2", "--steps", "10",
               "--storage", str(tmp_path), "--run-id", "f", "--address", ray_address, "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "rank 1 failed: RuntimeError: injected failure in loss" in err
    df = pd.read_parquet(tmp_path / "f" / "metrics.parquet")
    assert set(df.step) == {1, 2}  # the steps before the failure, from both ranks
    events = pd.read_parquet(tmp_path / "f" / "events.parquet")
    assert {"worker_error", "failure:error", "decision:raise"} <= set(events.kind)


def test_sharded_strategies_run_on_one_worker(ray_address, tmp_path):
    """ddp/fsdp need a process group even at world size 1 (a benchmark once found they had none)."""
    from orchestrator import run

    for strategy in ("ddp", "fsdp"):
        result = run(JobSpec(workload=MLP, strategy=strategy, workers=1, steps=2, batch_size=8,
                             storage=str(tmp_path)), progress=False)
        assert len(result.metrics) == 2 and (result.metrics.bytes_sent == 0).all()
