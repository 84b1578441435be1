"""Metric rows reach storage as they come (append-only Parquet parts, compacted at
the end), are read whole from a folder whose driver was killed, and a resume
names the steps whose rows were lost. SIGTERM and SIGHUP take Ctrl-C's path."""
import io
import os
import signal
import time
import uuid

import pandas as pd
import pytest
import torch

from cluster.controls import Flushed
from orchestrator import checkpoint
from orchestrator.config import JobSpec
from orchestrator.controller import Controller, GroupStatus
from orchestrator.driver import Interrupted, RunResult, StopSignals
from orchestrator.messages import Committing, Flush, Row
from orchestrator.metrics import METRIC_COLUMNS, MetricsLog, final_attempt, read_log
from orchestrator.progress import Progress
from orchestrator.report import load_run
from orchestrator.storage import PARTS, RunFolder
from orchestrator.trainer import Attempt, RankTrainer

W = {"name": "gpt-tiny", "n_layers": 1, "d_model": 32, "seq_len": 32}


@pytest.fixture(params=["local", "memory"])
def folder(request, tmp_path):
    storage = str(tmp_path) if request.param == "local" else f"memory://durable-{uuid.uuid4().hex}"
    f = RunFolder(storage, "r")
    f.create("x: 1\n")
    return f


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _row(step, rank, **extra):
    return dict(step=step, rank=rank, loss=1.0, step_time_s=0.1, compute_s=0.08, comm_s=0.03, idle_s=0.02,
                bytes_sent=10, bytes_received=10, samples=8, tokens=64, peak_mem_bytes=1, wall_time=float(step),
                attempt=0.0, **extra)


def _log(folder, clock=None, **kw):
    return MetricsLog(folder, run_id="r", workload="w", strategy="s", scenario="local", clock=clock or Clock(), **kw)


def _parts(folder, log="metrics"):
    path = f"{folder.path}/{PARTS}/{log}"
    return sorted(folder.fs.ls(path, detail=False)) if folder.fs.exists(path) else []


def _steps(df):
    return list(zip(df.step, df["rank"]))


def test_rows_reach_storage_within_a_second_as_parts(folder):
    clock = Clock()
    log = _log(folder, clock)
    log.add_row(_row(1, 0))
    log.maybe_flush()
    assert read_log(folder, "metrics") is None  # not a second yet
    clock.t = 1.0
    log.maybe_flush()  # the first rows: a part, compacted at once (the file held none)
    assert _steps(read_log(folder, "metrics")) == [(1, 0)]
    for step, rank in ((1, 1), (2, 0)):
        clock.t += 1.0
        log.add_row(_row(step, rank, grad_norm=0.5))
        log.event("straggler", step=step)
        log.maybe_flush()
    # three rows stored, two of them only as parts so far: readers see all three
    assert len(_parts(folder)) == 1 and len(pd.read_parquet(folder.fs.open(f"{folder.path}/metrics.parquet"))) == 2
    df = read_log(folder, "metrics")
    assert _steps(df) == [(1, 0), (1, 1), (2, 0)]
    assert list(df.columns) == METRIC_COLUMNS + ["attempt", "grad_norm"]
    assert df.grad_norm.isna().tolist() == [True, False, False]
    assert read_log(folder, "events").kind.tolist() == ["straggler", "straggler"]


def test_compaction_at_the_end_leaves_single_files(folder):
    log = _log(folder)
    for step in (1, 2, 3):
        for rank in (1, 0):
            log.add_row(_row(step, rank))
        log.event("checkpoint", step=step)
        log.add_timeline(step, 0, [("F0", 0.0, 1.0)])
        log.sync()  # parts only, as a driver killed before compacting leaves them
    assert len(_parts(folder)) == 3 and not folder.exists("metrics.parquet")
    log.flush()
    assert not folder.fs.exists(f"{folder.path}/{PARTS}")
    for name, rows in (("metrics", 6), ("events", 3), ("timeline", 3)):
        with folder.fs.open(f"{folder.path}/{name}.parquet") as f:
            alone = pd.read_parquet(f)
        assert len(alone) == rows
        pd.testing.assert_frame_equal(alone, read_log(folder, name))
    assert _steps(read_log(folder, "metrics")) == [(s, r) for s in (1, 2, 3) for r in (0, 1)]


