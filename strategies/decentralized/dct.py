"""Chunked orthonormal DCT-II of a tensor and the sparse top-k form DeMo sends.

A parameter is viewed as a matrix (R, C): 1-D tensors as (1, N), higher ones as
(shape[0], rest). Each dimension is cut into blocks of the largest divisor of
its size that is at most ``chunk``, so a (256, 768) weight with chunk 64 is
4 x 12 blocks of 64 x 64, and a (768,) bias 12 blocks of 1 x 64. Each block
gets a separable 2-D DCT-II with the orthonormal basis (scipy's
``norm="ortho"``), so decode(encode(x)) == x and the transform preserves norms.
A sparse form keeps, per block, ``k`` (index, value) pairs, the index into the
block's flattened coefficients in the smallest integer type that holds it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


def dct_matrix(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Orthonormal DCT-II basis D (n x n): coefficients = D @ x, x = D.T @ coefficients."""
    i = torch.arange(n, dtype=torch.float64)
    d = torch.cos(math.pi * (2 * i[None, :] + 1) * i[:, None] / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.to(dtype)


def largest_divisor_at_most(n: int, cap: int) -> int:
    """The block size along a dimension of size ``n``: its largest divisor <= cap."""
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def index_dtype(width: int) -> torch.dtype:
    """Smallest integer type holding indices 0..width-1."""
    if width <= 2**8:
        return torch.uint8
    if width <= 2**15:
        return torch.int16
    return torch.int32


def as_matrix_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    return shape[0], math.prod(shape[1:])


@dataclass
class ChunkedDCT:
    """The transform and sparse layout of one parameter shape."""

    shape: tuple[int, ...]
    chunk: int
    topk: int
    rows: int = field(init=False)  # R, C: the parameter as a matrix
    cols: int = field(init=False)
    r: int = field(init=False)  # block shape
    c: int = field(init=False)
    k: int = field(init=False)  # coefficients kept per block: min(topk, r * c), as the reference clamps it

    def __post_init__(self) -> None:
        self.rows, self.cols = as_matrix_shape(self.shape)
        self.r = largest_divisor_at_most(self.rows, self.chunk)
        self.c = largest_divisor_at_most(self.cols, self.chunk)
        self.k = min(self.topk, self.r * self.c)
        self._basis: dict[tuple, torch.Tensor] = {}

    @property
    def blocks(self) -> int:
        return (self.rows // self.r) * (self.cols // self.c)

    @property
    def width(self) -> int:
        """Coefficients per block."""
        return self.r * self.c

    @property
    def index_dtype(self) -> torch.dtype:
        return index_dtype(self.width)

    def _d(self, n: int, like: torch.Tensor) -> torch.Tensor:
        key = (n, like.dtype, like.device)
        if key not in self._basis:
            self._basis[key] = dct_matrix(n, like.dtype).to(like.device)
        return self._basis[key]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x (self.shape) -> coefficients (blocks, r * c)."""
        rb, cb = self.rows // self.r, self.cols // self.c
        b = x.reshape(rb, self.r, cb, self.c).transpose(1, 2)  # (rb, cb, r, c)
        coeffs = self._d(self.r, x) @ b @ self._d(self.c, x).T
        return coeffs.reshape(self.blocks, self.width)

    def decode(self, coeffs: torch.Tensor) -> torch.Tensor:
        """coefficients (blocks, r * c) -> x (self.shape)."""
        rb, cb = self.rows // self.r, self.cols // self.c
        b = coeffs.reshape(rb, cb, self.r, self.c)
        x = self._d(self.r, coeffs).T @ b @ self._d(self.c, coeffs)
        return x.transpose(1, 2).reshape(self.shape)

    def topk_of(self, coeffs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The k largest-magnitude coefficients of every block: (indices, values), each (blocks, k)."""
        idx = coeffs.abs().topk(self.k, dim=1, sorted=False).indices
        return idx, coeffs.gather(1, idx)

    def densify(self, idx: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
        """One rank's sparse coefficients (blocks, k) as dense (blocks, r * c)."""
        return torch.zeros(self.blocks, self.width, dtype=val.dtype, device=val.device).scatter_(1, idx, val)

    def mean_of(self, idx: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
        """Every rank's sparse coefficients (world, blocks, k) averaged per index over
        the ranks that sent it (an index no rank sent stays 0): (blocks, r * c).

        Ranks are accumulated one at a time in rank order; a rank's indices within
        a block are distinct, so no element is written twice by one scatter and the
        result is deterministic on any device, hence the same on every rank."""
        sums = torch.zeros(self.blocks, self.width, dtype=val.dtype, device=val.device)
        counts = torch.zeros_like(sums)
        ones = torch.ones_like(val[0])
        for i, v in zip(idx, val):
            sums.scatter_add_(1, i, v)
            counts.scatter_add_(1, i, ones)
        return sums / counts.clamp_min(1)

    def payload_bytes(self, value_dtype: torch.dtype) -> int:
        """Bytes of this parameter's sparse form: blocks * k * (index bytes + value bytes)."""
        return self.blocks * self.k * (self.index_dtype.itemsize + value_dtype.itemsize)
