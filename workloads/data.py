"""Parquet shards through fsspec, and a resumable, world-size-independent loader.

The sample stream is a property of the data and the seed alone: epoch e visits
all samples in the order ``permutation(seed, e)``; global step s takes the next
``global_batch`` samples of it; rank r of world w takes the r-th contiguous
slice of that global batch. So ranks are disjoint, a 1-rank reference sees the
same global batch as a w-rank run, and the cursor (epoch, position) is the same
on every rank and survives a change of world size.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import asdict, dataclass
from typing import Callable, Protocol

import fsspec
from fsspec.implementations.local import LocalFileSystem
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

Batch = tuple[torch.Tensor, ...]
COMMIT_MARKER = "_COMMITTED"


class SampleSource(Protocol):
    def __len__(self) -> int: ...

    def gather(self, indices: np.ndarray) -> Batch: ...


class TensorSource:
    """Samples held as tensors with a common first dimension (data made in code)."""

    def __init__(self, *tensors: torch.Tensor):
        if not tensors or any(t.shape[0] != tensors[0].shape[0] for t in tensors):
            raise ValueError(f"TensorSource needs tensors with one first dimension, got {[tuple(t.shape) for t in tensors]}")
        self.tensors = tensors

    def __len__(self) -> int:
        return self.tensors[0].shape[0]

    def gather(self, indices: np.ndarray) -> Batch:
        idx = torch.from_numpy(np.asarray(indices))
        return tuple(t[idx] for t in self.tensors)


class Subset:
    """Samples ``start``..``stop`` of another source, renumbered from 0."""

    def __init__(self, source: SampleSource, start: int, stop: int):
        if not 0 <= start <= stop <= len(source):
            raise ValueError(f"Subset({start}, {stop}) of a source of {len(source)} samples")
        self.source, self.start, self.stop = source, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def gather(self, indices: np.ndarray) -> Batch:
        idx = np.asarray(indices)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"indices outside [0, {len(self)})")
        return self.source.gather(idx + self.start)


def heldout_split(n: int, fraction: float) -> int:
    """Where the held-out tail of ``n`` samples starts: ``fraction`` of them, at
    least one when the fraction is positive, always leaving one to train on."""
    if fraction <= 0 or n < 2:
        return n
    return n - min(n - 1, max(1, round(n * fraction)))


@dataclass
class DataCursor:
    epoch: int = 0
    position: int = 0  # samples of this epoch's permutation already consumed


def even_shares(total: int, world: int, quantum: int = 1) -> list[int]:
    """Split ``total`` samples over ``world`` ranks in multiples of ``quantum``, as
    evenly as possible (the first ranks take the remainder)."""
    if total % quantum or total // quantum < world:
        raise ValueError(f"global_batch({total}) cannot be split over {world} ranks in multiples of {quantum}")
    units, extra = divmod(total // quantum, world)
    return [(units + (r < extra)) * quantum for r in range(world)]


class ShardedLoader:
    """Yields this rank's slice of each global batch; its cursor is saveable.

    ``shares`` (samples per rank, summing to the global batch) give ranks
    uneven slices: straggler rebalancing and elastic shrink use them. Default:
    an even split, which requires the global batch to divide by the world."""

    def __init__(self, source: SampleSource, *, rank: int, world: int, global_batch: int, seed: int,
                 shares: list[int] | None = None):
        if shares is None and global_batch % world:
            raise ValueError(f"global_batch({global_batch}) is not divisible by world({world})")
        if global_batch > len(source):
            raise ValueError(f"global_batch({global_batch}) is larger than the dataset ({len(source)} samples)")
        self.source, self.rank, self.world = source, rank, world
        self.global_batch, self.seed = global_batch, seed
        self.shares = shares or [global_batch // world] * world
        self.set_shares(self.shares)
        self.cursor = DataCursor()
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm, self._perm_epoch = rng.permutation(len(self.source)), epoch
        return self._perm

    def next_global_indices(self) -> np.ndarray:
        """Advance the cursor by one global batch and return its sample indices."""
        c = self.cursor
        if c.position + self.global_batch > len(self.source):  # drop the ragged tail
            c.epoch, c.position = c.epoch + 1, 0
        idx = self._permutation(c.epoch)[c.position : c.position + self.global_batch]
        c.position += self.global_batch
        return idx

    def set_shares(self, shares: list[int]) -> None:
        if len(shares) != self.world or sum(shares) != self.global_batch or min(shares) < 0:
            raise ValueError(f"shares={shares}: need {self.world} non-negative counts summing to {self.global_batch}")
        self.shares = list(shares)

    def next_batch(self) -> Batch:
        idx = self.next_global_indices()
        start = sum(self.shares[: self.rank])
        return self.source.gather(idx[start : start + self.shares[self.rank]])

    def state_dict(self) -> dict:
        return asdict(self.cursor)

    def load_state_dict(self, state: dict) -> None:
        self.cursor = DataCursor(**state)


def split_micro(batch: Batch, n: int) -> list[Batch]:
    """Split a rank's batch into n equal micro-batches (for accumulation)."""
    size = batch[0].shape[0]
    if size % n:
        raise ValueError(f"batch of {size} samples cannot be split into {n} equal micro-batches")
    return [tuple(t[i * size // n : (i + 1) * size // n] for t in batch) for i in range(n)]


def split_max(batch: Batch, max_size: int) -> list[Batch]:
    """Split a batch into micro-batches of at most ``max_size`` samples: a rank
    given a larger share accumulates more of them, so memory per micro-batch stays."""
    size = batch[0].shape[0]
    return [tuple(t[i : i + max_size] for t in batch) for i in range(0, size, max_size)] or [batch]


# --- Parquet shards -------------------------------------------------------------------------


def is_committed(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(f"{path.rstrip('/')}/{COMMIT_MARKER}")


def ensure_shards(url: str, make_tables: Callable[[], list[pa.Table]]) -> str:
    """Write generated shards to ``url`` unless a committed copy is there.

    Deterministic generators make racing writers harmless; on a local disk the
    shards are written to a private folder and renamed into place, so a reader
    never sees half a dataset.
    """
    if is_committed(url):
        return url
    fs, path = fsspec.core.url_to_fs(url)
    local = isinstance(fs, LocalFileSystem)
    target = f"{path.rstrip('/')}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}" if local else path
    fs.makedirs(target, exist_ok=True)
    for i, table in enumerate(make_tables()):
        with fs.open(f"{target}/part-{i:05d}.parquet", "wb") as f:
            pq.write_table(table, f)
    fs.pipe_file(f"{target}/{COMMIT_MARKER}", b"")
    if local:
        try:
            os.rename(target, path)
        except OSError:  # another process won the race with identical content
            fs.rm(target, recursive=True)
    return url


def read_column(url: str, column: str) -> np.ndarray:
    """One column of numbers (or of lists of numbers, flattened) of every Parquet shard
    under ``url`` (sorted by file name), as one numpy array. Read file by file and
    from Arrow's buffers: pyarrow.dataset and pyarrow's own conversions import pandas,
    0.45 s of CPU in every rank that reads its data."""
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        raise FileNotFoundError(f"data={url!r}: no such file or folder")
    files = sorted(p for p in (fs.find(path) if fs.isdir(path) else [path]) if p.endswith(".parquet"))
    if not files:
        raise FileNotFoundError(f"data={url!r}: no .parquet files there")
    parts = []
    for name in files:
        with fs.open(name, "rb") as f:
            shard = pq.ParquetFile(f)
            names = shard.schema_arrow.names
            if column not in names:
                raise ValueError(f"data={url!r}: no {column!r} column (columns: {', '.join(names)})")
            for chunk in shard.read(columns=[column])[column].chunks:
                parts.append(_numbers(chunk, f"data={url!r}: column {column!r}"))
    return np.concatenate(parts) if parts else np.empty(0)


def _numbers(chunk: pa.Array, what: str) -> np.ndarray:
    lists = (pa.types.is_list, pa.types.is_large_list, pa.types.is_fixed_size_list)
    values = chunk.flatten() if any(is_list(chunk.type) for is_list in lists) else chunk
    if not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type)):
        raise ValueError(f"{what}: holds {chunk.type}; expected numbers or lists of numbers")
    if values.null_count:
        raise ValueError(f"{what}: {values.null_count} missing values")
    dtype = np.dtype(values.type.to_pandas_dtype())
    return np.frombuffer(values.buffers()[1], dtype=dtype, count=len(values), offset=values.offset * dtype.itemsize)
