"""torch.distributed set-up: backend choice, rendezvous, a free port."""
from __future__ import annotations

import socket
from datetime import timedelta

import torch
import torch.distributed as dist


def free_port(host: str = "") -> int:
    """A port the OS says is free now (bind to 0); the caller uses it at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # outside Ray (tests, torchrun)
        return "127.0.0.1"


def pick_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_process_group(*, rank: int, world: int, init_method: str, device: torch.device, timeout_s: float) -> None:
    """gloo on CPU, NCCL on CUDA; ``init_method`` is ``tcp://host:port`` or ``file://path``."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s)
    )


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def abort_process_group(*, destroy: bool = True) -> None:
    """Leave a process group that lost a peer, so a new one can be formed in this
    process. Aborted first: that closes its connections even while a module (DDP,
    a strategy kept alive) still holds the group, so a peer still waiting on this
    rank fails at once instead of at its timeout; gloo raises on a closed peer."""
    if dist.is_initialized():
        # every group, not only the default one: a strategy's collectives run on its
        # mesh's groups (new_group), and torch lists them only in its private registry
        for group in list(dist.distributed_c10d._world.pg_map):
            group.abort()
        if destroy:
            dist.destroy_process_group()
