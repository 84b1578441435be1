"""Straggler mitigations keep the update exact: rebalanced shares give the
full-batch update; backup workers give the update of the gradients kept."""
import torch

from orchestrator.config import JobSpec
from orchestrator.messages import Control, Drop, Shares
from orchestrator.trainer import RankTrainer
from tests.distributed.test_ddp import _assert_same, full_state
from tests.ranks import run_ranks

W = {"name": "gpt-tiny", "n_layers": 2, "d_model": 64, "seq_len": 32}


def _spec(strategy: str, workers: int) -> JobSpec:
    return JobSpec(workload=W, strategy=strategy, workers=workers, steps=4, batch_size=8, seed=5)


def train(rank: int, world: int, control: Control) -> dict:
    trainer = RankTrainer(_spec("ddp", world), rank=rank, world=world, device=torch.device("cpu"))
    trainer.control(control)
    rows = [trainer.train_step() for _ in range(4)]
    return {"state": full_state(trainer.strategy.module), "samples": [r["samples"] for r in rows],
            "losses": [r["loss"] for r in rows]}


def reference(take=None) -> dict:
    """single on the whole global batch, or on ``take`` (a slice) of each one."""
    trainer = RankTrainer(_spec("single", 1), rank=0, world=1, device=torch.device("cpu"))
    if take is not None:
        loader = trainer.loader
        loader.next_batch = lambda: loader.source.gather(loader.next_global_indices()[take])
    for _ in range(4):
        trainer.train_step()
    return full_state(trainer.strategy.module)


def test_rebalanced_shares_give_the_full_batch_update(tmp_path):
    """From step 2, rank 1 (the slow one) takes 2 samples of 8 and rank 0 takes 6;
    gradients weighted by share: the update is single's on all 8 (fp32 sums in
    another order: 1e-5)."""
    out = run_ranks(train, 2, tmp_path, Shares(step=2, shares=(6, 2)))
    assert [o["samples"] for o in out] == [[4, 6, 6, 6], [4, 2, 2, 2]]
    ref = reference()
    for o in out:
        _assert_same(o["state"], ref)


def test_backup_workers_apply_the_kept_gradients(tmp_path):
    """Rank 1's gradient left out from step 1: the update is single's on rank 0's
    half of each global batch."""
    out = run_ranks(train, 2, tmp_path, Drop(step=1, ranks=(1,)))
    assert out[1]["samples"] == [0, 0, 0, 0]
    ref = reference(take=slice(0, 4))
    for o in out:
        _assert_same(o["state"], ref)
