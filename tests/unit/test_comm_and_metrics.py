import math

import pandas as pd
import pytest

from cluster import broadcast_bytes, ring_allreduce_bytes
from orchestrator.metrics import METRIC_COLUMNS, MetricsLog
from orchestrator.storage import RunFolder
from strategies.base import OptimConfig
from strategies.optim import lr_factor


@pytest.mark.parametrize("world, expected", [(1, 0), (2, 1000), (4, 1500), (8, 1750)])
def test_ring_allreduce_bytes(world, expected):
    assert ring_allreduce_bytes(1000, world) == expected  # 2 (w-1)/w x bytes


def test_broadcast_bytes():
    assert broadcast_bytes(100, 4, is_root=True) == (300, 0)
    assert broadcast_bytes(100, 4, is_root=False) == (0, 100)


def test_lr_schedule_warmup_then_cosine_to_floor():
    cfg = OptimConfig(warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg, 100) == pytest.approx(0.1)
    assert lr_factor(9, cfg, 100) == pytest.approx(1.0)
    assert lr_factor(55, cfg, 100) == pytest.approx(0.55)  # half way down the cosine
    assert lr_factor(100, cfg, 100) == pytest.approx(0.1)


def _row(step, rank):
    return dict(step=step, rank=rank, loss=1.0, step_time_s=0.1, compute_s=0.08, comm_s=0.03, idle_s=0.02,
                bytes_sent=10, bytes_received=10, samples=8, tokens=1024, peak_mem_bytes=1, wall_time=0.0,
                grad_norm=0.5)


def test_metrics_written_atomically_with_required_columns_first():
    folder = RunFolder("memory://polytrain-metrics-test", "run1")
    folder.create("x: 1\n")
    log = MetricsLog(folder, run_id="run1", workload="w", strategy="s", scenario="local")
    for step in (2, 1):
        for rank in (1, 0):
            log.add_row(_row(step, rank))
    log.event("phase:ray_start", seconds=1.5)
    log.flush()
    df = folder.read_table("metrics.parquet")
    assert list(df.columns) == METRIC_COLUMNS + ["grad_norm"]
    assert list(zip(df.step, df["rank"])) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert (df.run_id == "run1").all() and df.bytes_sent.dtype == "int64"
    events = folder.read_table("events.parquet")
    assert events.kind.tolist() == ["phase:ray_start"] and events.seconds[0] == 1.5
    assert not folder.fs.exists(f"{folder.path}/.metrics.parquet.tmp")


def test_comm_progress_counts_the_calls_entered_since_take_stats():
    from cluster import Comm

    comm = Comm()
    comm.charge(lambda a: None, 8, 8, op="all_gather")
    comm.charge(lambda a: None, 8, 8, op="all_reduce")
    assert comm.progress() == {"ops": 2, "op": "all_reduce", "in_flight": 0}
    comm.take_stats()  # a step's start
    assert comm.progress()["ops"] == 0


def test_a_failed_async_all_reduce_fails_the_future_ddp_waits_on(monkeypatch):
    """A peer lost mid all-reduce must fail the step, not hand DDP the unreduced gradient."""
    import torch

    from cluster import Comm
    from cluster import comm as comm_module

    class Failed:
        def get_future(self):
            fut = torch.futures.Future()
            fut.set_exception(RuntimeError("Connection closed by peer"))
            return fut

    monkeypatch.setattr(comm_module.dist, "all_reduce", lambda *a, **k: Failed())
    comm = Comm()
    comm.world = 2  # as if in a group of two
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        comm.all_reduce_async(torch.ones(3)).wait()
