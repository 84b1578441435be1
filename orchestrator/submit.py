"""Jobs on a real Ray cluster through Ray's job submission API: submit, status, logs, stop.

The job spec is resolved and validated here, before anything is sent; the
cluster runs it with ``python -m orchestrator.submit RUN`` (this module's
``__main__``: ``polytrain run --config`` on the resolved spec), inside a
runtime environment whose ``py_modules`` are an explicit list: polytrain's
packages and the user's workload/strategy sources (never the folder around
them, which may be a checkout with keys and checkpoints, or site-packages),
each uploaded minus ``EXCLUDES`` and the user's ``--exclude`` patterns (Ray
also honours a package's .gitignore and .rayignore). So the cluster needs
nothing installed beyond Ray, torch and our dependencies, and downloads nothing.

Token authentication (``RAY_AUTH_MODE=token``, the default of ``ray start``
since Ray 2.60) is Ray's: its job client sends ``Authorization: Bearer`` with
the token from ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``
when ``RAY_AUTH_MODE=token`` is set here too.
"""
from __future__ import annotations

import base64
import json
import os
import shlex
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from cluster.runtime import ClusterError, check_reachable
from orchestrator.config import ConfigError, JobSpec

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("orchestrator", "strategies", "workloads", "cluster")  # what the cluster imports of ours
# never uploaded (gitignore patterns, matched inside every uploaded package): secrets, environments,
# checkpoints and run output, caches, VCS and build folders
EXCLUDES = [
    ".env", ".env.*", "*.pem", "*.key", "*.p12", "*.pfx", "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*",
    ".netrc", ".aws", ".ssh", "credentials*",
    ".venv", "venv", "virtualenv", "site-packages",
    "*.pt", "*.pth", "*.ckpt", "*.safetensors", "*.bin", "checkpoints", "runs", "*.parquet",
    ".git", "**/__pycache__", ".pytest_cache", "*.egg-info", "build",
]
CONNECT_TIMEOUT_S = 10.0
AGENT_WAIT_S = 90.0  # a head just started: its job agent registers with the dashboard some seconds later
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def dashboard_url(address: str | None) -> str:
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigError("--dashboard: required (the Ray dashboard, e.g. http://HEAD:8265), or set RAY_ADDRESS")
    return address if "://" in address else f"http://{address}"


def client(address: str | None):
    """A JobSubmissionClient for a reachable Ray dashboard; a one-line ClusterError
    within ~2 x CONNECT_TIMEOUT_S otherwise (Ray's client alone may hang on a
    port that accepts and never answers)."""
    url = dashboard_url(address)
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"--dashboard {url!r}: expected the dashboard's http://HOST:PORT (default port 8265)")
    check_reachable(url, timeout_s=CONNECT_TIMEOUT_S)
    warning = token_warning(url, sends_token=_sends_token())
    if warning:
        print(warning, file=sys.stderr, flush=True)
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/api/version", timeout=CONNECT_TIMEOUT_S) as r:
            body = json.loads(r.read().decode() or "{}")
        if "ray_version" not in body:
            raise ValueError("no ray_version")
    except urllib.error.HTTPError as e:
        if e.code not in (401, 403):  # token auth: a Ray dashboard; Ray's client sends the token
            raise ClusterError(f"--dashboard {url!r}: not a Ray dashboard (HTTP {e.code} on /api/version)") from None
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise ClusterError(f"--dashboard {url!r}: not a Ray dashboard ({type(e).__name__}: {reason})") from None
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(url)
    except Exception as e:  # ConnectionError, AuthenticationError, ...
        raise ClusterError(f"--dashboard {url!r}: {type(e).__name__}: {str(e).splitlines()[0]}") from None


def check_storage(spec: JobSpec) -> None:
    if spec.storage.startswith("memory://"):
        raise ConfigError(f"storage={spec.storage!r}: the job runs on the cluster, which cannot see this "
                          f"process's memory; use a shared path or an object store URL (s3://, gs://, ...)")


def entrypoint(spec: JobSpec) -> str:
    blob = base64.b64encode(spec.to_yaml().encode()).decode()
    return f"python -m orchestrator.submit {shlex.quote(blob)}"


def upload_list(spec: JobSpec) -> list[str]:
    """What travels to the cluster: polytrain's packages, then the job's own
    sources (a workload/strategy from a local file or package)."""
    return [os.path.join(PROJECT_ROOT, p) for p in PACKAGES] + spec.worker_sources()


def runtime_env(spec: JobSpec, excludes: list[str] = ()) -> dict:
    return {"py_modules": upload_list(spec), "excludes": EXCLUDES + list(excludes)}


def _is_loopback(host: str | None) -> bool:
    import ipaddress
    import socket

    try:
        return ipaddress.ip_address(socket.gethostbyname(host or "")).is_loopback
    except (OSError, ValueError):
        return False


def token_warning(url: str, *, sends_token: bool) -> str | None:
    """The warning for a token that would cross the network unencrypted."""
    parsed = urllib.parse.urlparse(url)
    if sends_token and parsed.scheme == "http" and not _is_loopback(parsed.hostname):
        return (f"polytrain: warning: the Ray auth token goes to {parsed.hostname} over plain http; "
                f"use https or an SSH tunnel to a loopback address")
    return None


