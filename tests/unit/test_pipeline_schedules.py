"""Pipeline schedules as data: generators, validator, simulator, automatic
scheduler, stage cutting, the B/W split and the charts (no processes)."""
import itertools
import random
from dataclasses import replace

import numpy as np
import pytest
import torch

from orchestrator.config import ConfigError, JobSpec
from strategies.pipeline import (
    HANDCRAFTED, Action, Op, Pipeline, PipelineOptions, Schedule, ScheduleError, StageCost, auto_schedule, generate,
    parse_action, parse_schedule, simulate, uniform_costs, validate,
)
from strategies.pipeline.backward import SplitBackward, full_backward
from strategies.pipeline.stages import partition
from workloads import WORKLOADS

SIZES = [(p, m) for p in (2, 3, 4, 8) for m in (p, 2 * p, 4 * p)]


def _sim(name, p, m, f=1.0, b=1.0, w=1.0, comm=0.0):
    s = generate(name, p, m)
    return simulate(s, uniform_costs(s, f, b, w, comm))


@pytest.mark.parametrize("name", HANDCRAFTED)
def test_every_generated_schedule_is_valid_and_round_trips(name):
    for p, m in SIZES:
        s = generate(name, p, m)
        validate(s)
        again = parse_schedule(s.format())
        assert (again.name, again.placement, again.ranks, again.microbatches) == (name, s.placement, s.ranks, m)


def test_action_string_form():
    for text in ("2F0", "0B13", "7W2", "3BW11"):
        assert str(parse_action(text)) == text
    assert parse_action("12BW3") == Action(12, Op.BW, 3)
    with pytest.raises(ValueError, match="expected STAGE OP MICROBATCH"):
        parse_action("F2")


def _schedule(*ranks: str) -> Schedule:
    text = "\n".join(f"rank {r}: {acts}" for r, acts in enumerate(ranks))
    return parse_schedule("# test: 2 stages; placement 0 1\n" + text)


@pytest.mark.parametrize("ranks, rank, step, why", [
    (("0F0 0W0 0B0", "1F0 1BW0"), 0, 1, "0W0 before 0B0"),
    (("0F0 0BW0", "1F0 1B0"), 1, 2, "1W0 missing"),
    (("0F0 0F0 0BW0", "1F0 1BW0"), 0, 1, "0F0 repeated"),
    (("0F0 0BW0 1F0", "1BW0"), 0, 2, "stage 1 lives on rank 1"),
    (("0F0 0BW0 0B0 0W0", "1F0 1BW0"), 0, 2, "already has a full backward"),
    # rank 0 waits for 1's backward of mb 0, which rank 1 runs only after F of mb 1
    (("0F0 0BW0 0F1 0BW1", "1F1 1F0 1BW0 1BW1"), 0, 1, "deadlock: 0BW0 waits for 1B0"),
])
def test_validator_names_the_first_broken_rank_and_step(ranks, rank, step, why):
    with pytest.raises(ScheduleError, match=why) as e:
        validate(_schedule(*ranks))
    assert (e.value.rank, e.value.step) == (rank, step)
    assert str(e.value).startswith(f"rank {rank}, step {step}: ")


def test_simulator_reports_a_deadlock():
    with pytest.raises(ScheduleError, match="rank 0, step 1: deadlock"):
        s = _schedule("0F0 0BW0 0F1 0BW1", "1F1 1F0 1BW0 1BW1")
        simulate(s, uniform_costs(s))


def test_unit_cost_makespans_match_the_paper():
    """p=4, m=8, T_F=T_B=T_W=1, no communication (ERRATA: ZB-H2's 24 is the per-rank span)."""
    assert _sim("1f1b", 4, 8).makespan == 33
    assert _sim("zb-h1", 4, 8).makespan == 27
    zb_h2 = _sim("zb-h2", 4, 8)
    assert zb_h2.max_span == 24 == 3 * 8 and zb_h2.makespan == 27
    assert _sim("zb-h1", 4, 8, 1, 1.5, 0.8).makespan == pytest.approx(31.5)