def test_a_folder_with_parts_only_reads_whole_everywhere(folder):
    log = _log(folder)
    for step in (1, 2):
        log.add_row(_row(step, 0))
        log.event("checkpoint", step=step, detail="url")
        log.sync()
    del log  # the driver was killed: nothing compacted
    assert not folder.exists("metrics.parquet") and not folder.exists("events.parquet")
    result = RunResult(run_id="r", url=folder.url, steps=2, wall_s=0.0, final_loss=1.0)
    assert result.metrics.step.tolist() == [1, 2]
    assert result.events.kind.tolist() == ["checkpoint", "checkpoint"]
    assert load_run(folder.url).metrics.step.tolist() == [1, 2]


def test_parts_and_compacted_file_read_together_and_compaction_is_idempotent(folder):
    log = _log(folder)
    log.add_row(_row(1, 0))
    log.flush()
    log.add_row(_row(2, 0))
    log.sync()
    assert read_log(folder, "metrics").step.tolist() == [1, 2]
    # a compaction interrupted after writing the file, before removing its parts:
    # the parts come back, and no row is counted twice
    kept = {p: folder.fs.cat_file(p) for p in _parts(folder)}
    log.flush()
    for p, data in kept.items():
        folder.fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
        folder.fs.pipe_file(p, data)
    assert _parts(folder)
    assert read_log(folder, "metrics").step.tolist() == [1, 2]
    log.flush()  # and compacting again changes nothing
    assert read_log(folder, "metrics").step.tolist() == [1, 2]
    log.add_row(_row(3, 0))
    log.flush()  # the next compaction takes the leftovers along
    assert read_log(folder, "metrics").step.tolist() == [1, 2, 3]
    assert not _parts(folder)


def _history(folder, steps, partial=()):
    """A run whose driver was killed: parts only, rows of ``steps`` for ranks 0 and 1
    (only rank 0 for ``partial``)."""
    log = _log(folder)
    for step in steps:
        for rank in (0,) if step in partial else (0, 1):
            log.add_row(_row(step, rank))
        log.event("checkpoint", step=step)
        log.sync()


def test_resume_keeps_rows_up_to_the_checkpoint_and_names_lost_steps(folder):
    _history(folder, [1, 2, 3, 4, 5, 6, 7, 8, 10, 11], partial=(3,))  # step 9's rows never arrived
    log = _log(folder)
    assert log.keep_history(up_to_step=9) == [3, 9]
    gap = [e for e in log.events if e["kind"] == "gap"]
    assert len(gap) == 1 and gap[0]["step"] == 3 and "step(s) 3, 9:" in gap[0]["detail"]
    # storage holds exactly the history kept: rows after the checkpoint are gone, parts compacted
    stored = read_log(folder, "metrics")
    assert stored.step.max() == 8 and not _parts(folder)
    assert read_log(folder, "events").kind.tolist() == ["checkpoint"] * 10 + ["gap"]
    for step in (10, 11):  # the resumed run redoes them
        for rank in (0, 1):
            log.add_row(_row(step, rank))
    log.flush()
    final = final_attempt(read_log(folder, "metrics"))
    assert sorted(set(range(1, 12)) - set(final.step)) == [9]


def test_resume_without_lost_steps_adds_no_gap(folder):
    _history(folder, [1, 2, 3])
    log = _log(folder)
    assert log.keep_history(up_to_step=3) == []
    assert "gap" not in [e["kind"] for e in log.events]


def test_resume_from_another_runs_checkpoint_adds_no_gap(folder):
    log = _log(folder)  # this folder has no rows: the checkpoint's steps ran in another run folder
    assert log.keep_history(up_to_step=6) == []
    assert log.events == []


