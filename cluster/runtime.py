"""Where Ray comes from: an embedded local instance, or an existing cluster."""
from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlparse

import ray


class ClusterError(RuntimeError):
    """The cluster cannot run this job (unreachable, too small)."""


_embedded_here = False  # this process started the local Ray it is connected to


@dataclass(kw_only=True)
class Runtime:
    embedded: bool  # a local Ray started by polytrain: more workers than CPUs is allowed
    owned: bool  # this Runtime started or joined Ray, so it lets go of it
    address: str
    total_cpus: float
    start_s: float  # seconds spent starting or joining Ray

    def shutdown(self) -> None:
        """Stop an embedded Ray, or disconnect from a cluster; a Ray someone else
        initialised in this process is left alone."""
        global _embedded_here
        if self.owned and ray.is_initialized():
            ray.shutdown()
            _embedded_here = False


# Embedded Ray simulates a cluster: more workers than cores is normal (each gets
# a CPU fraction and one thread), but every worker is a process holding torch
# (~0.3-0.5 GiB resident) and a time slice; past these bounds a run only thrashes.
MAX_WORKERS_PER_CPU = 8
WORKER_MEMORY_BYTES = 512 * 2**20


def embedded_worker_limit(cpus: float, memory_bytes: int) -> int:
    """The most workers an embedded Ray on ``cpus`` cores and ``memory_bytes`` of RAM runs."""
    return max(1, min(int(MAX_WORKERS_PER_CPU * cpus), memory_bytes // WORKER_MEMORY_BYTES))


def _machine() -> tuple[float, int]:
    """(CPUs, physical memory bytes) of this machine."""
    try:
        mem = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not POSIX: the CPU bound alone
        mem = 2**62
    return float(os.cpu_count() or 1), mem


def will_embed(address: str | None) -> bool:
    """Whether ``start(address=address)`` runs (or reuses) an embedded Ray on this machine."""
    if ray.is_initialized():
        return _embedded_here
    return not (address or os.environ.get("RAY_ADDRESS"))


def check_embedded(*, workers: int, gpus_per_worker: float, gpus_here: int) -> None:
    """Bad input for an embedded Ray, found before Ray starts: more workers than
    this machine can simulate, or GPUs it does not have."""
    cpus, mem = _machine()
    limit = embedded_worker_limit(cpus, mem)
    if workers > limit:
        raise ClusterError(
            f"workers={workers}: embedded Ray on this machine runs at most {limit} (the smaller of "
            f"{MAX_WORKERS_PER_CPU} per CPU x {cpus:g} CPUs and one per {WORKER_MEMORY_BYTES >> 20} MiB of "
            f"{mem / 2**30:.1f} GiB memory); join a cluster with --address for more")
    if gpus_per_worker and workers * gpus_per_worker > gpus_here:
        raise ClusterError(f"cluster.gpus_per_worker={gpus_per_worker:g}: workers={workers} need "
                           f"{workers * gpus_per_worker:g} GPUs, this machine has {gpus_here}")


def check_placeable(*, workers: int, cpus_per_worker: float, gpus_per_worker: float, nodes: list[dict]) -> None:
    """On a joined cluster, workers that can never be placed are an error, found
    from the alive nodes' resources before a placement group waits for them."""
    total_cpus = sum(n.get("CPU", 0) for n in nodes)
    total_gpus = sum(n.get("GPU", 0) for n in nodes)
    if workers * cpus_per_worker > total_cpus:
        raise ClusterError(f"workers={workers}: needs {workers * cpus_per_worker:g} CPUs at cluster.cpus_per_worker="
                           f"{cpus_per_worker:g}, the cluster has {total_cpus:g}")
    if gpus_per_worker and workers * gpus_per_worker > total_gpus:
        raise ClusterError(f"cluster.gpus_per_worker={gpus_per_worker:g}: workers={workers} need "
                           f"{workers * gpus_per_worker:g} GPUs, the cluster has {total_gpus:g}")
    fits = [n for n in nodes if n.get("CPU", 0) >= cpus_per_worker and n.get("GPU", 0) >= gpus_per_worker]
    if not fits:  # one worker is one bundle, which must fit on one node
        raise ClusterError(f"cluster.cpus_per_worker={cpus_per_worker:g}, cluster.gpus_per_worker="
                           f"{gpus_per_worker:g}: no node of the cluster has that much for one worker")


def node_resources() -> list[dict]:
    """Total resources of each alive node of the connected Ray cluster."""
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]

# Ray's raylet tells the driver of every worker process that dies, with advice
# about the OOM killer and `ray stop --force`, in the middle of the progress; the
# controller prints its own line for its workers (which rank, and why).
_WORKER_DIED = "A worker died or was killed while executing a task"


def quiet_worker_deaths() -> None:
    """Drop the raylet's worker-death advice from this driver's terminal; every
    other raylet message still prints. Ray has no option for it: its driver
    prints errors pushed by the raylet through ``print_to_stdstream``, looked up
    at each call, which this wraps (once; a no-op if Ray renames it)."""
    from ray._private import worker

    original = getattr(worker, "print_to_stdstream", None)
    if original is None or getattr(original, "polytrain_quiet", False):
        return

    def print_to_stdstream(data, *args, **kwargs):
        if data.get("pid") == "raylet":
            data = {**data, "lines": [ln for ln in data.get("lines", []) if _WORKER_DIED not in ln]}
            if not data["lines"]:
                return None
        return original(data, *args, **kwargs)

    print_to_stdstream.polytrain_quiet = True
    worker.print_to_stdstream = print_to_stdstream


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast on an address nothing listens on; Ray itself retries for minutes."""
    if address in ("auto", "local"):
        return
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    host, port = parsed.hostname, parsed.port
    if not host or not port:
        raise ClusterError(f"address={address!r}: expected HOST:PORT, ray://HOST:PORT or 'auto'")
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as e:
        raise ClusterError(f"address={address!r}: cannot connect within {timeout_s:.0f} s ({e.strerror or e})") from None


def start(*, address: str | None, num_cpus: float | None = None, dashboard: bool = False,
          py_modules: list[str] = ()) -> Runtime:
    """Join ``address``, reuse a Ray already initialised in this process, or
    start an embedded instance with this machine's CPUs. ``py_modules`` (local
    files or package folders) are uploaded for every worker of this job; Ray
    takes local ones only here, at the job level."""
    global _embedded_here
    t0 = time.perf_counter()
    address = address or os.environ.get("RAY_ADDRESS") or None  # Ray's own way to name a cluster
    quiet = dict(logging_level=logging.ERROR, log_to_driver=False, configure_logging=True)
    if py_modules:
        quiet["runtime_env"] = {"py_modules": list(py_modules)}
    # Ray would otherwise warn on every start about things users cannot act on.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    quiet_worker_deaths()
    owned = not ray.is_initialized()
    if not owned:
        embedded = _embedded_here
    elif address:
        check_reachable(address)
        try:
            ray.init(address=address, **quiet)
        except Exception as e:  # ConnectionError, TimeoutError, RuntimeError, ...
            raise ClusterError(f"address={address!r}: cannot join the Ray cluster ({type(e).__name__}: {e})") from None
        embedded = False
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=dashboard, **quiet)
        embedded = _embedded_here = True
    return Runtime(
        embedded=embedded,
        owned=owned,
        address=ray.get_runtime_context().gcs_address,
        total_cpus=float(ray.cluster_resources().get("CPU", 0)),
        start_s=time.perf_counter() - t0,
    )