COSTS = [(1, 1, 1), (1, 1.5, 0.8), (2, 1, 0.5), (1, 2, 1), (1.3, 0.7, 0.7)]


@pytest.mark.parametrize("f, b, w", COSTS)
def test_closed_forms_inside_their_conditions(f, b, w):
    """1F1B: (m+p-1)(F+B+W) always (no comm); ZB-H1: m(F+B+W) + (p-1)(F+B-W) when
    W <= min(F, B), the only part of the cost space where that formula holds."""
    for p, m in [(2, 4), (3, 6), (4, 8), (8, 16), (4, 32)]:
        assert _sim("1f1b", p, m, f, b, w).makespan == pytest.approx((m + p - 1) * (f + b + w))
        if w <= min(f, b):
            assert _sim("zb-h1", p, m, f, b, w).makespan == pytest.approx(m * (f + b + w) + (p - 1) * (f + b - w))


def _cores(c):
    """Processor sharing of ``c`` cores: n actions at once each take max(1, n / c) times their cost."""
    return lambda n: max(1.0, n / c)


@pytest.mark.parametrize("name", HANDCRAFTED)
def test_shared_cores_change_nothing_while_every_rank_has_one(name):
    for p, m in [(2, 4), (4, 8)]:
        s = generate(name, p, m)
        costs = uniform_costs(s, 1.0, 1.5, 0.7, comm=0.3)
        alone, shared = simulate(s, costs), simulate(s, costs, slowdown=_cores(2 * p), copies=2)
        assert shared.makespan == pytest.approx(alone.makespan)
        assert shared.busy == pytest.approx(alone.busy)


@pytest.mark.parametrize("name, p, m", [("1f1b", 2, 8), ("1f1b", 4, 8), ("zb-h1", 4, 8), ("gpipe", 3, 6)])
def test_one_core_runs_the_whole_work_back_to_back(name, p, m):
    """Without transfers some rank can always compute, so one core shared by every
    rank (and every data-parallel copy) is never idle: the makespan is all the work."""
    s = generate(name, p, m)
    costs = uniform_costs(s, 1.0, 1.5, 0.5)
    work = m * sum(c.f + c.b + c.w for c in costs)
    assert simulate(s, costs, slowdown=_cores(1)).makespan == pytest.approx(work)
    assert simulate(s, costs, slowdown=_cores(1), copies=2).makespan == pytest.approx(2 * work)


def test_a_rank_in_its_bubble_leaves_its_core_to_the_busy_ones():
    """GPipe, p=2, m=1, two ranks on one core: each action runs alone, at full speed
    (slowing every action by the ranks, 2x, would double the step)."""
    s = generate("gpipe", 2, 1)
    costs = uniform_costs(s, 1.0, 1.0, 1.0)
    shared = simulate(s, costs, slowdown=_cores(1))
    assert shared.makespan == pytest.approx(simulate(s, costs).makespan) == pytest.approx(6.0)
    slowed = simulate(s, [replace(c, f=2 * c.f, b=2 * c.b, w=2 * c.w) for c in costs])
    assert slowed.makespan == pytest.approx(12.0)


def test_zero_bubble_conditions():
    for p in (2, 3, 4, 8):
        m = 2 * p - 1 + p  # ZB-H2 is bubble-free per rank once m >= 2p-1
        assert _sim("zb-h2", p, m).max_span == pytest.approx(3 * m)
        assert _sim("zb-v", p, 2 * p).max_span == pytest.approx(3 * 2 * p)
    assert _sim("zb-h2", 4, 4).max_span > 3 * 4  # below 2p-1 it is not


def test_peak_activations():
    for p, m in SIZES:
        assert max(_sim("zb-h2", p, m).peak_memory) <= 2 * p - 1
        assert max(_sim("zb-v", p, m).peak_memory) <= p
        assert max(_sim("zb-h1", p, m).peak_memory) <= p
        assert _sim("1f1b", p, m).peak_memory[0] == p
        assert _sim("gpipe", p, m).peak_memory[0] == m


