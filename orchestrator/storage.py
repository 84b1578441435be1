"""The run folder, through fsspec: local paths, memory://, s3://, ..."""
from __future__ import annotations

import io
import os

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.config import ConfigError


class RunFolder:
    def __init__(self, storage: str, run_id: str):
        if "://" not in storage:  # JobSpec already made it absolute; from_url passes URLs through
            storage = os.path.abspath(os.path.expanduser(storage))
        self.url = f"{storage.rstrip('/')}/{run_id}"
        self.fs, self.path = fsspec.core.url_to_fs(self.url)

    @classmethod
    def from_url(cls, url: str) -> "RunFolder":
        storage, _, run_id = url.rstrip("/").rpartition("/")
        return cls(storage, run_id)

    def create(self, spec_yaml: str) -> None:
        """Make the folder and write spec.yaml; an unwritable storage is a ConfigError."""
        try:
            self.fs.makedirs(self.path, exist_ok=True)
            self.write_bytes("spec.yaml", spec_yaml.encode())
        except (OSError, PermissionError, ValueError) as e:
            reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
            raise ConfigError(f"storage={self.url.rsplit('/', 1)[0]!r}: not writable ({reason})") from None

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write whole-or-nothing: to a temporary name, then move into place, so a
        crash mid-write leaves the previous version readable."""
        tmp = f"{self.path}/.{name}.tmp"
        self.fs.pipe_file(tmp, data)
        self.fs.mv(tmp, f"{self.path}/{name}")

    def write_table(self, name: str, table: pa.Table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf)
        self.write_bytes(name, buf.getvalue())

    def read_table(self, name: str) -> pd.DataFrame:
        with self.fs.open(f"{self.path}/{name}", "rb") as f:
            return pq.read_table(f).to_pandas()

    def exists(self, name: str) -> bool:
        return self.fs.exists(f"{self.path}/{name}")
