"""A hung rank is named, not the lowest of its waiting peers: the hang deadline
fires before the backend's collective timeout (which would turn every peer's
wait into an error that only echoes the hang)."""
import pytest

from orchestrator import JobSpec, run
from orchestrator.controller import RunFailed


@pytest.mark.slow
def test_the_hung_rank_is_named_before_the_collectives_time_out(ray_address, tmp_path):
    spec = JobSpec(workload={"name": "gpt-tiny", "n_layers": 1, "d_model": 32, "seq_len": 32}, strategy="ddp",
                   workers=2, steps=6, batch_size=4, storage=str(tmp_path), run_id="hung",
                   inject=["hang:rank=1,step=3"], cluster={"address": ray_address, "collective_timeout_s": 15},
                   failure={"hang_floor_s": 60})  # the floor alone would wait past the 15 s timeout
    with pytest.raises(RunFailed, match=r"hang: no step completed for 12\.0 s \(rank 1 never started step 3\)"):
        run(spec, progress=False)
