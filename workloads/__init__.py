"""What is trained: models as ordered blocks, data, losses, and their registry."""
from workloads.base import Workload
from workloads.data import Batch, DataCursor, SampleSource, ShardedLoader, split_micro
from workloads.registry import WORKLOADS, Registry, UnknownName, register_workload

from workloads import gpt as _gpt  # noqa: F401  (registers the built-in workloads)

__all__ = [
    "Batch", "DataCursor", "Registry", "SampleSource", "ShardedLoader", "UnknownName",
    "WORKLOADS", "Workload", "register_workload", "split_micro",
]
