"""The job's Keeper: the owner of in-memory snapshots.

Its own module, which imports Ray and nothing else: the Keeper's actor process
imports the module its class is defined in, and this one starts beside the rank
actors, on the same cores, without importing torch (about 2 s of CPU).
"""
from __future__ import annotations

from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


@ray.remote(num_cpus=0)
class Keeper:
    """Holds what workers stash (in-memory snapshots) in Ray's object store, as
    the owner of those objects: an object dies with its owner, so a worker must
    not own the snapshot it would be restored from. One per job, on the
    driver's node (``start_keeper``); a node that dies takes only its workers, not this."""

    def __init__(self):
        self.refs: dict[str, ray.ObjectRef] = {}

    def stash(self, key: str, value: Any) -> str:
        self.refs[key] = ray.put(value)
        return key

    def fetch(self, keys: list[str]) -> list[list]:
        # each ref wrapped in a list, so the caller gets the ref, not a copy through this actor
        return [[self.refs[k]] for k in keys]

    def drop(self, keys: list[str]) -> None:
        for k in keys:
            self.refs.pop(k, None)

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()


def start_keeper():
    """The job's Keeper, on the driver's node (hard affinity: a node that dies
    must not take the snapshots with it while the driver lives on). Restarted,
    empty, if its process dies, so later snapshots have an owner; a snapshot it
    lost is then reported missing and the controller falls back to a checkpoint."""
    here = ray.get_runtime_context().get_node_id()
    return Keeper.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False),
                          max_restarts=-1).remote()
