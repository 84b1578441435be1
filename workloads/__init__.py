"""What is trained: models as ordered blocks, data, losses, and their registry."""
from workloads.base import Workload
from workloads.data import (
    Batch, DataCursor, SampleSource, ShardedLoader, TensorSource, even_shares, split_max, split_micro,
)
from workloads.registry import WORKLOADS, Registry, UnknownName, register_workload

from workloads import gpt as _gpt, mlp as _mlp, vision as _vision  # noqa: F401,E401  (register built-ins)

__all__ = [
    "Batch", "DataCursor", "Registry", "SampleSource", "ShardedLoader", "TensorSource", "UnknownName",
    "WORKLOADS", "Workload", "even_shares", "register_workload", "split_max", "split_micro",
]
