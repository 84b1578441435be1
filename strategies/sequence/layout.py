"""Which tokens each rank of a sequence-parallel group holds, and which blocks of
attention each ring step computes. Pure data: no tensors moved, no processes.

A group of ``u x r`` ranks (Ulysses degree u, ring degree r) splits a sequence
of ``seq_len`` tokens. Group rank ``p = i * u + j`` is ulysses rank ``j`` of ring
block ``i``: Ulysses groups are neighbouring ranks (their all-to-alls are the
heaviest traffic, so they belong on the fastest links), ring groups stride by u.

Ring block ``i`` is the part of the sequence ring rank ``i`` holds once its
Ulysses group has gathered the sequence (and scattered the heads):

- ``contiguous``: tokens ``[i N/r, (i+1) N/r)``. With causal attention, block i
  attends to blocks 0..i only, so the last ring rank does r times the work of
  the first.
- ``zigzag``: the sequence cut into 2r chunks; block i is chunks i and 2r-1-i.
  Every ring rank then does the same work at every step (one early chunk, one
  late chunk), which is what makes causal ring attention load-balanced.

Each segment of a ring block is cut into u equal pieces and Ulysses rank j holds
piece j of every segment, so the all-to-all rebuilds the block in order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

LayoutKind = Literal["contiguous", "zigzag"]
Segment = tuple[int, int]  # (first global position, length), in the order held in memory


@dataclass(frozen=True, slots=True)
class Block:
    """One attention call of a ring step: local query rows [q0, q1) against the
    held K/V rows [k0, k1); ``causal``: the two ranges are the same positions
    (a diagonal block, lower-triangular mask), else every key is visible."""

    q0: int
    q1: int
    k0: int
    k1: int
    causal: bool

    def scores(self) -> int:
        """Query-key pairs this block evaluates (the unmasked ones)."""
        n, m = self.q1 - self.q0, self.k1 - self.k0
        return n * (n + 1) // 2 if self.causal else n * m


@dataclass(frozen=True, slots=True)
class SequenceLayout:
    seq_len: int
    ulysses: int = 1
    ring: int = 1
    kind: LayoutKind = "contiguous"

    def __post_init__(self) -> None:
        if self.ulysses < 1 or self.ring < 1:
            raise ValueError(f"ulysses={self.ulysses}, ring={self.ring}: both must be >= 1")
        if self.kind not in ("contiguous", "zigzag"):
            raise ValueError(f"layout={self.kind!r}: must be 'contiguous' or 'zigzag'")
        if self.seq_len % self.divisor:
            raise ValueError(self.divisibility_error())

    @property
    def size(self) -> int:
        return self.ulysses * self.ring

    @property
    def divisor(self) -> int:
        """What seq_len must be a multiple of: u*r, or 2*u*r for zig-zag."""
        return self.size * (2 if self.kind == "zigzag" else 1)

    def divisibility_error(self) -> str:
        two = "2 x " if self.kind == "zigzag" else ""
        return (f"workload.seq_len={self.seq_len}: must be divisible by {two}ulysses({self.ulysses}) x "
                f"ring({self.ring}) = {self.divisor} for layout={self.kind}")

    @property
    def pieces(self) -> int:
        """Segments per ring block: 1 (contiguous) or 2 (zig-zag)."""
        return 2 if self.kind == "zigzag" else 1

    @property
    def local_len(self) -> int:
        """Tokens each rank holds."""
        return self.seq_len // self.size

    def ring_segments(self, i: int) -> list[Segment]:
        """Ring block i as held in memory after the Ulysses gather."""
        if self.kind == "contiguous":
            n = self.seq_len // self.ring
            return [(i * n, n)]
        c = self.seq_len // (2 * self.ring)
        return [(i * c, c), ((2 * self.ring - 1 - i) * c, c)]

    def positions(self, rank: int) -> torch.Tensor:
        """Global positions of the tokens group rank ``rank`` holds, in its memory order."""
        i, j = divmod(rank, self.ulysses)
        parts = []
        for start, length in self.ring_segments(i):
            piece = length // self.ulysses
            parts.append(torch.arange(start + j * piece, start + (j + 1) * piece))
        return torch.cat(parts)

    def ring_plan(self, i: int, *, causal: bool) -> list[list[Block]]:
        """For ring rank i, the blocks to compute at each step t = 0..r-1, when it
        holds the K/V of ring block (i - t) mod r. Fully masked pairs are absent."""
        q = self.ring_segments(i)
        return [block_plan(q, self.ring_segments((i - t) % self.ring), causal=causal) for t in range(self.ring)]


def block_plan(q_segments: list[Segment], k_segments: list[Segment], *, causal: bool) -> list[Block]:
    """The attention calls that evaluate queries at ``q_segments`` against keys at
    ``k_segments`` (each list in memory order). Causal: a key segment wholly after
    a query segment is skipped, one wholly before it is fully visible, the same
    segment is a diagonal block. Segments of our layouts lie on one grid, so a
    partial overlap of two different segments cannot occur and is an error."""
    blocks = []
    qoff = 0
    for qs, qn in q_segments:
        koff = 0
        for ks, kn in k_segments:
            if not causal or ks + kn <= qs:
                blocks.append(Block(qoff, qoff + qn, koff, koff + kn, False))
            elif (ks, kn) == (qs, qn):
                blocks.append(Block(qoff, qoff + qn, koff, koff + kn, True))
            elif ks < qs + qn:
                raise ValueError(f"query segment {(qs, qn)} and key segment {(ks, kn)} overlap partially")
            koff += kn
        qoff += qn
    return _coalesce(blocks)


def _coalesce(blocks: list[Block]) -> list[Block]:
    """Merge full blocks that are adjacent in memory (fewer, larger kernel calls):
    first along keys for one query range, then along queries for one key range."""
    def merge(blocks: list[Block], along_keys: bool) -> list[Block]:
        out: list[Block] = []
        for b in blocks:
            p = out[-1] if out else None
            if p is not None and not p.causal and not b.causal:
                if along_keys and (p.q0, p.q1) == (b.q0, b.q1) and p.k1 == b.k0:
                    out[-1] = Block(p.q0, p.q1, p.k0, b.k1, False)
                    continue
                if not along_keys and (p.k0, p.k1) == (b.k0, b.k1) and p.q1 == b.q0:
                    out[-1] = Block(p.q0, b.q1, p.k0, p.k1, False)
                    continue
            out.append(b)
        return out

    blocks = merge(blocks, along_keys=True)
    return merge(sorted(blocks, key=lambda b: (b.k0, b.q0)), along_keys=False)
