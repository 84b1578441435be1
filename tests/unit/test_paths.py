"""Run ids are one folder name under storage, never a path; a generated one
uses the workload's short name, and the spec written for it reads back."""
import os

import pytest

from orchestrator.config import ConfigError, JobSpec, short_name

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "docs", "examples", "custom_workload.py")


@pytest.mark.parametrize("run_id", [".", "..", "...", "a/b", "../up", "/abs", "a\\b", "x:y", "", " r", "-r", ".hidden",
                                    "a" * 129, "r\n"])
def test_unsafe_run_ids_are_refused(tmp_path, run_id):
    with pytest.raises(ConfigError) as e:
        JobSpec(workload="gpt-tiny", strategy="ddp", storage=str(tmp_path), run_id=run_id)
    msg = str(e.value)
    assert "\n" not in msg and f"run_id={run_id!r}" in msg and "allowed: 1-128 of A-Z a-z 0-9 . _ -" in msg


@pytest.mark.parametrize("run_id", ["r1", "00-ddp-local", "cluster.ok_2", "a" * 128])
def test_plain_run_ids_are_kept(tmp_path, run_id):
    assert JobSpec(workload="gpt-tiny", strategy="ddp", storage=str(tmp_path), run_id=run_id).run_id == run_id


@pytest.mark.parametrize("ref, name", [
    ("gpt-tiny", "gpt-tiny"), ("/abs/path/custom_workload.py:SineMLP", "SineMLP"),
    ("pkg.module:My_Workload", "My_Workload"), ("dir/file.py:", "file"),
])
def test_short_name(ref, name):
    assert short_name(ref) == name


def test_generated_run_id_of_a_file_plugin_is_short_and_reads_back(tmp_path):
    spec = JobSpec(workload=f"{EXAMPLE}:SineMLP", strategy="ddp", storage=str(tmp_path))
    assert spec.run_id.startswith("SineMLP-ddp-")
    assert "/" not in spec.run_id and ":" not in spec.run_id
    again = JobSpec(**__import__("yaml").safe_load(spec.to_yaml()))  # what submit ships and the cluster reads
    assert again.run_id == spec.run_id and again.workload.name == spec.workload.name


def test_the_default_storage_is_in_the_home_folder_never_the_current_one(tmp_path, monkeypatch):
    """Commands write only where the user said; unsaid, run folders go to one fixed place
    (as Ray Train's ~/ray_results), resolved on the driver."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    storage = JobSpec(workload="gpt-tiny", strategy="ddp").storage
    assert storage == str(tmp_path / "home" / "polytrain_results")
    assert os.listdir(tmp_path) == []
