"""resnet-tiny: a small residual conv net with batch norm on generated labelled images."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from workloads.classify import ArraySource, Classification, split_tables
from workloads.registry import register_workload

SIZE = 32


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = nn.Sequential()
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.skip(x))


def _shape_masks(rng: np.random.Generator, label: int) -> np.ndarray:
    """A boolean SIZE x SIZE mask for one image of class ``label``: five shapes
    at a random place and size, five textures at a random period."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    cx, cy = rng.integers(10, 22, size=2)
    r = int(rng.integers(5, 10))
    p = int(rng.integers(2, 5))
    dx, dy = xx - cx, yy - cy
    return [
        dx**2 + dy**2 < r**2,                                           # disk
        (abs(dx) < r) & (abs(dy) < r),                                  # square
        (dy > -r) & (dy < r) & (abs(dx) < (dy + r) / 2),                # triangle
        (dx**2 + dy**2 < r**2) & (dx**2 + dy**2 > (r - 2) ** 2),        # ring
        (abs(dx) < 2) & (abs(dy) < r) | (abs(dy) < 2) & (abs(dx) < r),  # plus
        (yy // p) % 2 == 0,                                             # horizontal stripes
        (xx // p) % 2 == 0,                                             # vertical stripes
        ((xx // p) + (yy // p)) % 2 == 0,                               # checkerboard
        ((xx + yy) // p) % 2 == 0,                                      # diagonal stripes
        (xx % (p + 2) < 2) & (yy % (p + 2) < 2),                        # dots
    ][label]


@register_workload("resnet-tiny")
class ResNetTiny(Classification):
    """Small ResNet with batch norm (compute-heavy per parameter) on generated shape/texture images; reports accuracy."""

    width: int = Field(16, ge=4, description="channels of the first stage (doubled at each later stage)")
    n_samples: int = Field(4096, ge=64, description="images in the generated data set")

    def model_post_init(self, _context) -> None:
        if self.classes > 10:
            raise ValueError(f"classes={self.classes}: the generated images have at most 10 classes")

    def blocks(self) -> list[nn.Module]:
        w = self.width
        stem = nn.Sequential(nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, self.classes))
        return [stem, BasicBlock(w, w, 1), BasicBlock(w, 2 * w, 2), BasicBlock(2 * w, 4 * w, 2), head]

    def generated_tables(self) -> list[pa.Table]:
        """Class-dependent shapes and textures, random colours, Gaussian noise."""
        rng = np.random.default_rng(self.data_seed)
        labels = rng.integers(0, self.classes, self.n_samples)
        images = np.empty((self.n_samples, 3, SIZE, SIZE), dtype=np.uint8)
        for i, label in enumerate(labels):
            fg, bg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
            while np.abs(fg.astype(int) - bg).sum() < 200:  # keep the shape visible
                fg = rng.integers(0, 256, 3)
            mask = _shape_masks(rng, int(label))
            img = np.where(mask[None], fg[:, None, None], bg[:, None, None]).astype(np.float32)
            img += rng.normal(0, 16, img.shape)
            images[i] = np.clip(img, 0, 255)
        pixels = pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1)), 3 * SIZE * SIZE)
        return split_tables({"image": pixels, "label": pa.array(labels, type=pa.int32())})

    def source(self) -> ArraySource:
        return ArraySource(self.data_url(), "image", (3, SIZE, SIZE), scale=1 / 127.5, shift=-1.0,
                           classes=self.classes)
