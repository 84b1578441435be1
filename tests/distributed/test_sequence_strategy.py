"""The `sequence` strategy against `single` on the same full-length sequences: same
parameters after 3 steps, same loss, per-layer bytes equal to the formulas, every
byte of the step accounted; its checkpoints load into `single`; bad jobs rejected
on the driver with the numbers."""

import pytest
import torch

from cluster import ring_allreduce_bytes
from orchestrator.config import ConfigError, JobSpec
from orchestrator.trainer import RankTrainer
from strategies import STRATEGIES
from strategies.sequence import SequenceOptions
from tests.distributed.test_ddp import full_state
from tests.ranks import run_ranks
from workloads import WORKLOADS

# As for ddp (fp32, CPU): only the order of floating-point sums differs (attention
# blocks merged by log-sum-exp, loss shares and gradients summed over ranks).
RTOL, ATOL = 1e-5, 1e-5
WORKLOAD = {"name": "gpt-tiny", "n_layers": 2, "d_model": 64, "n_heads": 4, "seq_len": 32}
STEPS, BATCH = 3, 8
# (options, workers): USP 2x2 on one sequence group; ring x dp; ulysses x dp.
CONFIGS = [
    ({"ulysses": 2, "ring": 2, "layout": "zigzag"}, 4),
    ({"ulysses": 1, "ring": 2, "layout": "zigzag"}, 4),
    ({"ulysses": 2, "ring": 1, "layout": "contiguous"}, 4),
]


def _spec(strategy, workers: int) -> JobSpec:
    return JobSpec(workload=WORKLOAD, strategy=strategy, workers=workers, steps=STEPS, batch_size=BATCH, seed=3)


def train(rank: int, world: int, strategy, ckpt: str | None = None) -> dict:
    trainer = RankTrainer(_spec(strategy, world), rank=rank, world=world, device=torch.device("cpu"))
    rows = [trainer.train_step() for _ in range(STEPS)]
    if ckpt:
        trainer.strategy.save_checkpoint(ckpt)
    params = sum(p.numel() * p.element_size() for p in trainer.strategy.module.parameters())
    return {"state": full_state(trainer.strategy.module), "rows": rows, "param_bytes": params}


def train_all(rank: int, world: int, ckpt: str) -> list[dict]:
    return [train(rank, world, {"name": "sequence", **o}, ckpt if i == 0 else None)
            for i, (o, _) in enumerate(CONFIGS)]


def expected_layer_bytes(u: int, r: int, b: int) -> tuple[int, int]:
    """Per layer per rank, forward and backward (see test_sequence_attention)."""
    hidden, n_group, elt = WORKLOAD["d_model"], WORKLOAD["seq_len"] // r, 4
    a2a = 4 * b * n_group * hidden * (u - 1) // u**2 * elt
    kv = 2 * b * n_group * hidden // u * elt
    return a2a + (r - 1) * kv, a2a + (r - 1) * kv + (r if r > 1 else 0) * kv


