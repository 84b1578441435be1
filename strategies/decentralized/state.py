"""Checkpoints of strategies whose ranks hold different state (DCP files).

Each rank writes its own entries under ``rank{r}.``; entries every rank holds
identically go under ``shared.`` and DCP writes them once. Loading into a
different world size gives rank r the entries of saved rank ``r % saved_world``.
"""
from __future__ import annotations

import re
from typing import Any

import torch.distributed.checkpoint as dcp

from strategies.checkpoint import _reader, _writer, read_metadata

_RANK_KEY = re.compile(r"^rank(\d+)\.")


def save_per_rank(url: str, *, rank: int, shared: dict[str, Any], own: dict[str, Any]) -> None:
    """Collective: ``shared`` (identical on every rank) once, ``own`` for this rank."""
    dcp.save({"shared": shared, f"rank{rank}": own}, storage_writer=_writer(url))


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
    dcp.load(state, storage_reader=_reader(url))
    return state["shared"], state[f"rank{src}"], src
