"""One Ray actor per rank, in a placement group, running a function we ship.

The group knows nothing of training: it starts actors, gives each its rank,
a rendezvous address and a way to report, runs a function on all of them and
hands the reports back when polled. The driver's loop is in orchestrator/.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.dist import free_port, node_ip
from cluster.runtime import ClusterError


@dataclass(kw_only=True)
class WorkerContext:
    """What a rank's function gets: who it is, where to meet, how to report."""

    rank: int
    world: int
    local_rank: int
    node_ip: str
    master_addr: str
    master_port: int
    threads: int
    report: Callable[[dict], None] = field(default=lambda row: None, repr=False)  # set on the worker

    @property
    def init_method(self) -> str:
        return f"tcp://{self.master_addr}:{self.master_port}"


@ray.remote(max_concurrency=2)  # one thread runs the job, one answers poll()
class RankWorker:
    def __init__(self, threads: int, env: dict[str, str]):
        os.environ.update(env)
        import torch

        torch.set_num_threads(threads)
        self.threads = threads
        self._lock = threading.Lock()
        self._reports: list[dict] = []

    def where(self) -> tuple[str, str, int]:
        """(node id, node ip, pid) for placement and diagnostics."""
        return ray.get_runtime_context().get_node_id(), node_ip(), os.getpid()

    def rendezvous_port(self) -> int:
        return free_port()

    def _report(self, row: dict) -> None:
        with self._lock:
            self._reports.append(row)

    def run(self, ctx: WorkerContext, fn: Callable[..., Any], *args: Any) -> Any:
        ctx.report = self._report
        return fn(ctx, *args)

    def poll(self) -> list[dict]:
        with self._lock:
            rows, self._reports = self._reports, []
        return rows


class WorkerGroup:
    def __init__(
        self,
        workers: int,
        *,
        cpus_per_worker: float,
        gpus_per_worker: float = 0,
        placement: str = "PACK",
        env: dict[str, str] | None = None,
        placement_timeout_s: float = 60,
    ):
        self.n = workers
        self.cpus, self.gpus = cpus_per_worker, gpus_per_worker
        self.placement, self.env = placement, env or {}
        self.placement_timeout_s = placement_timeout_s
        self.actors: list = []
        self.contexts: list[WorkerContext] = []
        self.pids: list[int] = []
        self._pg = None
        self.phases: dict[str, float] = {}

    def start(self) -> None:
        t0 = time.perf_counter()
        bundle = {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {})}
        self._pg = placement_group([bundle] * self.n, strategy=self.placement)
        ready, _ = ray.wait([self._pg.ready()], timeout=self.placement_timeout_s)
        if not ready:
            have = ray.cluster_resources()
            raise ClusterError(
                f"workers={self.n} x {bundle} could not be placed within {self.placement_timeout_s:.0f} s "
                f"(cluster has CPU={have.get('CPU', 0):g}, GPU={have.get('GPU', 0):g}; placement={self.placement})"
            )
        t1 = time.perf_counter()
        threads = max(1, int(self.cpus))
        self.actors = [
            RankWorker.options(
                num_cpus=self.cpus,
                num_gpus=self.gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=i),
            ).remote(threads, self.env)
            for i in range(self.n)
        ]
        where = ray.get([a.where.remote() for a in self.actors])
        t2 = time.perf_counter()
        # Ranks are bundle order (PACK keeps a node's bundles together); local rank
        # counts within a node.
        seen: dict[str, int] = {}
        local_ranks = []
        for node_id, _, _ in where:
            local_ranks.append(seen.get(node_id, 0))
            seen[node_id] = local_ranks[-1] + 1
        master_addr = where[0][1]
        master_port = ray.get(self.actors[0].rendezvous_port.remote())
        self.pids = [pid for _, _, pid in where]
        self.contexts = [
            WorkerContext(
                rank=r, world=self.n, local_rank=local_ranks[r], node_ip=where[r][1],
                master_addr=master_addr, master_port=master_port, threads=threads,
            )
            for r in range(self.n)
        ]
        self.phases = {"placement_s": t1 - t0, "actors_s": t2 - t1}

    def run_async(self, fn: Callable[..., Any], *args: Any) -> list[ray.ObjectRef]:
        fn_ref = ray.put(fn)
        return [a.run.remote(ctx, fn_ref, *args) for a, ctx in zip(self.actors, self.contexts)]

    def poll(self, timeout_s: float = 10) -> list[dict]:
        """Every report the ranks made since the last poll (ranks that do not
        answer in time are skipped this round)."""
        refs = [a.poll.remote() for a in self.actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        rows = []
        for ref in ready:
            try:
                rows += ray.get(ref)
            except ray.exceptions.RayActorError:
                pass  # a dead worker shows up in its run() result
        return rows

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None