class _CommitGroup:
    """Rank 0 asks (a flush mark) to commit step 1 before rank 1's step-1 row has
    been taken; at the answer, both rows must be on storage."""

    def __init__(self, folder):
        self.folder, self.polls, self.answers = folder, 0, []

    def start(self, attempt):
        pass

    def poll(self):
        self.polls += 1
        row = lambda rank: Row(values={**_row(1, rank), "attempt": None})  # noqa: E731
        if self.polls == 1:
            return GroupStatus(rows=[row(0), Committing(rank=0, step=1, seconds=0.5, url="u"), Flush(mark=1)])
        if self.polls == 2:
            return GroupStatus(rows=[row(1)])
        return GroupStatus(finished={0, 1})

    def control(self, msg):
        stored = read_log(self.folder, "metrics")
        events = read_log(self.folder, "events")
        self.answers.append((self.polls, msg, _steps(stored), events.kind.tolist()))

    def shutdown(self):
        pass


def test_the_commit_waits_until_every_ranks_rows_are_stored(folder):
    spec = JobSpec(workload=W, strategy="ddp", workers=2, steps=1, batch_size=8)
    group = _CommitGroup(folder)
    log = MetricsLog(folder, run_id="r", workload="w", strategy="ddp", scenario="local", flush_every_s=3600)
    Controller(spec, lambda: group, log, Progress(1, enabled=False, stream=io.StringIO()),
               first=Attempt(world=2)).run()
    assert group.answers == [(2, Flushed(mark=1), [(1, 0), (1, 1)], ["checkpoint"])]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one process, as meant
def test_a_checkpoint_commits_only_after_its_hook_and_a_snapshot_never_waits(tmp_path):
    spec = JobSpec(workload=W, strategy="single", steps=2, batch_size=8, seed=1)
    trainer = RankTrainer(spec, rank=0, world=1, device=torch.device("cpu"))
    trainer.train_step()
    seen = []

    def committing(step, url, seconds):
        seen.append((step, os.path.exists(os.path.join(url, checkpoint.MARKER)), seconds >= 0))

    meta = {"workload": "gpt-tiny", "strategy": "single", "format": "dcp", "shapes": {}}
    ck = checkpoint.Checkpointer(str(tmp_path), every=1, keep=2, rank=0, world=1, meta=meta, committing=committing)
    url = ck.save(trainer)
    assert seen == [(1, False, True)] and os.path.exists(os.path.join(url, checkpoint.MARKER))
    assert checkpoint.snapshot_files(trainer, meta)  # its own Checkpointer: no hook, no wait


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_stop_signals_raise_interrupted_once_then_the_old_handler_is_back(sig):
    before = signal.getsignal(sig)
    with pytest.raises(Interrupted) as info:
        with StopSignals():
            os.kill(os.getpid(), sig)
            time.sleep(5)  # the handler raises before this ends
    assert info.value.signum == sig and isinstance(info.value, KeyboardInterrupt)
    assert signal.getsignal(sig) is before
    with StopSignals():  # a second signal while the first one's teardown runs is not raised
        with pytest.raises(Interrupted):
            os.kill(os.getpid(), sig)
            time.sleep(5)
        os.kill(os.getpid(), sig)
        time.sleep(0.1)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_cli_exits_128_plus_the_signal(monkeypatch, tmp_path, capsys, sig, code):
    from orchestrator import driver
    from orchestrator.cli import main

    def inside_ray(spec, **kw):  # Ray turns an exception raised in a signal handler into a plain KeyboardInterrupt
        try:
            os.kill(os.getpid(), sig)
            time.sleep(5)
        except KeyboardInterrupt:
            raise KeyboardInterrupt() from None

    monkeypatch.setattr(driver, "_run", inside_ray)
    before = signal.getsignal(sig)
    assert main(["run", "--workload", "gpt-tiny", "--strategy", "ddp", "--steps", "1", "--storage",
                 str(tmp_path)]) == code
    assert f"interrupted ({signal.Signals(sig).name})" in capsys.readouterr().err
    assert signal.getsignal(sig) is before


def test_a_run_written_before_a_column_existed_reads_with_it_empty(folder):
    import pyarrow as pa

    old = pa.Table.from_pylist([{"run_id": "r", "step": 1, "rank": 0, "loss": 1.0, "grad_norm": 0.5}])
    folder.write_table("metrics.parquet", old)
    df = read_log(folder, "metrics")
    assert list(df.columns) == METRIC_COLUMNS + ["grad_norm"]
    assert df.loss.iloc[0] == 1.0 and df.bytes_inter.isna().all()