def test_with_communication_1f1b_can_be_slower_than_gpipe():
    """ERRATA: the strict alternation waits for every transfer; the simulator says so."""
    assert _sim("1f1b", 4, 8, comm=0.5).makespan > _sim("gpipe", 4, 8, comm=0.5).makespan


def _auto(p, m, f, b, w, limit):
    flat = [StageCost(f=f, b=b, w=w)] * p
    v = [StageCost(f=f / 2, b=b / 2, w=w / 2, mem=0.5)] * (2 * p)
    return auto_schedule(p, m, flat, v_costs=v, memory_limit=limit)


@pytest.mark.parametrize("f, b, w, limit, strictly_better", [
    (1, 1, 1, 4, False), (1, 1, 2, 4, True), (1, 2, 1, 7, True), (2, 1, 1, 7, True),
])
def test_auto_is_never_worse_than_a_handcrafted_schedule_that_fits(f, b, w, limit, strictly_better):
    found = _auto(4, 8, f, b, w, limit)
    validate(found.schedule)
    assert max(found.result.peak_memory) <= limit
    fitting = [mk for name, mk, note in found.candidates
               if name in HANDCRAFTED and mk is not None and note.startswith("peak ")]
    assert found.result.makespan <= min(fitting) + 1e-9
    assert (found.result.makespan < min(fitting) - 1e-9) == strictly_better


def test_auto_under_the_smallest_memory_and_below_it():
    found = _auto(3, 6, 1, 1, 1, 1.0)
    validate(found.schedule)
    assert max(found.result.peak_memory) <= 1.0
    with pytest.raises(ValueError, match=r"memory_limit=0.5: below what any schedule needs \(1 micro-batch"):
        _auto(3, 6, 1, 1, 1, 0.5)


def test_partition_is_the_best_contiguous_cut():
    rng = random.Random(0)
    for _ in range(30):
        costs = [rng.uniform(0.1, 3) for _ in range(rng.randint(2, 9))]
        n = rng.randint(1, len(costs))
        got = partition(costs, n)
        assert got[0][0] == 0 and got[-1][1] == len(costs) and all(a < b for a, b in got)
        best = min(max(sum(costs[a:b]) for a, b in zip((0, *cuts), (*cuts, len(costs))))
                   for cuts in itertools.combinations(range(1, len(costs)), n - 1))
        assert max(sum(costs[a:b]) for a, b in got) == pytest.approx(best)
    with pytest.raises(ValueError, match="4 pipeline stages need at least 4 blocks; the workload has 3"):
        partition([1, 1, 1], 4)


GPT = {"n_layers": 2, "d_model": 32, "n_heads": 2, "seq_len": 16}


@pytest.mark.parametrize("which", ["first", "middle", "last"])
def test_split_backward_equals_full_backward(which):
    """B then W give the input gradient and weight gradients of one full backward."""
    w = WORKLOADS.get("gpt-tiny")(**GPT)
    torch.manual_seed(0)
    blocks = w.blocks()
    ids = torch.randint(0, 256, (3, 16))
    batch = (ids, torch.randint(0, 256, (3, 16)))
    stage = torch.nn.Sequential(*{"first": blocks[:2], "middle": blocks[1:3], "last": blocks[2:]}[which])
    x = ids if which == "first" else torch.randn(3, 16, 32)
    params = list(stage.parameters())

    def run(split: bool):
        for p in params:
            p.grad = None
        xin = x if which == "first" else x.clone().requires_grad_()
        sb = SplitBackward(stage)
        with sb.capturing() as cap:
            out = stage(xin)
        root = w.loss(out, batch) if which == "last" else out
        grad = None if which == "last" else torch.ones_like(out)
        if split:
            dx, pending = sb.backward_input(root, grad, xin, cap)
            assert all(p.grad is None for p in params)  # B computes no weight gradient
            sb.backward_weight(pending)
        else:
            dx = full_backward(root, grad, xin, params)
        sb.remove()
        return dx, [p.grad.clone() for p in params]

    (dx_split, g_split), (dx_full, g_full) = run(True), run(False)
    if which != "first":
        torch.testing.assert_close(dx_split, dx_full, rtol=1e-6, atol=1e-7)
    for a, b in zip(g_split, g_full):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


