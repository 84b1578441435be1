"""A workload from a user's file and one from an entry point train under ddp and
fsdp on 2 ranks and match `single` (same tolerance as the built-ins: 1e-5)."""
import pytest

from tests import plugin_sources as src
from tests.distributed.test_ddp import _assert_same, train_state
from tests.ranks import run_ranks


def _entry_point_package(tmp_path) -> None:
    (tmp_path / "ep_dist_plugin.py").write_text(src.GOOD.format(name="ep-dist-internal"))
    dist = tmp_path / "ep_dist_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-dist-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[polytrain.workloads]\nep-dist = ep_dist_plugin:TinyReg\n")


@pytest.mark.parametrize("how, strategy", [("file", "ddp"), ("file", "fsdp"), ("entry-point", "ddp"),
                                           ("entry-point", "fsdp")])
def test_user_workload_matches_single(tmp_path, monkeypatch, how, strategy):
    if how == "file":
        path = tmp_path / "user_model.py"
        path.write_text(src.GOOD.format(name="user-file-reg"))
        workload = {"name": f"{path}:TinyReg"}
    else:
        _entry_point_package(tmp_path)
        monkeypatch.syspath_prepend(str(tmp_path))  # spawned ranks inherit sys.path
        workload = {"name": "ep-dist"}
    ref = train_state(0, 1, workload, "single")
    for r in run_ranks(train_state, 2, tmp_path, workload, strategy):
        _assert_same(r["state"], ref["state"])
