"""Batch shares are split over data-parallel replicas, not ranks: the README
tour's sequence command (ulysses=2 x ring=2 on 4 ranks is one replica, of a
global batch of 1) runs end to end on Ray, smaller."""
import pytest

from orchestrator import JobSpec, run


@pytest.mark.slow
def test_sequence_with_one_replica_over_four_ranks_runs(ray_address, tmp_path):
    spec = JobSpec(workload={"name": "gpt-tiny", "n_layers": 1, "d_model": 32, "seq_len": 64, "micro_batch": 1},
                   strategy={"name": "sequence", "ulysses": 2}, workers=4, steps=2, storage=str(tmp_path))
    assert spec.global_batch == 1
    df = run(spec, progress=False).metrics
    assert sorted(set(zip(df.step, df["rank"]))) == [(s, r) for s in (1, 2) for r in range(4)]
    assert df.loss.notna().any()
