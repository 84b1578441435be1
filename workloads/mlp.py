"""mlp-wide: many parameters, little compute per sample: the communication-bound case."""
from __future__ import annotations

from typing import ClassVar

import numpy as np
import pyarrow as pa
from pydantic import Field
from torch import nn

from workloads.classify import ArraySource, Classification, split_tables
from workloads.registry import register_workload


@register_workload("mlp-wide")
class MlpWide(Classification):
    """Wide MLP classifier (communication-bound: ~9 M parameters, little compute) on teacher-labelled features."""

    in_dim: int = Field(256, ge=1, description="input features")
    hidden: int = Field(2048, ge=1, description="width of every hidden layer")
    layers: int = Field(3, ge=1, description="hidden layers")

    data_fields: ClassVar[tuple[str, ...]] = ("in_dim", "classes", "n_samples", "data_seed")

    def blocks(self) -> list[nn.Module]:
        dims = [self.in_dim] + [self.hidden] * self.layers
        blocks = [nn.Sequential(nn.Linear(a, b), nn.ReLU()) for a, b in zip(dims, dims[1:])]
        return blocks + [nn.Linear(self.hidden, self.classes)]

    def generated_tables(self) -> list[pa.Table]:
        """Gaussian features labelled by a small random teacher network (tanh
        features, then argmax), so the labels are a learnable function of x."""
        rng = np.random.default_rng(self.data_seed)
        x = rng.standard_normal((self.n_samples, self.in_dim), dtype=np.float32)
        w1 = rng.standard_normal((self.in_dim, 32)) / np.sqrt(self.in_dim)
        w2 = rng.standard_normal((32, self.classes))
        label = np.argmax(np.tanh(x @ w1 * 2) @ w2, axis=1)
        feats = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), self.in_dim)
        return split_tables({"features": feats, "label": pa.array(label, type=pa.int32())})

    def source(self) -> ArraySource:
        return ArraySource(self.data_url(), "features", (self.in_dim,), classes=self.classes)
