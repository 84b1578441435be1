"""The projection model against closed forms at scale, its layout rules, and the
pieces of `polytrain project` that need no profiling run."""
import math

import pytest

from cluster.comm import ring_allreduce_bytes
from cluster.mesh import Layout
from cluster.network import Link, Scenario, parse_scenario
from orchestrator.project import (
    crossovers,
    default_target,
    loss_curve,
    project,
    steps_to_target,
    table,
)
from strategies.pipeline.stages import BlockProfile
from strategies.projection import Profile, Skip, Target, job_for, predict
from strategies.projection.model import Job, buckets
from workloads import WORKLOADS


def _profile(n_blocks: int, *, f=0.0, b=0.0, w=0.0, param_bytes=0, act_bytes=0) -> Profile:
    return Profile(workload="synthetic", micro_batch=1, blocks=tuple(BlockProfile(f, b, w, 0) for _ in range(n_blocks)),
                   shapes=tuple(((param_bytes // 4,),) for _ in range(n_blocks)),
                   param_bytes=(param_bytes,) * n_blocks, act_bytes=(act_bytes,) * n_blocks)


def _flat(gbit: float, latency: float, per_node: int = 1) -> Target:
    link = Link(gbit_s=gbit, latency_s=latency)
    return Target(scenario=Scenario(name="t", description="", per_node=per_node, intra=link, inter=link))


@pytest.mark.parametrize("n", [2, 3, 8, 64, 1000, 1024])
def test_ddp_comm_is_the_closed_form_ring_allreduce(n):
    """No compute to hide behind: the exposed time is 2(N-1) latencies + 2(N-1)/N of the bytes at the bandwidth."""
    size, gbit, alpha = 8 * 2**20, 25.0, 7e-6
    job = Job(strategy="ddp", layout=Layout(dp=n), microbatches=1)
    p = predict(_profile(1, param_bytes=size), job, _flat(gbit, alpha))
    closed = 2 * (n - 1) * alpha + 2 * (n - 1) * size // n * 8 / (gbit * 1e9)
    assert p.comm_s == pytest.approx(closed, rel=1e-12)
    assert p.bytes_inter == 2 * (n - 1) * size // n and p.bytes_intra == 0
    assert p.compute_s == 0 and p.bubble_s == 0


def test_an_all_reduce_inside_one_node_is_intra_and_hidden_under_backward():
    """One node of 8 holds all ranks: intra bytes; a backward longer than the all-reduce hides all but the last bucket."""
    job = Job(strategy="ddp", layout=Layout(dp=8), microbatches=1)
    p = predict(_profile(4, f=0.1, b=0.1, w=0.1, param_bytes=10 * 2**20), job, _flat(100.0, 0.0, per_node=8))
    last_bucket = 2 * 7 * (20 * 2**20) // 8 * 8 / 100e9  # buckets of 25 MiB hold two blocks each
    assert buckets([10 * 2**20] * 4) == [[3, 2], [1, 0]]
    assert p.bytes_intra > 0 and p.bytes_inter == 0
    assert p.comm_s == pytest.approx(last_bucket, rel=1e-9)


@pytest.mark.parametrize("p", [2, 4, 8, 16, 32])
@pytest.mark.parametrize("schedule, bubble", [("1f1b", lambda p, f, b, w: (p - 1) * (f + b + w)),
                                              ("zb-h1", lambda p, f, b, w: (p - 1) * (f + b - w))])
def test_pipeline_bubble_is_the_closed_form(p, schedule, bubble):
    """One block a stage, uniform F/B/W, free transfers: 1F1B idles (p-1)(F+B+W), ZB-H1 (p-1)(F+B-W).
    The only communication left is the gradient norm's all-reduce over the stages (one fp32)."""
    f, b, w, m = 1.0, 1.2, 0.7, 2 * p
    job = Job(strategy="pipeline", layout=Layout(pp=p), microbatches=m, schedule=schedule)
    pred = predict(_profile(p, f=f, b=b, w=w), job, _flat(1.0, 0.0))
    assert pred.bubble_s == pytest.approx(bubble(p, f, b, w), rel=1e-9)
    assert pred.compute_s == pytest.approx(m * (f + b + w), rel=1e-9)
    assert pred.comm_s == pytest.approx(ring_allreduce_bytes(4, p) * 8 / 1e9, rel=1e-9)


def test_cores_shared_slow_compute_and_speed_speeds_it():
    prof = _profile(2, f=1.0, b=1.0, w=1.0)
    job = Job(strategy="ddp", layout=Layout(dp=4), microbatches=1)
    assert predict(prof, job, Target(cores=2)).compute_s == pytest.approx(12.0)  # 4 workers on 2 cores
    assert predict(prof, job, _flat(1.0, 0.0)).compute_s == pytest.approx(6.0)
    assert predict(prof, job, Target(scenario=parse_scenario("internet-1g"), speed=40)).compute_s == \
        pytest.approx(6.0 / 40)


def test_a_pipeline_on_shared_cores_slows_only_while_ranks_compute_together():
    """dp=2 x pp=2 (4 ranks) on 2 cores, GPipe, m=2, F=B=W=1 s a stage. Stage 0's
    first F runs with only the other replica's beside it (2 actions, 2 cores: 1 s);
    then F1 with stage 1's F0 (4 actions: 2 s); stage 1's F1 and first BW alone
    (1 s, 2 s); both stages' BW together (4 s); stage 0's last BW alone (2 s).
    Each rank computes 9 s of a 12 s step, not 2 x 6 s as if the ranks waiting
    in their bubble still held a core (step 18 s)."""
    prof = _profile(2, f=1.0, b=1.0, w=1.0)
    job = Job(strategy="pipeline", layout=Layout(dp=2, pp=2), microbatches=2, schedule="gpipe")
    alone, shared = predict(prof, job, _flat(1e6, 0.0)), predict(prof, job, Target(cores=2))
    assert (alone.compute_s, alone.bubble_s) == pytest.approx((6.0, 3.0))  # (m + p - 1)(F + B + W) = 9
    assert (shared.compute_s, shared.bubble_s) == pytest.approx((9.0, 3.0))


@pytest.fixture(scope="module")
def gpt():
    return WORKLOADS.get("gpt-tiny")()


def test_layout_rules(gpt):
    """pipeline: the largest divisor of N within the blocks, the rest dp; sequence: the largest degree that fits."""
    job = job_for("pipeline", {}, 64, gpt, microbatches=8, n_blocks=6)
    assert (job.layout.pp, job.layout.dp) == (4, 16)
    assert job_for("pipeline", {}, 6, gpt, microbatches=8, n_blocks=6).layout.pp == 6
    with pytest.raises(Skip, match="pipeline on 1 workers"):
        job_for("pipeline", {}, 1, gpt, microbatches=8, n_blocks=6)
    seq = job_for("sequence", {}, 1024, gpt, microbatches=4, n_blocks=6)  # seq_len 128, zigzag: sp <= 64
    assert (seq.layout.sp, seq.layout.dp) == (64, 16)
    assert job_for("fsdp", {}, 8, gpt, microbatches=4, n_blocks=6).shards
    assert job_for("zero2", {}, 8, gpt, microbatches=4, n_blocks=6).zero == 2
    with pytest.raises(Skip, match="no projection model"):
        job_for("terngrad", {}, 8, gpt, microbatches=4, n_blocks=6)
    with pytest.raises(ValueError, match="strategy='nosuch'"):
        job_for("nosuch", {}, 2, gpt, microbatches=4, n_blocks=6)



def test_every_row_takes_the_same_global_batch_unless_its_options_set_micro_batches(gpt):
    """N x --microbatches micro-batches a step at every row: a data-parallel rank takes m, a replica of r
    ranks (a pipeline's stages, a sequence's shards, a mesh's pp x sp) r x m, so rows compare the same
    work a step; a strategy's own ``microbatches`` (per replica) wins, and ``project`` notes it."""
    for m in (2, 4, 6):
        jobs = {"mesh": job_for("mesh", {"dp": 2, "pp": 2}, 4, gpt, microbatches=m, n_blocks=6),
                "mesh-sp": job_for("mesh", {"fsdp": 2, "sp": 2}, 4, gpt, microbatches=m, n_blocks=6),
                "pipeline": job_for("pipeline", {}, 4, gpt, microbatches=m, n_blocks=6),
                "sequence": job_for("sequence", {}, 4, gpt, microbatches=m, n_blocks=6),
                "ddp": job_for("ddp", {}, 4, gpt, microbatches=m, n_blocks=6),
                "fsdp": job_for("fsdp", {}, 4, gpt, microbatches=m, n_blocks=6),
                "zero2": job_for("zero2", {}, 4, gpt, microbatches=m, n_blocks=6)}
        assert jobs["mesh"].layout.pp == 2 and jobs["pipeline"].layout.pp == 4 and jobs["sequence"].layout.sp == 4
        for name, job in jobs.items():
            replicas = job.layout.dp * job.layout.fsdp
            assert job.microbatches * replicas == 4 * m, name
    own = job_for("pipeline", {"microbatches": 8}, 4, gpt, microbatches=4, n_blocks=6)
    assert own.microbatches == 8 and own.options["microbatches"] == 8
    assert job_for("mesh", {"dp": 2, "pp": 2, "microbatches": 6}, 4, gpt, microbatches=4, n_blocks=6).microbatches == 6
    _, notes = project(_profile(6), gpt, [("pipeline", {"microbatches": 8}), ("ddp", {})], [4], Target(cores=2))
    assert notes == ["pipeline:microbatches=8: 8 micro-batches a replica a step (its own option), not 4"]


def test_a_row_that_cannot_exist_is_noted_once_per_reason(gpt):
    rows, notes = project(_profile(6), gpt, [("terngrad", {}), ("pipeline", {}), ("ddp", {})], [1, 2, 8],
                          Target(cores=2))
    assert [(r.strategy, r.workers) for r in rows] == [("pipeline", 2), ("pipeline", 8), ("ddp", 1), ("ddp", 2),
                                                       ("ddp", 8)]
    assert len(notes) == 2 and notes[0].startswith("terngrad: no projection model yet") and \
        notes[1].startswith("pipeline on 1 workers")


def test_sharded_memory_and_bytes_against_the_formulas():
    """FSDP holds 1/N of the parameters; it gathers each block twice per micro-batch and reduce-scatters once."""
    n, size, m = 4, 4 * 2**20, 2
    job = Job(strategy="fsdp", layout=Layout(fsdp=n), microbatches=m, shards=True)
    p = predict(_profile(3, param_bytes=size), job, _flat(10.0, 0.0, per_node=n))
    per_block = 2 * m * (n - 1) * (size // n) + (n - 1) * size // n
    assert p.bytes_intra == 3 * per_block + ring_allreduce_bytes(4, n)  # and the gradient norm (clipping)
    assert p.param_bytes_per_rank == 3 * size // n and p.state_bytes_per_rank == 4 * 3 * size // n


def test_fsdp_overlaps_its_gathers_on_a_cluster_and_nothing_on_this_machines_cpus():
    """A GPU target: FSDP2 prefetches the next block's gather under this block's compute
    and reduce-scatters under the next backward. This machine's CPU ranks (gloo; measured:
    a step's calls in flight 0.597 s, the ranks blocked in them 0.600 s) wait out every call:
    the exposed communication is all of it."""
    n, m, size = 2, 2, 4 * 2**20
    slow = parse_scenario("internet-1g")
    prof = _profile(3, f=0.2, b=0.2, w=0.2, param_bytes=size)
    job = Job(strategy="fsdp", layout=Layout(fsdp=n), microbatches=m, shards=True)
    gather = slow.seconds("all_gather", size // n, size // n, (0, 1))
    scatter = slow.seconds("reduce_scatter", size // n, size // n, (0, 1))
    norm = slow.seconds("all_reduce", ring_allreduce_bytes(4, n), ring_allreduce_bytes(4, n), (0, 1))
    calls = 3 * (2 * m * gather + scatter) + norm
    here = predict(prof, job, Target(scenario=slow, cores=n))
    assert here.comm_s == pytest.approx(calls, rel=1e-9)
    cluster = predict(prof, job, Target(scenario=slow))
    assert cluster.comm_s < 0.6 * calls  # the gathers after the first of each pass hidden, and the scatters


def test_fsdp2s_own_copies_count_once_per_micro_batch_and_only_where_it_shards():
    """``shard_s`` (FSDP2's copies in and out of its buffers, measured at world 2) is
    compute on the thread that computes: once per micro-batch, slowed like compute by
    shared cores; ddp and zero3 (DeepSpeed's) do not pay it."""
    from dataclasses import replace

    plain = _profile(2, f=0.1, b=0.1, w=0.1, param_bytes=1024)
    prof = replace(plain, shard_s=0.05)
    here = Target(cores=2)  # 4 ranks on 2 cores: twice as slow
    jobs = {"fsdp": Job(strategy="fsdp", layout=Layout(fsdp=4), microbatches=3, shards=True),
            "ddp": Job(strategy="ddp", layout=Layout(dp=4), microbatches=3),
            "zero3": Job(strategy="zero3", layout=Layout(dp=4), microbatches=3, zero=3)}
    extra = {s: predict(prof, j, here).compute_s - predict(plain, j, here).compute_s for s, j in jobs.items()}
    assert extra == {"fsdp": pytest.approx(3 * 0.05 * 2), "ddp": 0.0, "zero3": 0.0}


def test_fsdp2s_own_cost_is_measured_on_a_fake_group_that_is_gone_after():
    import torch.distributed as dist

    from orchestrator.project_profile import _shard_seconds

    assert _shard_seconds(WORKLOADS.get("mlp-wide")(), 0, 1) >= 0.0
    assert not dist.is_initialized()


def test_a_sequence_ranks_compute_is_the_measured_share_not_one_over_its_degree():
    """``Profile.sequence`` (a, b, c): a rank of a sequence group of sp shards (ring r = sp / u)
    computes a + b / sp + c x r of a micro-batch; without it 1 / sp; other strategies all of it."""
    from dataclasses import replace

    plain = _profile(2, f=0.1, b=0.1, w=0.1, param_bytes=1024, act_bytes=4096)
    measured = replace(plain, sequence=(0.1, 0.8, 0.02))
    here = Target(cores=8)  # 4 ranks, 8 cores: no sharing
    ring = Job(strategy="sequence", layout=Layout(sp=4), microbatches=3)
    ulysses = Job(strategy="sequence", layout=Layout(sp=4), microbatches=3, ulysses=2)
    blocks = 3 * 0.6  # three micro-batches of the blocks' F + B + W
    compute = lambda prof, job: predict(prof, job, here).compute_s
    assert compute(plain, ring) == pytest.approx(blocks / 4)
    assert compute(measured, ring) == pytest.approx(blocks * (0.1 + 0.8 / 4 + 0.02 * 4))
    assert compute(measured, ulysses) == pytest.approx(blocks * (0.1 + 0.8 / 4 + 0.02 * 2))
    ddp = Job(strategy="ddp", layout=Layout(dp=4), microbatches=3)
    assert compute(measured, ddp) == compute(plain, ddp) == pytest.approx(blocks)


@pytest.mark.parametrize("points,expected", [
    ([(2, 0.1 + 0.8 / 2 + 0.02 * 2), (4, 0.1 + 0.8 / 4 + 0.02 * 4), (8, 0.1 + 0.8 / 8 + 0.02 * 8)], (0.1, 0.8, 0.02)),
    ([(2, 0.5), (4, 0.25), (8, 0.125)], (0.0, 1.0, 0.0)),  # linear: 1 / s
    ([(4, 0.3)], (0.0, 1.2, 0.0)),  # one degree: b alone
    ([], ()),
    ([(2, -0.1), (4, -0.05)], ()),  # no non-negative fit: the model's 1 / s
])
def test_the_sequence_share_is_fitted_with_non_negative_terms(points, expected):
    from orchestrator.project_profile import fit_shares

    got = fit_shares(points)
    assert got == pytest.approx(expected, abs=1e-9) if expected else got == ()
    # noise that would make a term negative: the best fit without it
    a, b, c = fit_shares([(2, 0.6), (4, 0.2), (8, 0.1)])
    assert min(a, b, c) >= 0 and b > 0


@pytest.mark.parametrize("r", [2, 4, 8])
def test_the_ring_waits_for_2r_minus_1_passes_a_layer_but_sends_3r_minus_2(r):
    """Forward, k/v r - 1 times; backward, k/v r - 1 times with each dK/dV accumulator
    arriving while the next block computes (r of them): a rank waits r - 1 + r = 2r - 1
    transfers a layer and micro-batch, and sends 3r - 2 (the bytes)."""
    act, m = 2**20, 3
    prof = replace_attention(_profile(3, param_bytes=0, act_bytes=act))
    link = Link(gbit_s=1.0, latency_s=1e-2)
    target = Target(scenario=Scenario(name="t", description="", per_node=1, intra=link, inter=link))
    pred = predict(prof, Job(strategy="sequence", layout=Layout(sp=r), microbatches=m), target)
    one = link.seconds(2 * act // r, 1)
    ranks, net = tuple(range(r)), target.network(r)
    loss_share = net.seconds("all_reduce", ring_allreduce_bytes(8, r), ring_allreduce_bytes(8, r), ranks)
    grads = net.seconds("all_reduce", 0, 0, ranks)  # the (empty) gradient bucket's latencies
    assert pred.comm_s == pytest.approx((2 * r - 1) * m * one + grads + loss_share, rel=1e-6)
    assert pred.bytes_inter == (3 * r - 2) * m * 2 * act // r + ring_allreduce_bytes(8, r)


def replace_attention(prof: Profile) -> Profile:
    """``prof`` with its middle block an attention layer."""
    from dataclasses import replace

    return replace(prof, attention=(1,))


def test_a_sequence_ranks_compute_is_measured_on_fake_groups_that_are_gone_after():
    import torch.distributed as dist

    from orchestrator.project_profile import _sequence_shares

    # a micro-batch large enough, and 3 paired steps a degree, that a loaded machine's noise
    # (the suite runs two test processes on 2 cores) does not outweigh it
    gpt = WORKLOADS.get("gpt-tiny")(seq_len=32, micro_batch=8, d_model=64, n_heads=2, n_layers=2)
    (a, b, c), steps = _sequence_shares(gpt, 0, 3, per_mb=0.01)
    assert min(a, b, c) >= 0 and a + b + c > 0
    assert steps == 2 * 4 * 4  # 4 real steps of 1 and of 2 micro-batches at s = 2, 4, 8, 16 (32: 1 token, zigzag)
    assert not dist.is_initialized()


def test_only_a_projection_that_shards_the_sequence_measures_a_sequence_rank(gpt):
    from orchestrator.project import splits_sequence

    assert splits_sequence([("ddp", {}), ("sequence", {})], gpt, [2], 4)
    assert not splits_sequence([("ddp", {}), ("fsdp", {}), ("pipeline", {})], gpt, [2, 64], 4)
    assert splits_sequence([("mesh", {"sp": 2})], gpt, [4], 4)


def test_a_methods_own_step_compute_is_counted_once():
    """DeMo's step (DCT, top-k, sign) replaces AdamW's; PowerSGD's products come on top of
    AdamW's. (DeMo's counted twice over-predicted its 2-worker rows by 25-47 %.)"""
    from dataclasses import replace

    prof = replace(_profile(2, f=0.1, b=0.1, w=0.1, param_bytes=1024), optim_s=0.05,
                   outer_s={"demo": 0.3, "powersgd": 0.2})
    compute = {s: predict(prof, Job(strategy=s, layout=Layout(dp=2), microbatches=1,
                                    outer="demo" if s == "demo" else "none"), _flat(1e6, 0.0)).compute_s
               for s in ("ddp", "demo", "powersgd")}
    assert compute["ddp"] == pytest.approx(0.6 + 0.05)
    assert compute["demo"] == pytest.approx(0.6 + 0.3)
    assert compute["powersgd"] == pytest.approx(0.6 + 0.05 + 0.2)


def test_crossovers_mark_where_one_strategy_overtakes_another():
    series = {"a": [(1, 1.0), (2, 2.0), (4, 4.0)], "b": [(1, 3.0), (2, 3.0), (4, 3.0)]}
    (n, t, winner, loser), = crossovers(series)
    assert 2 < n < 4 and 2.0 < t < 4.0 and (winner, loser) == ("b", "a")


def test_time_to_target_uses_held_out_loss_where_evaluated():
    import pandas as pd

    m = pd.DataFrame({"step": [1, 2, 3, 4], "rank": 0, "loss": [3.0, 2.0, 1.0, 0.5], "samples": 8,
                      "val_loss": [math.nan, 2.5, math.nan, 1.5]})
    assert loss_curve(m) == [(2, 2.5), (4, 1.5)]
    assert loss_curve(m.drop(columns="val_loss"))[2] == (3, 1.0)
    curves = {"ddp": loss_curve(m)}
    assert default_target(curves) == 1.5 and steps_to_target(curves["ddp"], 2.0) == 4
    prof = _profile(1, f=0.5)
    rows = [predict(prof, Job(strategy=s, layout=Layout(dp=2), microbatches=1), _flat(1.0, 0.0)) for s in ("ddp", "demo")]
    df = table(rows, curves, 2.0)
    assert df.time_to_target_s.iloc[0] == pytest.approx(4 * rows[0].step_s) and math.isnan(df.time_to_target_s.iloc[1])


def _fake_run(tmp_path, strategy: str | dict, losses: list[float], run_id: str | None = None) -> str:
    from orchestrator.config import JobSpec
    from orchestrator.metrics import metrics_table
    from orchestrator.storage import RunFolder

    name = strategy if isinstance(strategy, str) else strategy["name"]
    run_id = run_id or name
    spec = JobSpec(workload={"name": "gpt-tiny", "d_model": 64, "seq_len": 32}, strategy=strategy, workers=2,
                   steps=len(losses), storage=str(tmp_path), run_id=run_id)
    folder = RunFolder(str(tmp_path), run_id)
    folder.create(spec.to_yaml())
    rows = [{"run_id": run_id, "workload": "gpt-tiny", "strategy": name, "scenario": "local", "step": s + 1,
             "rank": r, "loss": loss, "step_time_s": 0.1, "samples": 8} for s, loss in enumerate(losses) for r in (0, 1)]
    folder.compact("metrics", metrics_table(rows))
    return folder.url


def test_report_section_projects_the_reports_own_runs(tmp_path):
    import base64

    from orchestrator.project import report_section

    runs = [_fake_run(tmp_path, "ddp", [3.0, 2.0, 1.5, 1.2]), _fake_run(tmp_path, "fsdp", [3.0, 2.5, 2.0, 1.4])]
    section = report_section(runs, "internet-1g", workers=(64,))
    md, plots = section.markdown(), section.plots
    assert md.startswith("## Projection") and "internet-1g" in md and "time to loss 1.4000" in md
    assert "global batch N x 1 x 8 samples a step" in md  # the runs': 16 samples on 2 workers
    lines = [line for line in md.splitlines() if line.startswith(("| ddp |", "| fsdp |"))]
    assert [line.split(" | ")[1] for line in lines] == ["2", "64", "2", "64"]
    assert all(line.rstrip(" |").split(" | ")[-1] != "-" for line in lines)  # both runs reach the target
    (title, png), = plots
    assert "internet-1g" in title and base64.b64decode(png)[:4] == b"\x89PNG"


def test_two_settings_of_one_strategy_are_two_rows_each_with_its_own_curve(tmp_path, gpt):
    from orchestrator.project import curves_from, report_section

    low, high = {"name": "powersgd", "rank": 1}, {"name": "powersgd", "rank": 4}
    runs = [_fake_run(tmp_path, low, [3.0, 2.0, 1.9, 1.8], "r1"), _fake_run(tmp_path, high, [3.0, 1.8, 1.5, 1.2], "r4")]
    assert curves_from(runs) == {"powersgd:rank=1": [(1, 3.0), (2, 2.0), (3, 1.9), (4, 1.8)],
                                 "powersgd:rank=4": [(1, 3.0), (2, 1.8), (3, 1.5), (4, 1.2)]}
    md = report_section(runs, "internet-1g", workers=(8,)).markdown()
    cells = {tuple(c.strip() for c in ln.strip("|").split("|")[:2]): ln.strip("|").split("|")[-1].strip()
             for ln in md.splitlines() if ln.startswith("| powersgd")}
    assert set(cells) == {("powersgd:rank=1", "2"), ("powersgd:rank=1", "8"), ("powersgd:rank=4", "2"),
                          ("powersgd:rank=4", "8")}
    assert all(v != "-" for v in cells.values())  # each reaches 1.8 (the default target), on its own curve
    rows, _ = project(_profile(6), gpt, [("powersgd", {"rank": 1}), ("powersgd", {"rank": 4})], [4], Target(cores=2))
    assert [r.strategy for r in rows] == ["powersgd:rank=1", "powersgd:rank=4"]


def test_blocks_are_calibrated_to_the_real_step_and_its_fixed_cost_counts():
    from orchestrator.project import calibrate

    blocks = [BlockProfile(0.1, 0.1, 0.1, 0), BlockProfile(0.2, 0.2, 0.2, 0)]  # 0.9 s timed apart
    scaled, fixed = calibrate(blocks, one=1.3, two=2.5, optim_s=0.05)  # the real step: 1.2 s a micro-batch
    assert sum(b.total for b in scaled) == pytest.approx(1.2) and scaled[1].f == pytest.approx(2 * scaled[0].f)
    assert fixed == pytest.approx(1.3 - 1.2 - 0.05)
    assert calibrate(blocks, one=1.3, two=1.2, optim_s=0.05) == (tuple(blocks), 0.0)  # noise: as measured
    prof = Profile(**{**_profile(2, f=0.1).__dict__, "fixed_s": 0.05})
    job = Job(strategy="ddp", layout=Layout(dp=4), microbatches=1)
    assert predict(prof, job, Target(cores=2)).compute_s == pytest.approx(2 * (0.2 + 0.05))


def test_from_a_run_gives_time_to_target_in_the_printed_table(tmp_path, capsys):
    from orchestrator.cli import main

    run = _fake_run(tmp_path, "ddp", [3.0, 2.0, 1.5, 1.2])
    argv = ["project", "--workload", "gpt-tiny", "--set", "workload.d_model=64", "--set", "workload.seq_len=32",
            "--strategies", "ddp,fsdp", "--workers", "2", "--scenario", "internet-1g", "--from", run,
            "--target-loss", "1.5"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith(("ddp", "fsdp"))}
    step = float(lines["ddp"].split()[3])
    assert float(lines["ddp"].split()[-1]) == pytest.approx(3 * step, abs=0.1)  # step 3 reaches 1.5
    assert lines["fsdp"].split()[-1] == "-"  # no measured curve, and a note says so
    assert "note: fsdp: no run of it in --from (which has ddp): no time to target" in out
    assert "note: ddp:" not in out


def test_hsdp_all_reduces_the_shards_across_nodes():
    """FSDP inside each node of 4, the shards all-reduced across the 2 nodes: inter-node bytes are the ring's on 1/4."""
    size = 4 * 2**20
    job = Job(strategy="mesh", layout=Layout(dp=2, fsdp=4), microbatches=1, shards=True)
    p = predict(_profile(3, param_bytes=size), job, _flat(10.0, 0.0, per_node=4))
    assert p.bytes_inter == ring_allreduce_bytes(3 * size // 4, 2)


def test_the_target_is_this_machine_unless_a_scenario_or_speed_is_given():
    import os

    from orchestrator.project import parse_target

    here = parse_target(None, None, [2, 4])
    assert (here.scenario, here.speed, here.cores) == (None, 1.0, os.cpu_count())
    remote = parse_target("internet-1g", None, [2, 4])
    assert (str(remote.scenario), remote.speed, remote.cores) == ("internet-1g", 1.0, None)
    fast = parse_target(None, 40.0, [2])
    assert (fast.scenario, fast.speed, fast.cores) == (None, 40.0, None)
    assert parse_target("per_node=8,inter=25gbit", None, [4, 64]).scenario.per_node == 8  # 4: inside one node


def test_momentum_sgd_holds_one_buffer_adamw_two():
    prof = _profile(1, param_bytes=1000)
    adamw = predict(prof, Job(strategy="powersgd", layout=Layout(dp=2), microbatches=1), _flat(1.0, 0.0))
    sgd = predict(prof, Job(strategy="powersgd", layout=Layout(dp=2), microbatches=1, options={"optimizer": "sgd"}),
                  _flat(1.0, 0.0))
    assert (adamw.state_bytes_per_rank, sgd.state_bytes_per_rank) == (4000, 3000)


def _with_gloo(prof: Profile, **links: Link) -> Profile:
    return Profile(**{**prof.__dict__, "gloo": links})


def test_on_shared_cores_a_calls_gloo_time_is_compute_nothing_hides():
    """This machine (cores shared): the all-reduce's measured gloo time, slowed like compute by the
    sharing, adds to compute in full; a target elsewhere ignores it (closed forms unchanged)."""
    size, n = 8 * 2**20, 4
    gloo = Link(gbit_s=4.0, latency_s=1e-3)
    prof = _with_gloo(_profile(2, f=0.1, b=0.1, w=0.1, param_bytes=size), all_reduce=gloo)
    job = Job(strategy="ddp", layout=Layout(dp=n), microbatches=1)
    here = predict(prof, job, Target(cores=2))
    cpu = gloo.seconds(ring_allreduce_bytes(2 * size, n), 2 * (n - 1)) * n / 2  # one bucket; 4 ranks on 2 cores
    assert here.compute_s == pytest.approx(0.6 * n / 2 + cpu, rel=1e-9)
    assert here.comm_s == 0  # loopback is faster than gloo's own time: no wait left
    elsewhere = predict(prof, job, _flat(25.0, 7e-6))
    assert elsewhere.compute_s == pytest.approx(0.6, rel=1e-9)
    assert elsewhere.comm_s == pytest.approx(predict(_profile(2, f=0.1, b=0.1, w=0.1, param_bytes=size), job,
                                                     _flat(25.0, 7e-6)).comm_s, rel=1e-12)


def test_on_shared_cores_under_a_scenario_only_the_wait_beyond_gloos_time_is_communication():
    """A slow simulated network floors the call: its time beyond gloo's own is the exposed wait,
    so compute + comm is the floor (nothing to overlap without compute)."""
    size, n = 8 * 2**20, 2
    gloo = Link(gbit_s=4.0, latency_s=1e-3)
    prof = _with_gloo(_profile(1, param_bytes=size), all_reduce=gloo)
    slow = Scenario(name="t", description="", per_node=1, intra=Link(gbit_s=1.0, latency_s=0.0),
                    inter=Link(gbit_s=1.0, latency_s=0.0))
    p = predict(prof, Job(strategy="ddp", layout=Layout(dp=n), microbatches=1), Target(scenario=slow, cores=2))
    sent = ring_allreduce_bytes(size, n)
    assert p.compute_s == pytest.approx(gloo.seconds(sent, 2), rel=1e-9)
    assert p.compute_s + p.comm_s == pytest.approx(slow.seconds("all_reduce", sent, sent, (0, 1)), rel=1e-9)


def test_a_pipeline_stages_dp_all_reduce_lasts_at_least_gloos_time_on_shared_cores():
    gloo = Link(gbit_s=0.1, latency_s=0.0)  # far slower than loopback
    prof = _profile(2, f=0.1, b=0.1, w=0.1, param_bytes=2**20)
    job = Job(strategy="pipeline", layout=Layout(dp=2, pp=2), microbatches=2)
    plain, slowed = (predict(p, job, Target(cores=4)) for p in (prof, _with_gloo(prof, all_reduce=gloo)))
    assert slowed.comm_s - plain.comm_s == pytest.approx(gloo.seconds(ring_allreduce_bytes(2**20, 2), 2), rel=0.05)


def test_gloo_links_fit_alpha_and_beta_of_every_call_kind():
    """Two calls' times give back the link that produced them; the real micro-benchmark
    (two threads over loopback) gives a positive fit for every kind the model charges."""
    from cluster.network import rounds
    from orchestrator.project_profile import GLOO_BYTES, GLOO_OPS, _fit, gloo_links

    link = Link(gbit_s=3.0, latency_s=2e-4)
    fitted = _fit([link.seconds(s, 2) for s in GLOO_BYTES], 2)
    assert (fitted.gbit_s, fitted.latency_s) == (pytest.approx(3.0), pytest.approx(2e-4))
    links = gloo_links(repeats=1)
    assert set(links) == set(GLOO_OPS) and rounds("all_gather", 2) == 1
    assert all(v.gbit_s > 0 and v.latency_s >= 0 for v in links.values())


def test_gossip_exchanges_with_the_topologys_neighbours_across_nodes():
    """A ring over 2 nodes of 4: rank 0's neighbours are 1 and 7, so its exchange crosses nodes."""
    size = 2**20
    job = Job(strategy="gossip", layout=Layout(dp=8), microbatches=1, outer="gossip", options={"topology": "ring"})
    p = predict(_profile(1, param_bytes=size), job, _flat(10.0, 0.0, per_node=4))
    assert (p.bytes_intra, p.bytes_inter) == (0, 2 * size)


def test_this_machine_is_as_loaded_as_when_it_was_profiled():
    """Other jobs' runnable threads measured with the profile share the cores with the N
    workers: max(1, (N + others) / cores) against the profile's own max(1, (1 + others) / cores)."""
    from orchestrator.project_profile import RunQueue

    prof = Profile(**{**_profile(2, f=1.0, b=1.0, w=1.0).__dict__, "others": 2.0})
    job = Job(strategy="ddp", layout=Layout(dp=4), microbatches=1)
    assert predict(prof, job, Target(cores=2)).compute_s == pytest.approx(6.0 * (6 / 2) / (3 / 2))
    assert predict(prof, Job(strategy="ddp", layout=Layout(dp=2), microbatches=1), Target(cores=2)).compute_s == \
        pytest.approx(6.0 * 2 / 1.5)
    assert predict(prof, job, _flat(1.0, 0.0)).compute_s == pytest.approx(6.0)  # elsewhere: not this machine's load
    with RunQueue(every=0.005) as queue:
        sum(range(2_000_000))
    assert queue.samples and queue.mean >= 0.0


def test_the_range_is_the_step_predicted_again_at_the_profiles_fastest_and_slowest_compute():
    """Compute (blocks, optimizer, fixed, FSDP2's own) scales by the drift; the network's time does not; what
    compute hid is exposed as compute speeds up. No drift measured: the range is the point."""
    import dataclasses

    prof = dataclasses.replace(_profile(3, f=0.01, b=0.01, w=0.01, param_bytes=4 * 2**20), optim_s=0.004,
                               fixed_s=0.002, shard_s=0.003)
    for job in (Job(strategy="ddp", layout=Layout(dp=8), microbatches=2),
                Job(strategy="fsdp", layout=Layout(fsdp=8), microbatches=2, shards=True),
                Job(strategy="pipeline", layout=Layout(pp=3), microbatches=4)):
        point = predict(prof, job, _flat(1.0, 1e-3))
        assert point.low_s == point.high_s == point.step_s
        p = predict(dataclasses.replace(prof, drift=(0.8, 1.5)), job, _flat(1.0, 1e-3))
        assert p.step_s == point.step_s and p.low_s < p.step_s < p.high_s
        slow = predict(dataclasses.replace(prof, blocks=tuple(dataclasses.replace(b, f=b.f * 1.5, b=b.b * 1.5,
                                                                                      w=b.w * 1.5) for b in prof.blocks),
                                           optim_s=0.006, fixed_s=0.003, shard_s=0.0045), job, _flat(1.0, 1e-3))
        assert math.isclose(p.high_s, slow.step_s, rel_tol=1e-12)
        assert p.comm_s == point.comm_s  # the range is reported apart; the split is the median's
