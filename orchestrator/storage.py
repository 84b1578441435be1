"""The run folder, through fsspec: local paths, memory://, s3://, ...

Besides whole files written atomically, a run folder holds append-only logs
(metrics, events, timeline): each is a compacted ``<name>.parquet`` plus
immutable parts ``parts/<name>/*.parquet`` written since, each atomically. The
compacted file records in its Parquet metadata which parts it already holds,
so a reader never counts a row twice however a compaction is interrupted.
"""
from __future__ import annotations

import io
import json
import os
import time

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.config import ConfigError

PARTS = "parts"
_HELD = b"polytrain.parts"  # metadata key of a compacted log: the part names it holds


def _reason(e: Exception) -> str:
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def check_writable(folder: str, flag: str, shown: str | None = None) -> None:
    """Bad input found before the work it would lose: make ``folder`` (a path or
    fsspec URL the user named) and write and remove a probe file in it; a one-line
    ConfigError naming ``flag`` and ``shown`` (default: the folder) if it cannot."""
    url = folder if "://" in folder else os.path.abspath(os.path.expanduser(folder))
    try:
        fs, path = fsspec.core.url_to_fs(url)
        probe = f"{path.rstrip('/')}/.polytrain-probe-{os.getpid()}"
        fs.makedirs(path, exist_ok=True)
        fs.pipe_file(probe, b"")
        fs.rm(probe)
    except (OSError, ValueError, ImportError) as e:
        raise ConfigError(f"{flag} {shown or folder!r}: not writable ({_reason(e)})") from None


class RunFolder:
    def __init__(self, storage: str, run_id: str):
        if "://" not in storage:  # JobSpec already made it absolute; from_url passes URLs through
            storage = os.path.abspath(os.path.expanduser(storage))
        self.url = f"{storage.rstrip('/')}/{run_id}"
        self.fs, self.path = fsspec.core.url_to_fs(self.url)
        # part names sort by when their writer started, then by sequence: readers get rows in order
        self._session, self._seq = f"{time.time_ns():019d}-{os.getpid()}", 0

    @classmethod
    def from_url(cls, url: str) -> "RunFolder":
        storage, _, run_id = url.rstrip("/").rpartition("/")
        return cls(storage, run_id)

    def create(self, spec_yaml: str) -> None:
        """Make the folder and write spec.yaml; an unwritable storage is a ConfigError."""
        try:
            self.fs.makedirs(self.path, exist_ok=True)
            self.write_bytes("spec.yaml", spec_yaml.encode())
        except (OSError, ValueError) as e:
            raise ConfigError(f"storage={self.url.rsplit('/', 1)[0]!r}: not writable ({_reason(e)})") from None

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write whole-or-nothing: to a temporary name, then move into place, so a
        crash mid-write leaves the previous version readable."""
        folder, _, base = f"{self.path}/{name}".rpartition("/")
        if "/" in name:
            self.fs.makedirs(folder, exist_ok=True)
        tmp = f"{folder}/.{base}.tmp"
        self.fs.pipe_file(tmp, data)
        self.fs.mv(tmp, f"{folder}/{base}")

    def write_table(self, name: str, table: pa.Table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf)
        self.write_bytes(name, buf.getvalue())

    def read_table(self, name: str) -> pd.DataFrame:
        return self._read_arrow(name).to_pandas()

    def _read_arrow(self, name: str) -> pa.Table:
        with self.fs.open(f"{self.path}/{name}", "rb") as f:
            return pq.read_table(f)

    # -- append-only logs --------------------------------------------------------------------
    def append_part(self, log: str, table: pa.Table) -> None:
        """One more immutable part of ``log``, whole or not at all."""
        self._seq += 1
        self.write_table(f"{PARTS}/{log}/{self._session}-{self._seq:06d}.parquet", table)

    def read_log(self, log: str) -> pa.Table | None:
        """Every row of ``log``: its compacted file, then the parts it does not hold,
        in the order they were written (columns a part lacks are null); None when
        there is neither."""
        for _ in range(2):
            try:
                return self._read_log(log)
            except FileNotFoundError:  # a compaction removed a part after it was listed: it is in the file now
                pass
        return self._read_log(log)

    def compact(self, log: str, table: pa.Table) -> None:
        """Write ``table`` as ``<log>.parquet``, holding every part present now, then
        remove those parts. ``table`` must hold every row of the log the caller
        means to keep (the writer keeps them all; parts it did not read are dropped)."""
        parts = self._parts(log)
        meta = {**(table.schema.metadata or {}), _HELD: json.dumps(parts).encode()}
        self.write_table(f"{log}.parquet", table.replace_schema_metadata(meta))
        if parts:
            self.fs.rm([f"{self.path}/{PARTS}/{log}/{p}" for p in parts])
        for folder in (f"{self.path}/{PARTS}/{log}", f"{self.path}/{PARTS}"):  # leave no empty folders behind
            try:
                if not self.fs.ls(folder, detail=False):
                    self.fs.rm(folder, recursive=True)
            except (FileNotFoundError, NotADirectoryError):
                pass

    def _parts(self, log: str) -> list[str]:
        folder = f"{self.path}/{PARTS}/{log}"
        self.fs.invalidate_cache(folder)  # object stores cache listings; another process writes these
        try:
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(folder, detail=False)]
        except FileNotFoundError:
            return []
        return sorted(n for n in names if n.endswith(".parquet") and not n.startswith("."))  # not temporaries

    def _read_log(self, log: str) -> pa.Table | None:
        tables, held = [], set()
        if self.exists(f"{log}.parquet"):
            compacted = self._read_arrow(f"{log}.parquet")
            held = set(json.loads((compacted.schema.metadata or {}).get(_HELD, b"[]")))
            tables.append(compacted.replace_schema_metadata(None))
        tables += [self._read_arrow(f"{PARTS}/{log}/{p}") for p in self._parts(log) if p not in held]
        return pa.concat_tables(tables, promote_options="default") if tables else None

    def exists(self, name: str) -> bool:
        return self.fs.exists(f"{self.path}/{name}")