WL = {"name": "gpt-tiny", "n_layers": 2, "d_model": 32, "n_heads": 2, "seq_len": 16}


@pytest.mark.parametrize("options, workers, expected", [
    ({"stages": 2, "schedule": "zb-v"}, 4, None),
    ({"stages": 3}, 4, "workers=4: must be divisible by strategy.stages=3 (workers = stages x data-parallel"),
    ({"stages": 4, "schedule": "zb-v"}, 4, "cuts the model into 8 stages, more than the workload's 4 blocks"),
    ({"microbatches": 3, "schedule": "zb-h1"}, 4, "microbatches=3: schedule 'zb-h1' on 4 stages needs at least 4"),
    ({"microbatches": 6, "schedule": "interleaved-1f1b", "stages": 2}, 2, None),
    ({"microbatches": 5, "schedule": "interleaved-1f1b"}, 2, "microbatches=5: interleaved-1f1b needs a multiple of"),
    ({"schedule": "zb-h2", "memory_limit": 3}, 2, None),
    ({"schedule": "zb-h2", "memory_limit": 2}, 2, "memory_limit=2: schedule 'zb-h2' holds 3 micro-batches"),
])
def test_bad_layouts_are_one_line_errors_with_the_numbers(options, workers, expected):
    workload = WORKLOADS.get("gpt-tiny")(**{k: v for k, v in WL.items() if k != "name"})
    opts = PipelineOptions(**options)  # without `stages`, p comes from the workers: check_job finds it
    if expected is None:
        Pipeline.check_job(workers=workers, workload=workload, options=opts)
        return
    with pytest.raises(ValueError) as e:
        Pipeline.check_job(workers=workers, workload=workload, options=opts)
    assert expected in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("strategy, expected", [
    ({"memory_limit": 0.5}, "strategy.memory_limit=0.5: below what any schedule needs (1 micro-batch"),
    ({"stages": 4, "microbatches": 2, "schedule": "1f1b"}, "strategy.microbatches=2: schedule '1f1b' on 4 stages"),
    ({"schedule": "zb-x"}, "strategy.schedule='zb-x': Input should be 'gpipe', '1f1b'"),
])
def test_bad_options_through_the_job_spec(strategy, expected):
    with pytest.raises(ConfigError) as e:
        JobSpec(workload=WL, strategy={"name": "pipeline", **strategy}, workers=4, steps=1)
    assert expected in str(e.value)


def test_charts_and_show(tmp_path):
    from strategies.pipeline.gantt import draw_timeline
    from strategies.pipeline.show import show

    text = show("zb-h1", 4, 8, out=str(tmp_path / "zb.png"), echo=False)
    assert "makespan 27" in text and "rank  3 |" in text and "rank 0: 0F0 0F1 0F2 0F3 0B0" in text
    assert (tmp_path / "zb.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [(1, r, str(a), s, e) for r, times in enumerate(_sim("zb-v", 2, 4).times) for a, s, e in times]
    draw_timeline(rows, str(tmp_path / "measured.png"))
    assert (tmp_path / "measured.png").stat().st_size > 1000
    auto = show("auto", 2, 4, costs=(1, 2, 1), memory_limit=3, out=str(tmp_path / "auto.png"), echo=False)
    assert auto.startswith("auto (found: ")


def test_pipeline_show_command(tmp_path, capsys):
    from orchestrator.cli import main

    out = tmp_path / "h2.png"
    assert main(["pipeline", "show", "--schedule", "zb-h2", "--stages", "4", "--microbatches", "8",
                 "--out", str(out)]) == 0
    assert "per-rank span 24" in capsys.readouterr().out and out.exists()  # ERRATA: ZB-H2's span at p=4, m=8
    assert main(["pipeline", "show", "--costs", "1,2"]) == 2
    assert "--costs='1,2'" in capsys.readouterr().err
    assert main(["pipeline", "show", "--schedule", "zb-h2", "--microbatches", "3"]) == 2
    assert "microbatches=3" in capsys.readouterr().err
