"""torch.distributed set-up: backend choice, rendezvous, a free port."""
from __future__ import annotations

import socket
import threading
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
    global _aborted
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s)
    )
    _aborted = False


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# Futures of collectives in flight that something waits on in C++ (DDP's reducer at
# the end of backward): an aborted gloo group drops its queued work without ever
# completing their futures, so abort_process_group fails them itself.
_in_flight: set[torch.futures.Future] = set()
_in_flight_lock = threading.Lock()
_aborted = False  # since the last init_process_group: work launched now is dropped as well


def abortable(fut: torch.futures.Future) -> torch.futures.Future:
    """A future that completes as ``fut`` does, or fails when this process's groups
    are aborted first (``abort_process_group``), so whatever waits on it raises."""
    out = torch.futures.Future()
    with _in_flight_lock:
        if _aborted:  # launched after the abort (a rank that was behind): it would wait forever
            out.set_exception(_aborted_error())
            return out
        _in_flight.add(out)

    def settle(done: torch.futures.Future) -> None:
        with _in_flight_lock:
            if out not in _in_flight:
                return  # failed by an abort already
            _in_flight.discard(out)
        try:
            out.set_result(done.value())
        except Exception as e:  # noqa: BLE001 (whatever failed the collective fails its waiter)
            out.set_exception(e)

    fut.add_done_callback(settle)
    return out


def _aborted_error() -> RuntimeError:
    return RuntimeError("gloo: the process group was aborted, a peer was lost (collective in flight or launched after)")


def raise_if_aborted() -> None:
    """Before a collective is launched: after an abort, gloo would queue it and never
    run it, so a rank that was behind (still stepping when the abort came) would
    wait until the collective timeout; it fails now instead."""
    if _aborted:
        raise _aborted_error()


_stops_compute = False


def stops_on_abort() -> bool:
    """Whether this process heals in place (``stop_compute_on_abort`` was called)."""
    return _stops_compute


def stop_compute_on_abort() -> None:
    """From now on in this process, after an abort (``abort_process_group``) every
    module's forward and every gradient that flows back through a module's output
    raises the abort's error: a rank still computing the step a peer's loss doomed
    stops at once, instead of at the step's next collective (with one gradient bucket,
    the end of backward: most of a step later). Global module hooks, installed once;
    each costs a flag test. ``Comm``'s blocking gloo calls wait abortably from now on
    too (``stops_on_abort``): one in progress when the abort comes fails."""
    global _stops_compute
    if _stops_compute:
        return
    _stops_compute = True

    def check(grad):
        raise_if_aborted()

    def before(module, args):
        raise_if_aborted()

    def after(module, args, output):
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(check)

    torch.nn.modules.module.register_module_forward_pre_hook(before)
    torch.nn.modules.module.register_module_forward_hook(after)


def _fail_in_flight() -> None:
    global _aborted
    with _in_flight_lock:
        _aborted = True
        pending = list(_in_flight)
        _in_flight.clear()
    for fut in pending:
        fut.set_exception(_aborted_error())


def abort_process_group(*, destroy: bool = True) -> None:
    """Leave a process group that lost a peer, so a new one can be formed in this
    process. Aborted first: that closes its connections even while a module (DDP,
    a strategy kept alive) still holds the group, so a peer still waiting on this
    rank fails at once instead of at its timeout; gloo raises on a closed peer.
    Collectives in flight (``abortable``) fail too: a thread waiting on one (DDP's
    backward) leaves it now, not at the collective timeout."""
    if dist.is_initialized():
        # every group, not only the default one: a strategy's collectives run on its
        # mesh's groups (new_group), and torch lists them only in its private registry
        for group in list(dist.distributed_c10d._world.pg_map):
            group.abort()
        _fail_in_flight()
        if destroy:
            dist.destroy_process_group()


def broadcast_tree(tree, *, src: int, device: torch.device, to: list[int] | None = None):
    """Collective: rank ``src``'s ``tree`` (nested dicts, lists and tuples of tensors and
    small values: a state dict) on every rank (others pass None); with ``to``, only
    ``src`` and those ranks take part, point to point, and the others return None at
    once. The structure and small values go by object; the tensors as one flat buffer
    per dtype, sent as bytes: no pickling of tensor data, which costs more than the
    transfer itself. Received tensors are views of those buffers, on ``device``."""
    from torch.utils._pytree import tree_flatten, tree_unflatten

    me = dist.get_rank()
    here = me == src
    if to is None:
        objects = lambda box: dist.broadcast_object_list(box, src=src)  # noqa: E731
        data = lambda t: dist.broadcast(t, src=src)  # noqa: E731
    elif here:
        objects = lambda box: [dist.send_object_list(box, dst=d) for d in to]  # noqa: E731
        data = lambda t: [dist.send(t, dst=d) for d in to]  # noqa: E731
    elif me in to:
        objects = lambda box: dist.recv_object_list(box, src=src)  # noqa: E731
        data = lambda t: dist.recv(t, src=src)  # noqa: E731
    else:
        return None
    box = [None]
    if here:
        leaves, spec = tree_flatten(tree)
        box = [(spec, [(x.dtype, x.shape) if isinstance(x, torch.Tensor) else None for x in leaves],
                [None if isinstance(x, torch.Tensor) else x for x in leaves])]
    objects(box)
    spec, shapes, values = box[0]
    out = list(values)
    for dtype in dict.fromkeys(s[0] for s in shapes if s is not None):
        idx = [i for i, s in enumerate(shapes) if s is not None and s[0] == dtype]
        if here:
            flat = torch.cat([leaves[i].detach().reshape(-1).to(device) for i in idx])
        else:
            flat = torch.empty(sum(shapes[i][1].numel() for i in idx), dtype=dtype, device=device)
        data(flat.view(torch.uint8))  # bytes: every dtype, bool included, on every backend
        offset = 0
        for i in idx:
            n = shapes[i][1].numel()
            out[i] = flat[offset: offset + n].view(shapes[i][1])
            offset += n
    return tree_unflatten(out, spec)

