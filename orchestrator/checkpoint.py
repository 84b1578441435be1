"""Checkpoints of a run: ``<run>/checkpoints/step_N/`` with the strategy's sharded
state under ``state/``, ``trainer.json`` (step, data cursor, what wrote it), one
RNG state per rank, and a ``COMMITTED`` marker written last.

A checkpoint without its marker is never loaded. Saving and restoring run on
the workers (collective); finding and checking a checkpoint runs on the driver,
before any worker starts.
"""
from __future__ import annotations

import io
import json
import re
import time
import uuid
from typing import Any

import fsspec
import torch
import torch.distributed as dist

MARKER = "COMMITTED"
_STEP_DIR = re.compile(r"step_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the reason."""


def step_url(run_url: str, step: int) -> str:
    return f"{run_url}/checkpoints/step_{step}"


def model_shapes(workload) -> dict[str, list[int]]:
    """Parameter and buffer shapes of the workload's model, built without memory."""
    with torch.device("meta"):
        model = workload.model()
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def committed(run_url: str) -> list[tuple[int, str]]:
    """(step, url) of every committed checkpoint of a run, newest first."""
    fs, path = fsspec.core.url_to_fs(f"{run_url}/checkpoints")
    if not fs.exists(path):
        return []
    found = []
    for entry in fs.ls(path, detail=False):
        m = _STEP_DIR.search(entry.rstrip("/"))
        if m and fs.exists(f"{entry.rstrip('/')}/{MARKER}"):
            found.append((int(m.group(1)), step_url(run_url, int(m.group(1)))))
    return sorted(found, reverse=True)


# -- workers -----------------------------------------------------------------------------------


class Checkpointer:
    """Saves every ``every`` steps (collective) and keeps the newest ``keep``."""

    def __init__(self, run_url: str, *, every: int, keep: int, rank: int, world: int, meta: dict[str, Any],
                 written=lambda step: None, committing=lambda step, url, seconds: None):
        self.run_url, self.every, self.keep = run_url, every, keep
        self.rank, self.world, self.meta = rank, world, meta
        self.written = written  # called between this rank's write and the commit (fault injection)
        # rank 0, just before the marker: the driver stores every row up to this step first
        self.committing = committing

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, trainer) -> str:
        t0 = time.perf_counter()
        url = step_url(self.run_url, trainer.step)
        fs, path = fsspec.core.url_to_fs(url)
        trainer.strategy.save_checkpoint(f"{url}/state")
        buf = io.BytesIO()
        torch.save(torch.get_rng_state(), buf)
        fs.pipe_file(f"{path}/rng_rank{self.rank}.pt", buf.getvalue())
        if self.rank == 0:
            record = {**self.meta, "step": trainer.step, "cursor": trainer.loader.state_dict(), "world": self.world,
                      "saved_at": time.time()}
            fs.pipe_file(f"{path}/trainer.json", json.dumps(record, indent=1).encode())
        self.written(trainer.step)
        if dist.is_initialized():
            dist.barrier()  # every rank's shards are on storage before the marker
        if self.rank == 0:
            self.committing(trainer.step, url, time.perf_counter() - t0)
            fs.pipe_file(f"{path}/{MARKER}", b"")
            self._prune()
        return url

    def _prune(self) -> None:
        for _, old in committed(self.run_url)[self.keep :]:
            fs, path = fsspec.core.url_to_fs(old)
            fs.rm(f"{path}/{MARKER}")  # uncommit first: a half-deleted checkpoint is never loaded
            fs.rm(path, recursive=True)


def restore(trainer, url: str) -> dict[str, Any]:
    """Collective: strategy state, step, data cursor and RNG from a checked checkpoint."""
    fs, path = fsspec.core.url_to_fs(url)
    meta = json.loads(fs.cat_file(f"{path}/trainer.json"))
    trainer.strategy.load_checkpoint(f"{url}/state")
    trainer.step = meta["step"]
    trainer.loader.load_state_dict(meta["cursor"])
    rng = f"{path}/rng_rank{trainer.rank % meta['world']}.pt"
    torch.set_rng_state(torch.load(io.BytesIO(fs.cat_file(rng)), weights_only=True))
    return meta


