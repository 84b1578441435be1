"""A strategy's state in torch.distributed.checkpoint (DCP) files: the one writer and reader.

DCP writes each rank's shards plus one metadata file, and loads them into any
sharding (ddp or fsdp, any world size), which is what makes resharding on load
work. Local folders use DCP's FileSystemWriter; other fsspec URLs its FsspecWriter.
"""
from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from cluster import nbytes
from workloads import Workload


def _dcp():
    """torch's DCP, imported on first use: it pulls in DTensor (about 1 s of import
    in every worker process), which a run that never checkpoints does not need."""
    import torch.distributed.checkpoint as dcp

    return dcp


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _writer(url: str):
    if is_local(url):
        return _dcp().FileSystemWriter(url.removeprefix("file://"))
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    return FsspecWriter(url)


def _reader(url: str):
    if is_local(url):
        return _dcp().FileSystemReader(url.removeprefix("file://"))
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    return FsspecReader(url)


def read_metadata(url: str):
    """DCP's metadata of the checkpoint folder ``url`` (reads no tensors). It is a
    pickle: the driver verifies it against the checkpoint's manifest first."""
    return _reader(url).read_metadata()


def full_param_groups(workload: Workload, weight_decay: float) -> list[list[str]]:
    """Names of the whole model's parameters in each optimizer group, in the order
    ``build_optimizer`` puts them: what a single-process checkpoint records."""
    from strategies.optim import param_groups  # optim imports this module's neighbours; keep the graph acyclic

    with torch.random.fork_rng(), torch.device("meta"):
        model = workload.model()
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in param_groups(model, weight_decay)]


def _named(groups: list[dict], names: list[list[str]]) -> list[dict]:
    return [{**{k: v for k, v in g.items() if k != "params"}, "params": list(n)} for g, n in zip(groups, names)]


def save_state(url: str, model: nn.Module, optim: torch.optim.Optimizer, extra: dict[str, Any], *,
               groups: list[list[str]] | None = None) -> None:
    """Collective: model and optimizer state (sharded as they are held) and small
    ``extra`` values (e.g. the LR schedule) under the folder ``url``.

    Keys are the single-process ones whatever a rank holds: a pipeline stage's
    blocks keep their whole-model names, so any cut, sharding or world size (or
    single, ddp, fsdp) can load the checkpoint. A rank holding part of the model
    passes ``groups`` (``full_param_groups``): every rank then writes the whole
    model's optimizer groups (identical everywhere), as one process would."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optim)
    if groups is not None:
        optim_sd = {"state": optim_sd["state"], "param_groups": _named(optim_sd["param_groups"], groups)}
    _dcp().save({"model": model_sd, "optim": optim_sd, "extra": extra}, storage_writer=_writer(url))


def load_state(url: str, model: nn.Module, optim: torch.optim.Optimizer, extra: dict[str, Any], *,
               groups: list[list[str]] | None = None) -> dict[str, Any]:
    """Collective: load into the current sharding, whatever sharding wrote it.
    ``extra`` gives the keys and types to read; returns the values read. With
    ``groups``, the groups' hyperparameters are read and this rank's own
    parameter lists kept."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optim)
    mine = optim_sd["param_groups"]
    if groups is not None:
        optim_sd = {"state": optim_sd["state"], "param_groups": _named(mine, groups)}
    state = {"model": model_sd, "optim": optim_sd, "extra": extra}
    _dcp().load(state, storage_reader=_reader(url))
    loaded = state["optim"]
    if groups is not None:
        loaded = {"state": loaded["state"], "param_groups": [
            {**{k: v for k, v in g.items() if k != "params"}, "params": m["params"]}
            for g, m in zip(loaded["param_groups"], mine)]}
    set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=loaded,
                   options=StateDictOptions(strict=True))
    return state["extra"]


def _local_bytes(t: torch.Tensor) -> int:
    return nbytes(t.to_local() if hasattr(t, "to_local") else t)  # DTensor (FSDP2): only this rank's shard is held


def held_bytes(model: nn.Module, optim: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state this rank holds."""
    params = list(model.parameters())
    return {
        "param_bytes": sum(_local_bytes(p) for p in params),
        "grad_bytes": sum(_local_bytes(p.grad) for p in params if p.grad is not None),
        "optim_bytes": sum(
            _local_bytes(v) for s in optim.state.values() for v in s.values() if isinstance(v, torch.Tensor)
        ),
    }


# -- strategies whose ranks hold different state (demo's momentum, gossip's replicas) --------
# Each rank writes its own entries under ``rank{r}.``; entries every rank holds
# identically go under ``shared.`` and DCP writes them once. Loading into a
# different world size gives rank r the entries of saved rank ``r % saved_world``.

_RANK_KEY = re.compile(r"^rank(\d+)\.")


def save_per_rank(url: str, *, rank: int, shared: dict[str, Any], own: dict[str, Any]) -> None:
    """Collective: ``shared`` (identical on every rank) once, ``own`` for this rank."""
    _dcp().save({"shared": shared, f"rank{rank}": own}, storage_writer=_writer(url))


def saved_world(url: str) -> int:
    """How many ranks wrote the checkpoint (from DCP's metadata; reads no tensors)."""
    keys = read_metadata(url).state_dict_metadata
    ranks = {int(m.group(1)) for k in keys if (m := _RANK_KEY.match(k))}
    if not ranks:
        raise ValueError(f"{url}: no per-rank entries (not written by a decentralized strategy)")
    return max(ranks) + 1


def load_per_rank(url: str, *, rank: int, shared: dict[str, Any], own: dict[str, Any]) -> tuple[dict, dict, int]:
    """Collective: fill ``shared`` and ``own`` (tensors in place; other values are
    returned) from the checkpoint. Returns (shared, own, the saved rank read)."""
    src = rank % saved_world(url)
    state = {"shared": shared, f"rank{src}": own}
    _dcp().load(state, storage_reader=_reader(url))
    return state["shared"], state[f"rank{src}"], src
