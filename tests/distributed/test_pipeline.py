"""The pipeline strategy on gloo ranks against `single` on the same global batch.

Spawning ranks costs far more than these tiny steps, so each test starts its
ranks once and runs several jobs in them."""
import functools
import time

import pytest
import torch

from orchestrator import checkpoint
from orchestrator.checkpoint import Checkpointer
from orchestrator.config import JobSpec
from orchestrator.trainer import RankTrainer
from strategies.pipeline import HANDCRAFTED
from tests.ranks import run_ranks

# fp32 on CPU: pipelining changes only the order of floating-point sums (micro-batch
# accumulation, the B/W split, the norm over stages), so after 3 AdamW steps the
# parameters agree with single's to ~2e-7; losses are computed identically.
RTOL, ATOL = 1e-5, 1e-5
GPT2 = {"name": "gpt-tiny", "n_layers": 2, "d_model": 64, "seq_len": 32}
GPT6 = {**GPT2, "n_layers": 6}
STEPS, BATCH, M = 3, 8, 4


def _spec(workload, strategy, workers, steps=STEPS):
    return JobSpec(workload=workload, strategy=strategy, workers=workers, steps=steps, batch_size=BATCH, seed=3)


def train(rank, world, workload, strategy, steps=STEPS):
    t = RankTrainer(_spec(workload, strategy, world, steps), rank=rank, world=world, device=torch.device("cpu"))
    rows = [t.train_step() for _ in range(steps)]
    state = {k: v.detach().clone() for k, v in t.strategy.module.state_dict().items()}
    part = getattr(t.strategy, "pp", None)  # the pipeline part, where the strategy has one
    schedule = part.schedule if part else None
    return {"state": state, "rows": rows, "actions": [len(a) for a in schedule.ranks] if schedule else []}


@functools.lru_cache
def _reference(workload: tuple) -> dict:
    return train(0, 1, dict(workload), "single")


def _assert_matches_single(out: list[dict], workload: dict, replicas: int = 1):
    ref = _reference(tuple(sorted(workload.items())))
    assert set().union(*(r["state"] for r in out)) == ref["state"].keys()
    for r in out:  # every rank's blocks, every replica's copy
        for k, v in r["state"].items():
            torch.testing.assert_close(v, ref["state"][k], rtol=RTOL, atol=ATOL, msg=lambda m: f"{k}: {m}")
    for step in range(STEPS):  # the samples-weighted mean over reporting ranks is single's loss
        rows = [r["rows"][step] for r in out if r["rows"][step]["samples"]]
        assert len(rows) == replicas
        loss = sum(r["loss"] * r["samples"] for r in rows) / sum(r["samples"] for r in rows)
        assert loss == pytest.approx(ref["rows"][step]["loss"], rel=1e-6)


def slow_stage_0(rank, world):
    """gpipe with stage 0 made 50 ms slower per forward."""
    from strategies.pipeline import runtime

    forward = runtime.StepRun._forward

    def late(self, a):
        if a.stage == 0:
            time.sleep(0.05)
        forward(self, a)

    runtime.StepRun._forward = late
    try:
        return train(rank, world, GPT2, {"name": "pipeline", "schedule": "gpipe", "microbatches": M})
    finally:
        runtime.StepRun._forward = forward


def checkpoint_round_trip(rank, world, run_url):
    """zb-v for 4 steps with a checkpoint at 2; a fresh job resumed from it."""
    strategy = {"name": "pipeline", "schedule": "zb-v", "microbatches": M}
    spec = _spec(GPT2, strategy, world, steps=4)
    full = RankTrainer(spec, rank=rank, world=world, device=torch.device("cpu"))
    meta = {"workload": "gpt-tiny", "strategy": "pipeline", "format": full.strategy.checkpoint_format,
            "shapes": checkpoint.model_shapes(full.workload)}
    ck = Checkpointer(run_url, every=2, keep=2, rank=rank, world=world, meta=meta)
    losses, at_save = [], None
    while full.step < 4:
        losses.append(full.train_step()["loss"])
        if full.step == 2:
            ck.save(full)
            at_save = {k: v.clone() for k, v in full.strategy.module.state_dict().items()}
    resumed = RankTrainer(spec, rank=rank, world=world, device=torch.device("cpu"))
    checkpoint.restore(resumed, checkpoint.step_url(run_url, 2))
    more = [resumed.train_step()["loss"] for _ in range(2)]
    return {"losses": losses, "resumed": more, "at_save": at_save,
            "end": full.strategy.module.state_dict(), "end_resumed": resumed.strategy.module.state_dict()}


