"""Where ranks run: Ray runtime, worker group, rendezvous, collectives with accounting.

Only the collective layer is exported here, and loaded on first use: torch comes
with it, and the driver's torch-free modules (``cluster.faults``,
``cluster.network``) must not wait for it. ``cluster.runtime`` and
``cluster.worker_group`` import Ray, so the driver imports them explicitly.
"""

__all__ = ["Comm", "CommStats", "nbytes", "all_gather_bytes", "all_to_all_bytes", "broadcast_bytes", "reduce_scatter_bytes", "ring_allreduce_bytes"]


def __getattr__(name: str):
    if name in __all__:  # PEP 562: ``from cluster import Comm`` imports cluster.comm (and torch) only then
        from cluster import comm

        return getattr(comm, name)
    raise AttributeError(f"module 'cluster' has no attribute {name!r}")