def snapshot_files(trainer, meta: dict[str, Any]) -> dict[str, bytes]:
    """Collective: this rank's part of a checkpoint of the current step, as
    {relative path: bytes}. Written through fsspec's in-process memory://
    filesystem, so a snapshot is the checkpoint format (reshardable, with RNG and
    data cursor) without touching storage; the union of every rank's part is a
    whole checkpoint."""
    root = f"memory://polytrain-snapshot-{uuid.uuid4().hex}"
    fs, base = fsspec.core.url_to_fs(root)
    try:
        Checkpointer(root, every=1, keep=1, rank=trainer.rank, world=trainer.world, meta=meta).save(trainer)
        prefix = base.rstrip("/") + "/"
        return {f.removeprefix(prefix): fs.cat_file(f) for f in fs.find(base)}
    finally:
        fs.rm(base, recursive=True)


def restore_snapshot(trainer, parts: list[dict[str, bytes]]) -> dict[str, Any]:
    """Collective: restore from every rank's ``snapshot_files`` (any world size)."""
    root = f"memory://polytrain-restore-{uuid.uuid4().hex}"
    fs, base = fsspec.core.url_to_fs(root)
    try:
        for part in parts:
            for rel, data in part.items():
                fs.pipe_file(f"{base}/{rel}", data)
        (_, url), = committed(root)
        return restore(trainer, url)
    finally:
        fs.rm(base, recursive=True)


# -- driver ------------------------------------------------------------------------------------


def check(url: str, *, fmt: str, shapes: dict[str, list[int]]) -> dict[str, Any]:
    """Everything that can be checked without loading tensors; raises CheckpointError."""
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        raise CheckpointError(f"{url}: no such checkpoint")
    if not fs.exists(f"{path}/{MARKER}"):
        raise CheckpointError(f"{url}: not committed (no {MARKER} marker: the write did not finish)")
    try:
        meta = json.loads(fs.cat_file(f"{path}/trainer.json"))
        meta["step"], meta["cursor"], meta["world"]  # noqa: B018  (the keys restore needs)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{url}/trainer.json: unreadable ({type(e).__name__}: {e})") from None
    if meta.get("format") != fmt:
        raise CheckpointError(f"{url}: written in format {meta.get('format')!r} by strategy "
                              f"{meta.get('strategy')!r}; this strategy reads {fmt!r}")
    saved = meta.get("shapes", {})
    if saved != shapes:
        diff = next((k for k in sorted(set(saved) | set(shapes)) if saved.get(k) != shapes.get(k)), "?")
        raise CheckpointError(
            f"{url}: from another model (workload {meta.get('workload')!r}): {diff} is "
            f"{saved.get(diff, 'absent')} there, {shapes.get(diff, 'absent')} here")
    if fmt == "dcp":
        _check_dcp_files(f"{url}/state")
    return meta


def _check_dcp_files(url: str) -> None:
    """DCP's metadata names every byte range it will read: check each file holds them."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    fs, path = fsspec.core.url_to_fs(url)
    reader = FileSystemReader(path) if "://" not in url else FsspecReader(url)
    try:
        metadata = reader.read_metadata()
    except Exception as e:
        raise CheckpointError(f"{url}/.metadata: unreadable ({type(e).__name__}: {str(e)[:120]})") from None
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in needed.items():
        file = f"{path}/{name}"
        have = fs.size(file) if fs.exists(file) else None
        if have is None:
            raise CheckpointError(f"{url}/{name}: missing")
        if have < size:
            raise CheckpointError(f"{url}/{name}: truncated ({have} bytes, metadata needs {size})")


def resolve(resume: str, *, run_url: str, fmt: str, shapes: dict[str, list[int]],
            before: int | None = None) -> tuple[str, dict, list[str]]:
    """The checkpoint to resume from: ``latest`` (this run's newest loadable one,
    older than step ``before`` if given, falling back past broken ones, each
    named in the notes) or an explicit URL."""
    if resume != "latest":
        return resume, check(resume, fmt=fmt, shapes=shapes), []
    notes = []
    for _, url in [c for c in committed(run_url) if before is None or c[0] < before]:
        try:
            return url, check(url, fmt=fmt, shapes=shapes), notes
        except CheckpointError as e:
            notes.append(f"skipping checkpoint {e}; falling back to the previous one")
    raise CheckpointError(f"resume='latest': no loadable committed checkpoint under {run_url}/checkpoints"
                          + (f" ({'; '.join(notes)})" if notes else ""))
