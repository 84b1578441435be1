"""What `polytrain submit` uploads: an explicit list of packages, each zipped by
Ray's own packaging with our excludes, so secrets, environments, checkpoints
and run output never leave the machine."""
import os
import zipfile

import pytest

from orchestrator import submit as sub
from orchestrator.config import JobSpec

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "docs", "examples", "custom_workload.py")


def _zipped(folder: str, excludes: list[str], tmp_path) -> set[str]:
    """The files Ray would upload for ``folder`` as a py_module (its own packaging code)."""
    from pathlib import Path

    from ray._private.runtime_env.packaging import create_package

    target = tmp_path / f"{os.path.basename(folder)}.zip"
    create_package(folder, Path(target), include_gitignore=True, include_parent_dir=True, excludes=excludes)
    with zipfile.ZipFile(target) as z:
        return {n for n in z.namelist() if not n.endswith("/")}


def test_the_upload_is_our_packages_and_the_jobs_sources(tmp_path):
    spec = JobSpec(workload=f"{EXAMPLE}:SineMLP", strategy="ddp", storage=str(tmp_path), run_id="r")
    env = sub.runtime_env(spec, excludes=["*.csv"])
    assert "working_dir" not in env  # never the folder around the packages (a checkout, or site-packages)
    assert env["py_modules"] == [os.path.join(ROOT, p) for p in ("orchestrator", "strategies", "workloads",
                                                                   "cluster")] + [EXAMPLE]
    assert all(os.path.isfile(os.path.join(p, "__init__.py")) for p in env["py_modules"][:4])
    assert env["excludes"][-1] == "*.csv" and set(sub.EXCLUDES) <= set(env["excludes"])
    plain = JobSpec(workload="gpt-tiny", strategy="ddp", storage=str(tmp_path), run_id="r")
    assert sub.runtime_env(plain)["py_modules"] == env["py_modules"][:4]


def test_secrets_environments_checkpoints_and_runs_stay_behind(tmp_path):
    pkg = tmp_path / "src" / "mypkg"
    keep = ["__init__.py", "model.py", "sub/__init__.py", "configs/base.yaml", "README.md"]
    drop = [".env", ".env.local", "server.pem", "tls.key", "id_rsa", "id_ed25519.pub", "store.p12",
            ".ssh/config", ".aws/credentials", "credentials.json", ".netrc",
            "venv/lib/python3.11/site.py", ".venv/bin/python", "model.pt", "weights.safetensors", "last.ckpt",
            "checkpoints/step_10/__0_0.distcp", "sub/runs/r1/metrics.parquet", "runs/r2/spec.yaml",
            ".git/HEAD", "sub/__pycache__/x.cpython-311.pyc", "mine.csv"]
    for name in keep + drop:
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text("x")
    got = _zipped(str(pkg), sub.runtime_env(JobSpec(workload="gpt-tiny", strategy="ddp", run_id="r",
                                                      storage=str(tmp_path)), excludes=["*.csv"])["excludes"],
                  tmp_path)
    assert got == {f"mypkg/{n}" for n in keep}, sorted(got)


def test_our_own_packages_upload_only_source(tmp_path):
    for folder in sub.upload_list(JobSpec(workload="gpt-tiny", strategy="ddp", run_id="r", storage=str(tmp_path))):
        names = _zipped(folder, sub.EXCLUDES, tmp_path)
        # source, and the package data pyproject.toml declares (workloads/corpora's shipped text)
        assert names and all(n.endswith((".py", ".md", ".yaml", ".json", ".txt", ".typed", ".xz")) for n in names), \
            sorted(n for n in names if not n.endswith(".py"))


@pytest.mark.parametrize("url, sends, warned", [
    ("http://10.1.2.3:8265", True, True),
    ("http://127.0.0.1:8265", True, False),
    ("http://localhost:8265", True, False),
    ("https://10.1.2.3:8265", True, False),
    ("http://10.1.2.3:8265", False, False),
])
def test_a_token_over_plain_http_to_another_host_is_warned_about(url, sends, warned):
    w = sub.token_warning(url, sends_token=sends)
    assert (w is not None) == warned
    if warned:
        assert "10.1.2.3" in w and "plain http" in w and "\n" not in w


@pytest.mark.parametrize("flag, note", [("--dashboard", False), ("--address", True)])
@pytest.mark.parametrize("command", ["status", "logs", "stop", "submit"])
def test_the_dashboard_flag_and_its_deprecated_name(monkeypatch, capsys, tmp_path, command, flag, note):
    """submit, status, logs and stop name the dashboard --dashboard (run's --address is the Ray
    cluster); --address still works there, with one note on stderr."""
    from orchestrator.cli import main

    seen = []
    state = sub.JobState(job_id="j", status="SUCCEEDED", run_url=None, error="")
    monkeypatch.setattr(sub, "status", lambda job, *, address: seen.append(address) or state)
    monkeypatch.setattr(sub, "stop", lambda job, *, address: seen.append(address) or state)
    monkeypatch.setattr(sub, "logs", lambda job, *, address: seen.append(address) or "")
    monkeypatch.setattr(sub, "submit", lambda spec, *, address, excludes: seen.append(address) or sub.Submitted(
        job_id="j", run_url="u", dashboard=address))
    argv = ["submit", "--workload", "gpt-tiny", "--strategy", "single", "--storage", str(tmp_path)] \
        if command == "submit" else [command, "j"]
    assert main([*argv, flag, "http://head:8265"]) == 0
    err = capsys.readouterr().err
    assert seen == ["http://head:8265"]
    notes = [line for line in err.splitlines() if "deprecated" in line]
    assert notes == ([f"polytrain: note: `polytrain {command} --address` is deprecated, use --dashboard "
                      "(--address names the Ray cluster in `polytrain run`)"] if note else [])


def test_the_dashboard_given_twice_is_one_line(capsys):
    from orchestrator.cli import main

    assert main(["status", "j", "--dashboard", "http://a:8265", "--address", "http://b:8265"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--address 'http://b:8265': give the dashboard once, as --dashboard" in err


def test_submit_waits_for_a_starting_job_agent_and_no_longer(capsys):
    """`ray start` returns before the head's job agent registers: submit retries
    Ray's "No available agent" for a bounded time; other errors fail at once."""
    now = [0.0]
    calls = []

    def flaky():
        calls.append(now[0])
        if len(calls) < 3:
            raise RuntimeError("Request failed with status code 500: No available agent to submit job, "
                               "please try again later..")
        return "raysubmit_1"

    def sleep(s):
        now[0] += s

    assert sub.submit_when_ready(flaky, wait_s=30, sleep=sleep, clock=lambda: now[0]) == "raysubmit_1"
    assert len(calls) == 3 and "not ready yet" in capsys.readouterr().err

    def never():
        raise RuntimeError("Request failed with status code 500: No available agent to submit job")

    now[0] = 0.0
    with pytest.raises(sub.ClusterError, match=r"No available agent.*after waiting 10 s"):
        sub.submit_when_ready(never, wait_s=10, sleep=sleep, clock=lambda: now[0])
    assert now[0] >= 10

    def refused():
        calls.append("x")
        raise RuntimeError("Request failed with status code 400: bad runtime_env")

    calls.clear()
    with pytest.raises(sub.ClusterError, match="bad runtime_env"):
        sub.submit_when_ready(refused, wait_s=10, sleep=sleep, clock=lambda: now[0])
    assert calls == ["x"]
