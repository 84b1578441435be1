"""A mesh of named axes over the ranks: which ranks form each parallelism's group.

The axes, outermost first, are ``dp`` (data-parallel replicas, and the outer
low-bandwidth sync), ``pp`` (pipeline stages), ``fsdp`` (parameter shards) and
``sp`` (sequence shards). Ranks are numbered row-major over them, so the inner
axes hold adjacent ranks: the ranks of one node when a node's workers are
contiguous, as Ray's PACK placement and the network scenarios' ``per_node`` make
them. That puts the chattiest traffic (sp's all-to-all per layer, fsdp's
per-block gathers) on the fast links and leaves dp for the slow ones, the order
torchtitan's mesh uses for the same reason.

``Layout`` is pure arithmetic (testable without processes); ``Mesh`` makes one
sub-group ``Comm`` per axis from the one accounted ``Comm``, so every byte of
every axis is charged to the rank's single ledger.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from cluster.comm import Comm

AXES = ("dp", "pp", "fsdp", "sp")  # outermost (across nodes) to innermost (adjacent ranks)


@dataclass(frozen=True, kw_only=True, slots=True)
class Layout:
    """Degrees of each axis; their product is the world size."""

    dp: int = 1
    pp: int = 1
    fsdp: int = 1
    sp: int = 1

    def __post_init__(self) -> None:
        for axis in AXES:
            size = getattr(self, axis)
            if not isinstance(size, int) or size < 1:
                raise ValueError(f"mesh.{axis}={size!r}: must be an integer >= 1")

    @classmethod
    def for_world(cls, world: int, **degrees: int | None) -> "Layout":
        """The layout of ``world`` ranks with the given degrees; ``dp`` not given is
        what the others leave (world / their product)."""
        unknown = set(degrees) - set(AXES)
        if unknown:
            raise ValueError(f"mesh axis {sorted(unknown)[0]!r}: unknown; axes are {', '.join(AXES)}")
        given = {a: d for a, d in degrees.items() if d is not None}
        cls(**given)  # each degree an integer >= 1, before any arithmetic on them
        if "dp" not in given:
            rest = math.prod(given.values())
            if world % rest:
                raise ValueError(f"mesh: {_product(given)} = {rest} must divide workers={world}")
            given["dp"] = world // rest
        layout = cls(**given)
        if layout.world != world:
            raise ValueError(f"mesh: {_product(layout.sizes)} = {layout.world} != workers={world}")
        return layout

    @property
    def sizes(self) -> dict[str, int]:
        return {axis: getattr(self, axis) for axis in AXES}

    @property
    def world(self) -> int:
        return math.prod(self.sizes.values())

    def coords(self, rank: int) -> dict[str, int]:
        """This rank's index along each axis (row-major: sp varies fastest)."""
        if not 0 <= rank < self.world:
            raise ValueError(f"rank={rank}: must lie in [0, {self.world})")
        out = {}
        for axis in reversed(AXES):
            rank, out[axis] = divmod(rank, getattr(self, axis))
        return {axis: out[axis] for axis in AXES}

    def rank_of(self, coords: dict[str, int]) -> int:
        rank = 0
        for axis in AXES:
            rank = rank * getattr(self, axis) + coords.get(axis, 0)
        return rank

    def groups(self, *axes: str) -> list[list[int]]:
        """The partition of the ranks into groups that differ only along ``axes``
        (one group per combination of the other axes), each in rank order."""
        for axis in axes:
            if axis not in AXES:
                raise ValueError(f"mesh axis {axis!r}: unknown; axes are {', '.join(AXES)}")
        found: dict[tuple, list[int]] = {}
        for rank in range(self.world):
            c = self.coords(rank)
            found.setdefault(tuple(c[a] for a in AXES if a not in axes), []).append(rank)
        return list(found.values())

    def index(self, rank: int, *axes: str) -> int:
        """``rank``'s place in its group over ``axes`` (row-major over them)."""
        c = self.coords(rank)
        i = 0
        for axis in AXES:
            if axis in axes:
                i = i * getattr(self, axis) + c[axis]
        return i

    def __str__(self) -> str:
        return " x ".join(f"{a}={s}" for a, s in self.sizes.items() if s > 1) or "single rank"


def nodes_from_per_node(world: int, per_node: int) -> tuple[int, ...]:
    """Node index of each rank when every node holds ``per_node`` contiguous ranks."""
    if per_node < 1:
        raise ValueError(f"per_node={per_node}: must be >= 1")
    return tuple(rank // per_node for rank in range(world))


def crossing(layout: Layout, nodes: Sequence[int], *axes: str) -> bool:
    """Whether any group over ``axes`` spans more than one node (uses inter-node links)."""
    return any(len({nodes[r] for r in g}) > 1 for g in layout.groups(*axes))


@dataclass(eq=False)
class Mesh:
    """A layout made real on this rank: one sub-group Comm per axis (and per set of
    axes asked for), every one charged to ``comm``'s ledger. Building it and asking
    for a new set of axes are collective: every rank makes the same calls in the
    same order."""

    comm: Comm  # its ``nodes`` (``Comm.set_nodes``) say which ranks share a node
    layout: Layout
    _groups: dict[tuple[str, ...], Comm] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.layout.world != self.comm.world:
            raise ValueError(f"mesh: {_product(self.layout.sizes)} = {self.layout.world} != workers={self.comm.world}")
        for axis in AXES:
            self.group(axis)

    @property
    def rank(self) -> int:
        return self.comm.rank

    def coord(self, axis: str) -> int:
        return self.layout.coords(self.comm.rank)[axis]

    def size(self, *axes: str) -> int:
        return math.prod(getattr(self.layout, a) for a in axes)

    def group(self, *axes: str) -> Comm:
        """The Comm of this rank's group over ``axes`` (canonical order, so
        ``group("fsdp", "dp")`` is ``group("dp", "fsdp")``)."""
        key = tuple(a for a in AXES if a in axes)
        if len(key) != len(set(axes)):
            self.layout.groups(*axes)  # raises, naming the unknown axis
        if key not in self._groups:
            self._groups[key] = self.comm.split(self.layout.groups(*key))
        return self._groups[key]

    def inter_node(self, *axes: str) -> bool:
        """Whether the groups over ``axes`` cross nodes (their traffic is inter-node)."""
        return bool(self.comm.nodes) and crossing(self.layout, self.comm.nodes, *axes)


def _product(sizes: dict[str, int]) -> str:
    return " * ".join(f"{a}({s})" for a, s in sizes.items() if s > 1) or "1"


def per_node_of(nodes: Sequence[int]) -> int | None:
    """Ranks per node when every node holds the same number of contiguous ranks
    (as PACK placement and the scenarios' ``per_node`` make them); None when the
    nodes are unknown or uneven."""
    if not nodes:
        return None
    k = list(nodes).count(nodes[0])
    return k if len(nodes) % k == 0 and tuple(nodes) == tuple(
        sorted(set(nodes), key=list(nodes).index)[r // k] for r in range(len(nodes))) else None
