"""What classification workloads share: a Parquet (inputs, label) source,
cross-entropy, and accuracy as a step metric."""
from __future__ import annotations

import hashlib
import os
from typing import ClassVar

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from pydantic import Field

from workloads.base import Workload
from workloads.data import Batch, ensure_shards, read_column


def default_data_root() -> str:
    return os.environ.get("POLYTRAIN_DATA", os.path.join(os.path.expanduser("~"), ".cache", "polytrain", "data"))


def generated_url(kind: str, *key: object) -> str:
    """Cache folder of a generated data set, keyed by everything that shapes it."""
    digest = hashlib.sha1("-".join(map(str, key)).encode()).hexdigest()[:10]
    return os.path.join(default_data_root(), f"{kind}-{digest}")


class ArraySource:
    """Rows of a fixed-width input column and an int ``label`` column, in memory."""

    def __init__(self, url: str, column: str, shape: tuple[int, ...], *, scale: float = 1.0, shift: float = 0.0,
                 classes: int):
        width = int(np.prod(shape))
        flat = read_column(url, column)
        if flat.size % width:
            raise ValueError(f"data={url!r}: column {column!r} rows must hold {width} values each")
        x = flat.reshape(-1, *shape).astype(np.float32)
        self.x = torch.from_numpy(x * scale + shift)
        self.y = torch.from_numpy(read_column(url, "label").astype(np.int64))
        if len(self.y) != len(self.x):
            raise ValueError(f"data={url!r}: {len(self.x)} inputs but {len(self.y)} labels")
        if len(self.y) and (self.y.min() < 0 or self.y.max() >= classes):
            raise ValueError(f"data={url!r}: labels must lie in [0, {classes}), found [{self.y.min()}, {self.y.max()}]")

    def __len__(self) -> int:
        return len(self.y)

    def gather(self, indices: np.ndarray) -> Batch:
        idx = torch.from_numpy(np.asarray(indices))
        return self.x[idx], self.y[idx]


class Classification(Workload):
    """Base for workloads whose batch is (inputs, labels)."""

    classes: int = Field(10, ge=2, description="number of classes")
    n_samples: int = Field(8192, ge=64, description="samples in the generated data set")
    data_seed: int = Field(4321, description="seed of the generated data set")
    heldout_fraction: float = Field(
        0.05, ge=0, lt=0.5, description="tail of the data kept out of training, for held-out evaluation")

    data_version: ClassVar[int] = 1
    data_fields: ClassVar[tuple[str, ...]] = ("classes", "n_samples", "data_seed")  # what shapes the data

    def loss(self, output: torch.Tensor, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(output, batch[1])

    def step_metrics(self, output: torch.Tensor, batch: Batch) -> dict[str, float]:
        return {"accuracy": (output.argmax(-1) == batch[1]).float().mean().item()}

    def generated_tables(self) -> list[pa.Table]:
        raise NotImplementedError

    def data_url(self) -> str:
        if self.data:
            return self.data
        url = generated_url(self.name, self.data_version, *(getattr(self, f) for f in self.data_fields))
        return ensure_shards(url, self.generated_tables)


def split_tables(columns: dict[str, list], shards: int = 4) -> list[pa.Table]:
    n = len(next(iter(columns.values())))
    per = -(-n // shards)
    return [pa.table({k: v[i : i + per] for k, v in columns.items()}) for i in range(0, n, per)]
