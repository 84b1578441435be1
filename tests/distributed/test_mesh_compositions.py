"""`--strategy mesh` compositions against `single` on the same global batch: the
parameters after 3 steps and every step's loss within the tolerance of the other
"matches single" tests (only the order of floating-point sums differs); a
composition's checkpoint loads into `single`; the outer methods cut inter-node
bytes. One 4-process run holds every composition (process start-up dominates)."""

import math

import pytest
import torch

from orchestrator.config import JobSpec
from orchestrator.trainer import RankTrainer
from tests.distributed.test_ddp import full_state
from tests.ranks import run_ranks

RTOL, ATOL = 1e-5, 1e-5  # as test_sequence_strategy: fp32 on CPU, sums in another order
WORKLOAD = {"name": "gpt-tiny", "n_layers": 2, "d_model": 64, "n_heads": 4, "seq_len": 32}
STEPS, BATCH = 3, 8
# Each with 4 workers; microbatches=2 so a pipeline replica's 4 or 8 samples split evenly.
EXACT = [
    {"pp": 2, "fsdp": 2, "microbatches": 2},  # pipeline x FSDP (1F1B: full backward)
    {"pp": 2, "fsdp": 2, "microbatches": 2, "schedule": "zb-h1"},  # ... with the B/W split
    {"sp": 2, "fsdp": 2},  # sequence (ring 2) x FSDP
    {"pp": 2, "sp": 2, "ulysses": 2, "microbatches": 2},  # pipeline x sequence (Ulysses 2)
    {"fsdp": 2, "dp": 2},  # HSDP: FSDP inside a node x data parallel across
    {"fsdp": 2, "inner": "ddp"},  # a node's ranks replicate (DDP) x data parallel across
    {"pp": 2, "sp": 2, "fsdp": 1, "dp": 1, "ring": 2, "microbatches": 2},  # pipeline x ring attention
]
SCENARIO = "nodes=2,per_node=2,inter=1gbit,intra=50gbit,latency=0us"


def _spec(strategy, workers: int, scenario: str = "local") -> JobSpec:
    return JobSpec(workload=WORKLOAD, strategy=strategy, workers=workers, steps=STEPS, batch_size=BATCH, seed=3,
                   scenario=scenario)


def train(rank: int, world: int, strategy, ckpt: str | None = None, scenario: str = "local") -> dict:
    trainer = RankTrainer(_spec(strategy, world, scenario), rank=rank, world=world, device=torch.device("cpu"))
    rows = [trainer.train_step() for _ in range(STEPS)]
    if ckpt:
        trainer.strategy.save_checkpoint(ckpt)
    return {"state": full_state(trainer.strategy.module), "rows": rows, "eval": trainer.evaluate()}


def load_into(rank: int, world: int, strategy, ckpt: str) -> dict:
    """Another composition restores the checkpoint: its whole model as saved."""
    trainer = RankTrainer(_spec(strategy, world), rank=rank, world=world, device=torch.device("cpu"))
    trainer.strategy.load_checkpoint(ckpt)
    return {"state": full_state(trainer.strategy.module), "rows": []}


def train_all(rank: int, world: int, ckpt: str) -> list[dict]:
    out = [train(rank, world, {"name": "mesh", **o}, ckpt if i == 0 else None) for i, o in enumerate(EXACT)]
    out.append(load_into(rank, world, {"name": "mesh", "sp": 2, "fsdp": 2}, ckpt))  # pp x fsdp -> sp x fsdp
    for outer in ("demo", "powersgd", "gossip", "diloco"):
        o = {"name": "mesh", "fsdp": 2, "outer": outer, "outer_every": 1, "outer_lr": 1.0, "outer_momentum": 0.0,
             "warmup_steps": 1, "rank": 2}
        out.append(train(rank, world, o, scenario=SCENARIO))
    out.append(train(rank, world, {"name": "mesh", "fsdp": 2}, scenario=SCENARIO))  # plain 4-way FSDP
    return out


def held_out(state: dict) -> float:
    """single's held-out loss with ``state`` loaded."""
    trainer = RankTrainer(_spec("single", 1), rank=0, world=1, device=torch.device("cpu"))
    trainer.strategy.module.load_state_dict(state)
    return trainer.evaluate()["val_loss"]


def merged(states: list[dict]) -> dict:
    """The whole model from every rank's part (pipeline stages hold different blocks)."""
    out = {}
    for s in states:
        out.update(s)
    return out


