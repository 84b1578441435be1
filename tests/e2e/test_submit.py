"""polytrain submit/status/logs/stop against a real Ray head started on 127.0.0.1.

The head gets its own temp dir and free ports; it is shut down by ending the
processes that belong to that temp dir (``ray stop`` would also end every other
Ray on this machine, including other test sessions').
"""
import http.server
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pandas as pd
import pytest

from orchestrator.cli import EXIT_INVALID, main

pytest.importorskip("ray")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--workload", "gpt-tiny", "--strategy", "ddp", "--workers", "2", "--set", "workload.d_model=32",
        "--set", "workload.n_layers=1", "--set", "workload.seq_len=32"]


def _free_port(taken: set[int] = set()) -> int:  # noqa: B006 (the ports this session handed out)
    """A free port below the kernel's ephemeral range. A port from ``bind(0)`` is in that
    range, and once released the kernel may give it to any other process's next
    ``bind(0)`` (Ray's own servers in the other test process): a head given such a port
    for its job agent could find it taken, and then never have an agent."""
    import random

    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        port = random.randrange(max(1024, low - 12000), low)
        if port in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        taken.add(port)
        return port
    raise RuntimeError("no free port below the ephemeral range")


TOKEN = secrets.token_hex(32)  # what Ray's own generator makes (256 bits)


def _env(auth: str = "disabled") -> dict:
    """The environment of a head or a client: token auth on (with this session's token) or off."""
    env = {**os.environ, "RAY_AUTH_MODE": auth, "RAY_USAGE_STATS_ENABLED": "0"}
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(key, None)
    if auth == "token":
        env["RAY_AUTH_TOKEN"] = TOKEN
    return env


def polytrain(*args, timeout=480, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=ROOT, env=env or _env(),
                          capture_output=True, text=True, timeout=timeout)


def _stop_head(temp_dir: str) -> None:
    import psutil

    mine = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in (p.info["cmdline"] or [])):
                mine.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    for p in mine:
        p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(mine, timeout=10)
    for p in alive:
        p.kill()  # gcs_server and raylet may ignore SIGTERM while the job manager shuts down
    psutil.wait_procs(alive, timeout=10)


HEAD_LOGS: dict[str, str] = {}  # dashboard URL -> its head's log folder


def _logs(dashboard: str) -> str:
    """The tails of the head's dashboard and agent logs: why a job agent is missing."""
    import glob

    out = []
    for path in sorted(glob.glob(os.path.join(HEAD_LOGS.get(dashboard, "/nonexistent"), "session_latest", "logs",
                                              "dashboard*.*"))):
        with open(path, errors="replace") as f:
            out.append(f"--- {os.path.basename(path)}\n" + "".join(f.readlines()[-15:]))
    return "\n".join(out)