def _sends_token() -> bool:
    """Whether Ray's job client will send an auth token (its own rule: RAY_AUTH_MODE=token and a token found)."""
    try:
        from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled

        return bool(get_auth_headers_if_auth_enabled({}))
    except Exception:  # another Ray version: no token support to warn about
        return False


@dataclass
class Submitted:
    job_id: str
    run_url: str
    dashboard: str


def submit(spec: JobSpec, *, address: str | None, excludes: list[str] = ()) -> Submitted:
    check_storage(spec)
    c = client(address)
    run_url = f"{spec.storage.rstrip('/')}/{spec.run_id}"
    job_id = submit_when_ready(lambda: c.submit_job(
        entrypoint=entrypoint(spec), runtime_env=runtime_env(spec, excludes),
        metadata={"polytrain_run": run_url, "polytrain_run_id": spec.run_id}))
    return Submitted(job_id=job_id, run_url=run_url, dashboard=dashboard_url(address))


def _agent_not_ready(e: Exception) -> bool:
    """Ray's answer while the head's job agent has not registered yet (HTTP 500/503 "No available agent")."""
    return "no available agent" in str(e).lower()


def submit_when_ready(submit_job, *, wait_s: float = AGENT_WAIT_S, sleep=time.sleep, clock=time.monotonic) -> str:
    """``submit_job()``, retried while the head's job agent is still starting
    (``ray start`` returns before it registers), up to ``wait_s``; any other
    error, or the agent still missing after that, is one ClusterError line."""
    deadline, told = clock() + wait_s, False
    while True:
        try:
            return submit_job()
        except Exception as e:
            if _agent_not_ready(e) and clock() < deadline:
                if not told:
                    print(f"polytrain: the cluster's job agent is not ready yet; retrying for up to {wait_s:.0f} s",
                          file=sys.stderr, flush=True)
                    told = True
                sleep(2.0)
                continue
            waited = f" (after waiting {wait_s:.0f} s for the job agent)" if _agent_not_ready(e) else ""
            raise ClusterError(f"submit: {type(e).__name__}: {str(e).splitlines()[0]}{waited}") from None


def _call(fn, job_id: str, address: str | None):
    try:
        return fn(job_id)
    except RuntimeError as e:  # Ray: "Request failed with status code 404: Job ... does not exist."
        if "404" in str(e) or "does not exist" in str(e):
            raise ConfigError(f"job {job_id!r}: no such job on {dashboard_url(address)}") from None
        raise ClusterError(f"job {job_id!r}: {str(e).splitlines()[0]}") from None


@dataclass
class JobState:
    job_id: str
    status: str  # PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED
    run_url: str | None
    error: str  # the worker's error line when it failed ('' otherwise)


def error_text(logs: str, message: str) -> str:
    """The one line polytrain printed for the failure (``polytrain: run failed: ...``),
    else the last non-empty line of the logs, else Ray's message."""
    lines = [ln.strip() for ln in logs.splitlines() if ln.strip()]
    ours = [ln for ln in lines if ln.startswith("polytrain: ")]
    if ours:
        return ours[-1]
    return lines[-1] if lines else (message or "").strip().splitlines()[0] if message else ""


def status(job_id: str, *, address: str | None, c=None) -> JobState:
    c = c or client(address)
    info = _call(c.get_job_info, job_id, address)
    st = str(getattr(info.status, "value", info.status))
    err = ""
    if st == "FAILED":
        err = error_text(_call(c.get_job_logs, job_id, address), info.message or "")
    return JobState(job_id=job_id, status=st, run_url=(info.metadata or {}).get("polytrain_run"), error=err)


def wait(job_id: str, *, address: str | None, follow_logs: bool = False, stream=None, poll_s: float = 1.0) -> JobState:
    c = client(address)
    if follow_logs:
        follow(job_id, address=address, stream=stream, c=c)
    while True:
        st = status(job_id, address=address, c=c)
        if st.status in TERMINAL:
            return st
        time.sleep(poll_s)


def logs(job_id: str, *, address: str | None) -> str:
    c = client(address)
    return _call(c.get_job_logs, job_id, address)


def follow(job_id: str, *, address: str | None, stream=None, c=None) -> None:
    """Print the job's logs as they come, until it ends."""
    import asyncio

    stream = stream or sys.stdout
    c = c or client(address)
    _call(c.get_job_info, job_id, address)  # a missing job is a one-line error, not a websocket trace

    async def tail():
        async for chunk in c.tail_job_logs(job_id):
            stream.write(chunk)
            stream.flush()

    asyncio.run(tail())


def stop(job_id: str, *, address: str | None, timeout_s: float = 30.0) -> JobState:
    c = client(address)
    _call(c.stop_job, job_id, address)
    deadline = time.monotonic() + timeout_s
    while True:
        st = status(job_id, address=address, c=c)
        if st.status in TERMINAL or time.monotonic() > deadline:
            return st
        time.sleep(0.5)


def _main(argv: list[str]) -> int:
    """On the cluster: run the resolved spec (base64 YAML) with ``polytrain run``."""
    import tempfile

    from orchestrator.cli import main

    with tempfile.NamedTemporaryFile("wb", suffix=".yaml", delete=False) as f:
        f.write(base64.b64decode(argv[0]))
    try:
        return main(["run", "--config", f.name, "--quiet"])
    finally:
        os.unlink(f.name)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