def two_rank_jobs(rank, world, run_url):
    out = {name: train(rank, world, GPT2, {"name": "pipeline", "schedule": name, "microbatches": M})
           for name in (*HANDCRAFTED, "auto")}
    out["slow-stage-0"] = slow_stage_0(rank, world)
    out["checkpoint"] = checkpoint_round_trip(rank, world, run_url)
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Every 2-rank job below, in one pair of processes."""
    tmp = tmp_path_factory.mktemp("pipeline")
    return run_ranks(two_rank_jobs, 2, tmp, str(tmp / "run"))


@pytest.mark.slow
@pytest.mark.parametrize("name", [*HANDCRAFTED, "auto"])
def test_every_schedule_on_2_ranks_matches_single(two_ranks, name):
    _assert_matches_single([o[name] for o in two_ranks], GPT2)


@pytest.mark.slow
@pytest.mark.parametrize("name", [*HANDCRAFTED, "auto"])
def test_timeline_and_exact_bytes(two_ranks, name):
    for r, run in enumerate(o[name] for o in two_ranks):
        row = run["rows"][-1]
        assert len(row["timeline"]) == run["actions"][r]  # every executed action, once
        assert all(start <= end for _, start, end in row["timeline"])
        # one activation or gradient of 2x32x64 fp32 per micro-batch for every boundary this
        # rank sends across (V and interleaved cross more), plus its 4 bytes of the norm all-reduce
        crossings = {"zb-v": 2, "interleaved-1f1b": 3}.get(name, 1)
        assert (row["bytes_sent"], row["bytes_received"]) == (crossings * M * 2 * 32 * 64 * 4 + 4,) * 2


@pytest.mark.slow
def test_a_blocked_receive_is_idle_time(two_ranks):
    first, second = (o["slow-stage-0"]["rows"][-1] for o in two_ranks)
    assert second["idle_s"] > 0.8 * M * 0.05  # rank 1 waited for every activation of the slow stage 0
    assert first["idle_s"] < second["idle_s"]


@pytest.mark.slow
def test_checkpoint_resumes_exactly_and_loads_into_single(two_ranks, tmp_path_factory):
    runs = [o["checkpoint"] for o in two_ranks]
    for r in runs:
        torch.testing.assert_close(torch.tensor(r["resumed"]), torch.tensor(r["losses"][2:]), rtol=0, atol=0,
                                   equal_nan=True)  # nan: the rank without the last stage reports no loss
        for k, v in r["end"].items():
            assert torch.equal(v, r["end_resumed"][k]), k
    # the same files read by the single-process strategy: the whole model at step 2
    run_url = str(next(p for p in tmp_path_factory.getbasetemp().glob("pipeline*")) / "run")
    single = RankTrainer(_spec(GPT2, "single", 1, steps=4), rank=0, world=1, device=torch.device("cpu"))
    checkpoint.restore(single, checkpoint.step_url(run_url, 2))
    saved = {k: v for r in runs for k, v in r["at_save"].items()}
    for k, v in single.strategy.module.state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert single.train_step()["loss"] == pytest.approx(runs[0]["losses"][2], rel=1e-6)


def four_rank_layouts(rank, world):
    return {
        "pp2xdp2": train(rank, world, GPT2, {"name": "pipeline", "schedule": "zb-h1", "stages": 2,
                                              "microbatches": 2}),
        "pp4": train(rank, world, GPT6, {"name": "pipeline", "schedule": "zb-v", "microbatches": M}),
    }


@pytest.mark.slow
def test_four_ranks_pipeline_by_data_parallel_and_deeper_pipeline(tmp_path):
    out = run_ranks(four_rank_layouts, 4, tmp_path)
    _assert_matches_single([o["pp2xdp2"] for o in out], GPT2, replicas=2)
    _assert_matches_single([o["pp4"] for o in out], GPT6)
