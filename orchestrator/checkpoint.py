"""Checkpoints of a run: ``<run>/checkpoints/step_N/`` with the strategy's sharded
state under ``state/``, ``trainer.json`` (step, data cursor, what wrote it), one
RNG state per rank, a manifest of every file's size and sha256
(``manifest/rank{r}.json``, each rank hashing its share), and a ``COMMITTED``
marker written last.

A checkpoint without its marker is never loaded, and nothing in one is loaded
before it is verified against the manifest: on the driver, before any worker
starts, every file's size and the bytes of the files the driver itself reads
(trainer.json, DCP's pickled ``.metadata``); on the workers, before any load,
the bytes of every file, each rank hashing its share. The manifest guards
against corruption and truncation, not tampering: it is not a signature, and a
checkpoint is trusted input (it holds pickles). Saving and restoring run on the
workers (collective); finding and checking a checkpoint runs on the driver.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import time
import uuid
from typing import Any

import fsspec
import torch
import torch.distributed as dist

from orchestrator.errors import CheckpointError
from workloads.base import meta_model

MARKER = "COMMITTED"
MANIFEST = "manifest"  # folder of the per-rank parts, rank{r}.json: {"hash": HASH, "files": {path: {size, HASH}}}
CORRUPT = "CORRUPT"  # written by ranks that found a file not matching the manifest: never loaded again
# hashlib's fastest digest where CPUs have SHA extensions (x86 since ~2017, ARMv8),
# and one that `sha256sum` checks by hand
HASH = "sha256"
_CHUNK = 8 << 20
NO_MANIFEST = "no manifest (written before polytrain verified checkpoints): loading it unverified"
_STEP_DIR = re.compile(r"step_(\d+)$")


def step_url(run_url: str, step: int) -> str:
    return f"{run_url}/checkpoints/step_{step}"


def model_shapes(workload) -> dict[str, list[int]]:
    """Parameter and buffer shapes of the workload's model, built without memory
    and without initialising it."""
    return {k: list(v.shape) for k, v in meta_model(workload).state_dict().items()}


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


# -- manifest ----------------------------------------------------------------------------------


def shares(sizes: dict[str, int], world: int) -> list[list[str]]:
    """The files split over ``world`` ranks by bytes (largest first, each to the
    least loaded rank): every rank hashes about as much, whatever the files."""
    load, out = [0] * world, [[] for _ in range(world)]
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        r = load.index(min(load))
        out[r].append(name)
        load[r] += sizes[name]
    return out


def _files(fs, path: str) -> dict[str, int]:
    """{path relative to the checkpoint: size} of its files, manifest and markers aside."""
    prefix = path.rstrip("/") + "/"
    out = {}
    for name, info in fs.find(path, detail=True).items():
        rel = name.removeprefix(prefix)
        if rel not in (MARKER, CORRUPT) and not rel.startswith(f"{MANIFEST}/"):
            out[rel] = info["size"]
    return out


def _digest(fs, file: str) -> tuple[int, str]:
    h, size = hashlib.new(HASH), 0
    with fs.open(file, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def read_manifest(fs, path: str, url: str) -> dict[str, dict] | None:
    """{file: {size, HASH}} from every part, or None for a checkpoint without one."""
    folder = f"{path}/{MANIFEST}"
    if not fs.exists(folder):
        return None
    entries: dict[str, dict] = {}
    for part in sorted(fs.ls(folder, detail=False)):
        name = f"{url}/{MANIFEST}/{part.rstrip('/').rsplit('/', 1)[-1]}"
        try:
            doc = json.loads(fs.cat_file(part))
            algo, files = doc["hash"], doc["files"]
            sizes = {rel: int(e["size"]) for rel, e in files.items()}
            digests = {rel: str(e[HASH]) for rel, e in files.items()}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{name}: unreadable ({type(e).__name__}: {e})") from None
        if algo != HASH:
            raise CheckpointError(f"{name}: hash={algo!r}; this polytrain verifies {HASH!r}")
        for rel in files:
            if rel in entries:
                raise CheckpointError(f"{name}: {rel} is listed by two parts of the manifest")
            entries[rel] = {"size": sizes[rel], HASH: digests[rel]}
    return entries


def _verify_sizes(fs, path: str, url: str, entries: dict[str, dict]) -> None:
    """Every file the manifest names is there with its size, and no other: one listing, no data read."""
    sizes = _files(fs, path)
    for rel, e in sorted(entries.items()):
        have = sizes.get(rel)
        if have is None:
            raise CheckpointError(f"{url}/{rel}: missing")
        if have != e["size"]:
            how = "truncated" if have < e["size"] else "longer than written"
            raise CheckpointError(f"{url}/{rel}: {how} ({have} bytes, the manifest says {e['size']})")
    extra = sorted(set(sizes) - set(entries))
    if extra:
        raise CheckpointError(f"{url}/{extra[0]}: not in the manifest (added after the checkpoint was written)")


def verify_files(fs, path: str, url: str, entries: dict[str, dict], names: list[str]) -> None:
    """The bytes of ``names`` against the manifest; raises CheckpointError naming the first that differs."""
    for rel in names:
        if rel not in entries:
            raise CheckpointError(f"{url}/{rel}: not in the manifest")
        try:
            size, digest = _digest(fs, f"{path}/{rel}")
        except FileNotFoundError:
            raise CheckpointError(f"{url}/{rel}: missing") from None
        want = entries[rel]
        if size != want["size"] or digest != want[HASH]:
            raise CheckpointError(f"{url}/{rel}: does not match the manifest ({size} bytes, {HASH} {digest[:16]}; "
                                  f"written: {want['size']} bytes, {want[HASH][:16]}): corrupted since it was saved")


def _verify_shares(fs, path: str, url: str, *, rank: int, world: int) -> None:
    """Collective: each rank hashes its share of the checkpoint's files and the
    ranks agree before anything is loaded; a mismatch marks the checkpoint
    ``CORRUPT`` (so ``latest`` skips it from then on) and fails every rank with
    the same line. Rank 0 reads the manifest for all (not every rank every part)."""
    found: tuple[dict | None, str | None] = (None, None)
    if rank == 0:
        try:
            found = (read_manifest(fs, path, url), None)
        except CheckpointError as e:
            found = (None, str(e))
    if dist.is_initialized():
        box = [found]
        dist.broadcast_object_list(box, src=0)
        found = box[0]
    entries, error = found
    if entries is not None and error is None:  # None: written before manifests (the driver warned)
        try:
            verify_files(fs, path, url, entries, shares({f: e["size"] for f, e in entries.items()}, world)[rank])
        except CheckpointError as e:
            error = str(e)
    errors = [error]
    if dist.is_initialized():
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
    error = next((e for e in errors if e), None)
    if error is None:
        return
    if rank == 0 and entries is not None:
        try:
            fs.pipe_file(f"{path}/{CORRUPT}", f"{error}\n".encode())
        except OSError:
            pass  # read-only storage: the error still names the file
    raise CheckpointError(error)


# -- workers -----------------------------------------------------------------------------------


class Checkpointer:
    """Saves every ``every`` steps (collective) and keeps the newest ``keep``."""

    def __init__(self, run_url: str, *, every: int, keep: int, rank: int, world: int, meta: dict[str, Any],
                 written=lambda step: None, committing=lambda step, url, seconds: None, manifest: bool = True):
        self.run_url, self.every, self.keep = run_url, every, keep
        self.rank, self.world, self.meta = rank, world, meta
        self.written = written  # called between this rank's write and the commit (fault injection)
        # rank 0, just before the marker: the driver stores every row up to this step first
        self.committing = committing
        self.manifest = manifest  # False for in-memory snapshots: they never rest on storage

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
                      "saved_at": time.time(), **({"manifest": HASH} if self.manifest else {})}
            fs.pipe_file(f"{path}/trainer.json", json.dumps(record, indent=1).encode())
        if self.manifest:
            self._write_manifest(fs, path)
        self.written(trainer.step)
        if dist.is_initialized():
            dist.barrier()  # every rank's shards are on storage before the marker
        if self.rank == 0:
            self.committing(trainer.step, url, time.perf_counter() - t0)
            fs.pipe_file(f"{path}/{MARKER}", b"")
            self._prune()
        return url

    def _write_manifest(self, fs, path: str) -> None:
        """Once every rank's files are on storage, each rank hashes its share of
        them (by bytes) into ``manifest/rank{r}.json``."""
        if self.rank == 0:  # left by an earlier save of this step (an attempt that died, a corrupt one redone)
            if fs.exists(f"{path}/{MANIFEST}"):
                fs.rm(f"{path}/{MANIFEST}", recursive=True)
            if fs.exists(f"{path}/{CORRUPT}"):
                fs.rm(f"{path}/{CORRUPT}")
        if dist.is_initialized():
            dist.barrier()  # every rank's files are written
            box = [_files(fs, path) if self.rank == 0 else None]
            dist.broadcast_object_list(box, src=0)  # one listing, and the same on every rank
            sizes = box[0]
        else:
            sizes = _files(fs, path)
        files = {}
        for rel in shares(sizes, self.world)[self.rank]:
            size, digest = _digest(fs, f"{path}/{rel}")
            files[rel] = {"size": size, HASH: digest}
        fs.makedirs(f"{path}/{MANIFEST}", exist_ok=True)
        fs.pipe_file(f"{path}/{MANIFEST}/rank{self.rank}.json", json.dumps({"hash": HASH, "files": files}).encode())

    def _prune(self) -> None:
        for _, old in committed(self.run_url)[self.keep :]:
            fs, path = fsspec.core.url_to_fs(old)
            fs.rm(f"{path}/{MARKER}")  # uncommit first: a half-deleted checkpoint is never loaded
            fs.rm(path, recursive=True)


def restore(trainer, url: str) -> dict[str, Any]:
    """Collective: strategy state, step, data cursor and RNG from a checked checkpoint,
    once the ranks have verified every file of it between them."""
    fs, path = fsspec.core.url_to_fs(url)
    _verify_shares(fs, path, url, rank=trainer.rank, world=trainer.world)
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
        Checkpointer(root, every=1, keep=1, rank=trainer.rank, world=trainer.world, meta=meta,
                     manifest=False).save(trainer)
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
    if fs.exists(f"{path}/{CORRUPT}"):
        why = fs.cat_file(f"{path}/{CORRUPT}").decode().strip()
        raise CheckpointError(f"{url}: found corrupt when last loaded ({why})")
    try:  # JSON: reading it runs nothing; it is verified before anything in it is used
        meta = json.loads(fs.cat_file(f"{path}/trainer.json"))
        meta["step"], meta["cursor"], meta["world"]  # noqa: B018  (the keys restore needs)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{url}/trainer.json: unreadable ({type(e).__name__}: {e})") from None
    entries = read_manifest(fs, path, url)
    if entries is not None:
        verify_files(fs, path, url, entries, ["trainer.json"])
    elif meta.get("manifest"):
        raise CheckpointError(f"{url}/{MANIFEST}: missing (trainer.json says it was written)")
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
        if entries is not None:  # before read_metadata unpickles it
            verify_files(fs, path, url, entries, ["state/.metadata"])
        _check_dcp_files(f"{url}/state")
    if entries is not None:
        _verify_sizes(fs, path, url, entries)
    return meta


def _check_dcp_files(url: str) -> None:
    """DCP's metadata names every byte range it will read: check each file holds them."""
    from strategies.dcp import read_metadata

    fs, path = fsspec.core.url_to_fs(url)
    try:
        metadata = read_metadata(url)
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
