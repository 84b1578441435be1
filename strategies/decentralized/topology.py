"""Gossip topologies as data: doubly stochastic mixing matrices and each rank's part.

A round of gossip replaces rank i's vector by ``sum_j W[i, j] x_j``. Every W
here is doubly stochastic (rows and columns sum to 1), so a round preserves the
ranks' average. Topologies:

- ``ring``: i with i - 1 and i + 1, weight 1/3 each (1/2 with 2 ranks).
- ``torus``: a rows x cols grid with wrap-around (the most square factorisation
  with rows, cols >= 2); i with its distinct up/down/left/right neighbours,
  uniform weights 1/(degree + 1).
- ``one-peer-exp``: log2(n) rounds, used in turn; round i pairs rank j with
  j + 2^i (for j whose bit i is 0, i.e. j XOR 2^i), each keeping half of its
  own vector and taking half of its peer's. The product of the log2(n) rounds
  is exactly J/n: exact consensus after log2(n) rounds, and since both peers
  compute the same commutative sum, bit-identical vectors on every rank.
- ``complete``: W = J/n (every rank gets the average; done with one all-reduce).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

TOPOLOGIES = ("ring", "torus", "one-peer-exp", "complete")


def torus_shape(n: int) -> tuple[int, int] | None:
    """(rows, cols), rows <= cols, both >= 2, as square as possible; None if n has no such factorisation."""
    for rows in range(math.isqrt(n), 1, -1):
        if n % rows == 0:
            return rows, n // rows
    return None


def topology_error(topology: str, n: int) -> str | None:
    """Why ``topology`` cannot connect ``n`` ranks, or None if it can."""
    if topology not in TOPOLOGIES:
        return f"topology={topology!r}: unknown (allowed: {', '.join(TOPOLOGIES)})"
    if topology == "one-peer-exp" and n & (n - 1):
        return (f"workers={n}: topology 'one-peer-exp' needs a power-of-two number of workers "
                f"(exact consensus after log2(n) rounds)")
    if topology == "torus" and torus_shape(n) is None:
        return (f"workers={n}: topology 'torus' needs workers = rows x cols with rows, cols >= 2 "
                f"(4, 6, 8, 9, ...)")
    return None


def num_rounds(topology: str, n: int) -> int:
    """Distinct mixing matrices used in turn, one per step."""
    return max(1, int(math.log2(n))) if topology == "one-peer-exp" else 1


def _uniform(neighbours: list[set[int]]) -> torch.Tensor:
    """Self plus neighbours, uniform weights; doubly stochastic for a regular symmetric graph."""
    n = len(neighbours)
    w = torch.zeros(n, n, dtype=torch.float64)
    for i, peers in enumerate(neighbours):
        for j in {i, *peers}:
            w[i, j] = 1.0 / (len(peers) + 1)
    return w


def mixing_matrix(topology: str, n: int, round: int = 0) -> torch.Tensor:
    """W (n x n, float64) of the given round."""
    why = topology_error(topology, n)
    if why:
        raise ValueError(why)
    if topology == "complete":
        return torch.full((n, n), 1.0 / n, dtype=torch.float64)
    if topology == "ring":
        return _uniform([{(i - 1) % n, (i + 1) % n} - {i} for i in range(n)])
    if topology == "torus":
        rows, cols = torus_shape(n)
        at = lambda r, c: (r % rows) * cols + (c % cols)  # noqa: E731
        return _uniform([{at(r + 1, c), at(r - 1, c), at(r, c + 1), at(r, c - 1)} - {at(r, c)}
                         for r in range(rows) for c in range(cols)])
    # one-peer-exp
    w = torch.zeros(n, n, dtype=torch.float64)
    if n == 1:
        return w + 1.0
    bit = 1 << (round % num_rounds(topology, n))
    for j in range(n):
        w[j, j] = w[j, j ^ bit] = 0.5
    return w


@dataclass(frozen=True)
class RankRound:
    """One rank's part in one round: its own weight, whom it sends its vector to,
    whom it receives from with what weight."""

    self_weight: float
    send_to: tuple[int, ...]
    recv_from: tuple[tuple[int, float], ...]


def rank_round(w: torch.Tensor, rank: int) -> RankRound:
    n = w.shape[0]
    return RankRound(
        self_weight=float(w[rank, rank]),
        send_to=tuple(j for j in range(n) if j != rank and w[j, rank] > 0),
        recv_from=tuple((j, float(w[rank, j])) for j in range(n) if j != rank and w[rank, j] > 0),
    )
