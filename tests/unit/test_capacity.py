"""Workers a machine or cluster can never hold are refused before anything starts."""
import pytest

from cluster.runtime import (MAX_WORKERS_PER_CPU, WORKER_MEMORY_BYTES, ClusterError, check_placeable,
                             embedded_worker_limit)

GiB = 2**30


def test_embedded_limit_is_the_smaller_of_cores_and_memory():
    assert embedded_worker_limit(2, 64 * GiB) == 2 * MAX_WORKERS_PER_CPU
    assert embedded_worker_limit(64, 4 * GiB) == 4 * GiB // WORKER_MEMORY_BYTES
    assert embedded_worker_limit(0.5, 0) == 1  # one worker always runs


NODES = [{"CPU": 4.0, "GPU": 1.0}, {"CPU": 4.0}]


@pytest.mark.parametrize("workers, cpus, gpus, expected", [
    (9, 1, 0, "workers=9: needs 9 CPUs at cluster.cpus_per_worker=1, the cluster has 8"),
    (2, 1, 1, "cluster.gpus_per_worker=1: workers=2 need 2 GPUs, the cluster has 1"),
    (1, 6, 0, "cluster.cpus_per_worker=6, cluster.gpus_per_worker=0: no node of the cluster has that much"),
    (1, 4, 0.5, None), (8, 1, 0, None),
])
def test_joined_cluster_placeability(workers, cpus, gpus, expected):
    if expected is None:
        check_placeable(workers=workers, cpus_per_worker=cpus, gpus_per_worker=gpus, nodes=NODES)
        return
    with pytest.raises(ClusterError) as e:
        check_placeable(workers=workers, cpus_per_worker=cpus, gpus_per_worker=gpus, nodes=NODES)
    assert expected in str(e.value) and "\n" not in str(e.value)
