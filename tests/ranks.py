"""Run a function on N gloo ranks in fresh processes (no Ray), collect results.

Each call gets its own FileStore rendezvous under the test's tmp_path, so tests
never share or hard-code a port.
"""
from __future__ import annotations

import io
import os
import traceback
import uuid
from typing import Any, Callable

import torch
import torch.multiprocessing as mp


def _entry(rank: int, world: int, store: str, fn: Callable, args: tuple, queue) -> None:
    import torch

    torch.set_num_threads(1)
    from cluster.dist import destroy_process_group, init_process_group

    try:
        init_process_group(rank=rank, world=world, init_method=f"file://{store}", device=torch.device("cpu"), timeout_s=120)
        buf = io.BytesIO()  # plain bytes: shared-memory tensors would die with this process
        torch.save(fn(rank, world, *args), buf)
        queue.put((rank, buf.getvalue(), None))
    except BaseException:
        queue.put((rank, None, traceback.format_exc()))
    finally:
        destroy_process_group()


def run_ranks(fn: Callable[..., Any], world: int, tmp_path, *args: Any, timeout_s: float = 240) -> list[Any]:
    """fn(rank, world, *args) on each rank; returns the results in rank order.

    Ranks fork from a server process that imported torch and the project once,
    instead of spawning interpreters that each import them again (about 4 s of
    CPU a rank: most of the distributed tests' time on 2 cores). The server
    starts at the first call of the session, and its children see the
    environment of that moment."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "strategies", "orchestrator.trainer", fn.__module__])
    queue = ctx.SimpleQueue()
    os.makedirs(tmp_path, exist_ok=True)  # a FileStore in a missing folder waits forever
    store = os.path.join(str(tmp_path), f"store-{uuid.uuid4().hex}")  # fresh per call: a reused FileStore hangs
    procs = [ctx.Process(target=_entry, args=(r, world, store, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors = []
    for _ in range(world):
        rank, value, err = queue.get()
        if err:
            errors.append(f"rank {rank}:\n{err}")
        results[rank] = None if value is None else torch.load(io.BytesIO(value), weights_only=False)
    for p in procs:
        p.join(timeout_s)
        if p.is_alive():
            p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world)]