@pytest.mark.slow  # one 4-process run: ~25 s on an idle 2-core machine, mostly process start-up
def test_sequence_matches_single(tmp_path):
    ref = train(0, 1, "single")
    out = run_ranks(train_all, 4, tmp_path, str(tmp_path / "ckpt"))
    for i, (options, world) in enumerate(CONFIGS):
        u, r = options["ulysses"], options["ring"]
        sp, dp = u * r, world // (u * r)
        for rank in range(world):
            got = out[rank][i]
            for k, v in ref["state"].items():
                torch.testing.assert_close(got["state"][k], v, rtol=RTOL, atol=ATOL,
                                           msg=lambda m: f"{options}, rank {rank}, {k}: {m}")
            fwd, bwd = expected_layer_bytes(u, r, BATCH // dp)
            for step, row in enumerate(got["rows"]):
                # before clipping: catches a gradient off by a constant factor, which AdamW would hide
                assert row["grad_norm"] == pytest.approx(ref["rows"][step]["grad_norm"], rel=1e-5)
                assert (row["sp_fwd_bytes_per_layer"], row["sp_bwd_bytes_per_layer"]) == (fwd, bwd)
                # every byte of the step: attention, gradient all-reduce over all ranks, loss over the group
                total = (WORKLOAD["n_layers"] * (fwd + bwd) + ring_allreduce_bytes(got["param_bytes"], world)
                         + ring_allreduce_bytes(8, sp))
                assert (row["bytes_sent"], row["bytes_received"]) == (total, total), (options, rank, step)
                if rank % sp == 0:  # one rank per sequence group reports its replica's samples and loss
                    assert row["samples"] == BATCH // dp and row["tokens"] == BATCH // dp * WORKLOAD["seq_len"]
                else:
                    assert row["samples"] == 0 and row["loss"] != row["loss"]
        for step in range(STEPS):  # the step's loss: samples-weighted over reporting ranks
            rows = [out[rank][i]["rows"][step] for rank in range(0, world, sp)]
            loss = sum(row["loss"] * row["samples"] for row in rows) / BATCH
            assert loss == pytest.approx(ref["rows"][step]["loss"], rel=1e-5, abs=1e-6), (options, step)
    # the usp run's checkpoint (DCP, the format of single and ddp) loads into single exactly
    single = RankTrainer(_spec("single", 1), rank=0, world=1, device=torch.device("cpu"))
    single.strategy.load_checkpoint(str(tmp_path / "ckpt"))
    for k, v in full_state(single.strategy.module).items():
        torch.testing.assert_close(v, out[0][0]["state"][k], rtol=0, atol=0)


# -- bad jobs, rejected on the driver (no processes) ----------------------------------------


def _check(workers: int, workload: dict | None = None, **options) -> None:
    w = WORKLOADS.get("gpt-tiny")(**{**{k: v for k, v in WORKLOAD.items() if k != "name"}, **(workload or {})})
    STRATEGIES.get("sequence").check_job(workers=workers, workload=w, options=SequenceOptions(**options))


@pytest.mark.parametrize("workers,workload,options,msg", [
    (3, {"n_heads": 4}, {"ulysses": 3}, r"^strategy.ulysses=3: must divide workload.n_heads=4$"),
    (4, {"seq_len": 36}, {"ulysses": 2, "ring": 2},
     r"^workload.seq_len=36: must be divisible by 2 x ulysses\(2\) x ring\(2\) = 8 for layout=zigzag$"),
    (4, {"seq_len": 30}, {"ulysses": 2, "ring": 2, "layout": "contiguous"},
     r"^workload.seq_len=30: must be divisible by ulysses\(2\) x ring\(2\) = 4 for layout=contiguous$"),
    (6, {}, {"ulysses": 2, "ring": 2}, r"^strategy.ulysses\(2\) x strategy.ring\(2\) = 4 must divide workers=6$"),
    (4, {}, {"ulysses": 3}, r"^strategy.ulysses\(3\) x strategy.ring\(1\) = 3 must divide workers=4$"),
])
def test_bad_jobs_are_rejected_with_the_numbers(workers, workload, options, msg):
    with pytest.raises(ValueError, match=msg):
        _check(workers, workload, **options)


def test_the_job_spec_rejects_them_before_any_worker_starts():
    with pytest.raises(ConfigError, match=r"workload.seq_len=36: must be divisible by 2 x ulysses\(2\)"):
        JobSpec(workload={**WORKLOAD, "seq_len": 36}, strategy={"name": "sequence", "ulysses": 2, "ring": 2},
                workers=4, batch_size=8)


def test_good_jobs_pass_and_other_workloads_are_refused():
    _check(4, ulysses=2, ring=2)
    _check(8, ulysses=2, ring=2)  # dp = 2
    _check(4, ulysses=4)  # ring defaults to workers / ulysses = 1
    replicas = STRATEGIES.get("sequence").replicas
    assert replicas(workers=8, options=SequenceOptions(ulysses=2, ring=2)) == 2
    assert replicas(workers=8, options=SequenceOptions(ulysses=2)) == 1  # ring = 4 by default
    with pytest.raises(ValueError, match="cannot train workload='mlp-wide'"):
        STRATEGIES.get("sequence").check_job(workers=2, workload=WORKLOADS.get("mlp-wide")())


def test_attention_that_is_not_sdpa_is_refused():
    from strategies.sequence.strategy import attention_is_causal

    assert attention_is_causal(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert not attention_is_causal(torch.nn.functional.scaled_dot_product_attention)
    with pytest.raises(ValueError, match="neither causal nor full"):
        attention_is_causal(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=1.0))
