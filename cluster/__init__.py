"""Where ranks run: Ray runtime, worker group, rendezvous, collectives with accounting.

Only the collective layer is imported here; ``cluster.runtime`` and
``cluster.worker_group`` import Ray, so the driver imports them explicitly.
"""
from cluster.comm import (
    Comm, CommStats, nbytes, all_gather_bytes, all_to_all_bytes, broadcast_bytes, reduce_scatter_bytes, ring_allreduce_bytes,
)

__all__ = ["Comm", "CommStats", "nbytes", "all_gather_bytes", "all_to_all_bytes", "broadcast_bytes", "reduce_scatter_bytes", "ring_allreduce_bytes"]