def step_loss(rows: list[dict], step: int) -> float:
    """The samples-weighted loss of one step over the ranks that report it."""
    done = [r[step] for r in rows if r[step]["samples"]]
    return sum(r["loss"] * r["samples"] for r in done) / sum(r["samples"] for r in done)


@pytest.mark.slow  # one 4-process run of 12 short jobs
def test_compositions_match_single(tmp_path):
    ref = train(0, 1, "single")
    out = run_ranks(train_all, 4, tmp_path, str(tmp_path / "ckpt"))
    for i, o in enumerate(EXACT):
        ranks = [r[i] for r in out]
        state = merged([r["state"] for r in ranks])
        assert state.keys() == ref["state"].keys(), o
        for k, v in ref["state"].items():
            torch.testing.assert_close(state[k], v, rtol=RTOL, atol=ATOL, msg=lambda m: f"{o} {k}: {m}")
        rows = [r["rows"] for r in ranks]
        for step in range(STEPS):
            assert step_loss(rows, step) == pytest.approx(ref["rows"][step]["loss"], rel=1e-5), (o, step)
            assert sum(r[step]["samples"] for r in rows) == BATCH, o  # each sample reported once
        for r in rows:  # ranks that compute no loss say so with NaN, never 0
            assert all(x["samples"] or math.isnan(x["loss"]) for x in r), o
        for r in ranks:  # held-out loss: every rank has the whole figure, single's
            assert r["eval"]["val_loss"] == pytest.approx(ref["eval"]["val_loss"], rel=1e-5), o

    # the pipeline x FSDP checkpoint (single-process names) loads into single
    single = RankTrainer(_spec("single", 1), rank=0, world=1, device=torch.device("cpu"))
    single.strategy.load_checkpoint(str(tmp_path / "ckpt"))
    for k, v in full_state(single.strategy.module).items():
        torch.testing.assert_close(v, merged([r[0]["state"] for r in out])[k], rtol=RTOL, atol=ATOL)

    # ... and into another composition on 4 ranks (sequence x FSDP): the same whole model
    n = len(EXACT) + 1
    other = merged([r[n - 1]["state"] for r in out])
    for k, v in merged([r[0]["state"] for r in out]).items():
        torch.testing.assert_close(other[k], v, rtol=0, atol=0, msg=lambda m: f"{k}: {m}")

    # outer methods over FSDP inside each node: every rank trains, inter-node bytes fall
    fsdp4 = out[0][n + 4]["rows"]
    inter_fsdp = sum(x["bytes_inter"] for x in fsdp4[1:])
    for j, outer in enumerate(("demo", "powersgd", "gossip", "diloco")):
        rows = [r[n + j]["rows"] for r in out]
        assert all(math.isfinite(step_loss(rows, s)) for s in range(STEPS)), outer
        inter = sum(x["bytes_inter"] for x in rows[0][1:])  # after powersgd's warm-up step
        # demo and powersgd compress; gossip between 2 nodes sends a whole shard to the one
        # neighbour, and diloco at outer_every=1 averages one every step: no fewer bytes here
        assert 0 < inter < inter_fsdp if outer in ("demo", "powersgd") else 0 < inter <= inter_fsdp, \
            (outer, inter, inter_fsdp)
        assert all(x["bytes_intra"] > 0 for x in rows[0]), outer  # FSDP inside each node
        # the replicas across nodes agree where the method makes them (demo: bit-identical;
        # diloco with outer_every=1, lr 1 and no momentum: averaged every step)
        if outer == "gossip":  # replicas differ: scored on their average, spread = their range
            own = [held_out(out[r][n + j]["state"]) for r in (0, 2)]
            a, b = out[0][n + j]["state"], out[2][n + j]["state"]
            mean = held_out({k: (a[k] + b[k]) / 2 for k in a})
            for r in out:
                assert r[n + j]["eval"]["val_loss"] == pytest.approx(mean, rel=1e-5)
                assert r[n + j]["eval"]["val_spread"] == pytest.approx(abs(own[0] - own[1]), rel=1e-4, abs=1e-6)
        if outer in ("demo", "diloco"):
            a, b = out[0][n + j]["state"], out[2][n + j]["state"]
            for k in a:
                torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6, msg=lambda m: f"{outer} {k}: {m}")