def _head(auth: str):
    """A Ray head with its dashboard (job submission needs it and its agent) on free ports."""
    temp_dir = tempfile.mkdtemp(prefix="pt-ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    port, dash, agent, client = (_free_port() for _ in range(4))
    cmd = ["ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", f"--dashboard-port={dash}",
           "--dashboard-host=127.0.0.1", f"--dashboard-agent-listen-port={agent}",
           f"--ray-client-server-port={client}", f"--temp-dir={temp_dir}", "--num-cpus=2",
           "--include-dashboard=true", "--disable-usage-stats"]
    try:
        started = subprocess.run(cmd, env=_env(auth), capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stderr[-2000:]
        HEAD_LOGS[f"http://127.0.0.1:{dash}"] = temp_dir
        yield f"http://127.0.0.1:{dash}"
    finally:
        _stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def dashboard():
    yield from _head("disabled")


@pytest.fixture(scope="module")
def token_dashboard():
    """A head with token authentication on (``ray start``'s default since Ray 2.60)."""
    yield from _head("token")


def _job_id(out: str) -> str:
    return next(line.split()[1] for line in out.splitlines() if line.startswith("job: "))


@pytest.mark.slow
@pytest.mark.timeout(1500)  # three jobs; each starts fresh worker processes with the uploaded packages
def test_submit_follow_status_logs_stop(dashboard, tmp_path):
    storage = str(tmp_path / "runs")
    ok = polytrain("submit", "--dashboard", dashboard, *TINY, "--steps", "3", "--storage", storage,
                   "--run-id", "cluster-ok", "--wait", "--follow")
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:] + _logs(dashboard)
    job = _job_id(ok.stdout)
    assert f"run folder: {storage}/cluster-ok" in ok.stdout
    assert f"{job}: SUCCEEDED" in ok.stdout
    assert "done: 3 steps" in ok.stdout  # the followed logs: the job's own `polytrain run` output
    df = pd.read_parquet(os.path.join(storage, "cluster-ok", "metrics.parquet"))
    assert sorted(set(zip(df.step, df["rank"]))) == [(s, r) for s in (1, 2, 3) for r in (0, 1)]
    assert (df.strategy == "ddp").all() and df.loss.notna().all() and (df.bytes_sent > 0).all()

    st = polytrain("status", job, "--dashboard", dashboard)
    assert st.returncode == 0 and "SUCCEEDED" in st.stdout and "cluster-ok" in st.stdout
    logs = polytrain("logs", job, "--dashboard", dashboard)
    assert logs.returncode == 0 and "done: 3 steps" in logs.stdout

    # a job that fails on the cluster: submit --wait and status report the worker's error, exit 1
    bad = polytrain("submit", "--dashboard", dashboard, *TINY, "--steps", "3", "--storage", storage,
                    "--inject", "nan:step=2", "--set", "failure.nan=fail", "--wait")
    assert bad.returncode == 1, bad.stdout[-2000:] + bad.stderr[-2000:]
    assert "FAILED" in bad.stdout, bad.stdout
    assert "polytrain: job failed: polytrain: run failed:" in bad.stderr and "non-finite loss at step 2" in bad.stderr
    st = polytrain("status", _job_id(bad.stdout), "--dashboard", dashboard)
    assert st.returncode == 1 and "polytrain: job failed: polytrain: run failed:" in st.stderr, st.stderr

    # a long job, stopped while it runs
    long = polytrain("submit", "--dashboard", dashboard, *TINY, "--steps", "100000", "--storage", storage)
    assert long.returncode == 0, long.stderr
    job = _job_id(long.stdout)
    stopped = polytrain("stop", job, "--dashboard", dashboard)
    assert stopped.returncode == 0 and f"{job}: STOPPED" in stopped.stdout, stopped.stdout + stopped.stderr
    st = polytrain("status", job, "--dashboard", dashboard)
    assert st.returncode == 1 and "STOPPED" in st.stdout


@pytest.mark.timeout(600)  # starts the head when run alone
def test_unknown_job_is_one_line_error(dashboard, capsys):
    assert main(["status", "raysubmit_doesnotexist", "--dashboard", dashboard]) == EXIT_INVALID
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such job" in err


def test_unreachable_address_fails_fast(capsys):
    t0 = time.monotonic()
    rc = main(["submit", "--dashboard", f"http://127.0.0.1:{_free_port()}", *TINY, "--steps", "2",
               "--storage", "/tmp/never"])
    assert time.monotonic() - t0 < 30
    err = capsys.readouterr().err
    assert rc == EXIT_INVALID and err.count("\n") == 1 and "cannot connect" in err


def test_non_ray_address_fails_fast(capsys):
    class Quiet(http.server.SimpleHTTPRequestHandler):  # a web server that is not Ray, without access logs
        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        t0 = time.monotonic()
        rc = main(["status", "raysubmit_x", "--dashboard", f"http://127.0.0.1:{server.server_port}"])
        assert time.monotonic() - t0 < 30
        err = capsys.readouterr().err
        assert rc == EXIT_INVALID and err.count("\n") == 1 and "not a Ray dashboard" in err
    finally:
        server.shutdown()


def test_submit_needs_a_shared_storage(capsys):
    assert main(["submit", "--dashboard", "http://127.0.0.1:1", *TINY, "--steps", "2"]) == EXIT_INVALID
    assert "--storage: required" in capsys.readouterr().err
    assert main(["submit", "--dashboard", "http://127.0.0.1:1", *TINY, "--steps", "2",
                 "--storage", "memory://x"]) == EXIT_INVALID
    assert "cannot see this process's memory" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(900)  # starts its own head, then one job
def test_submit_to_a_head_with_token_auth(token_dashboard, tmp_path):
    storage = str(tmp_path / "runs")
    # without the token: one line, exit 2, nothing submitted
    anon = polytrain("submit", "--dashboard", token_dashboard, *TINY, "--steps", "2", "--storage", storage,
                     "--run-id", "anon", timeout=120, env=_env("disabled"))
    assert anon.returncode == 2 and anon.stderr.count("\n") == 1, anon.stdout[-2000:] + anon.stderr[-2000:]
    assert not os.path.exists(os.path.join(storage, "anon"))
    # with it (RAY_AUTH_MODE=token and RAY_AUTH_TOKEN here, as Ray's client reads them): the job runs;
    # a loopback address gets no plain-http warning
    ok = polytrain("submit", "--dashboard", token_dashboard, *TINY, "--steps", "2", "--storage", storage,
                   "--run-id", "authed", "--wait", env=_env("token"))
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:] + _logs(token_dashboard)
    assert f"{_job_id(ok.stdout)}: SUCCEEDED" in ok.stdout and "warning" not in ok.stderr
    df = pd.read_parquet(os.path.join(storage, "authed", "metrics.parquet"))
    assert sorted(set(df.step)) == [1, 2]
