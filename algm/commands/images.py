"""Window-sized model inputs from a dataset split, for GFLOPs and throughput."""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

from algm.build import Setup
from algm.data.datasets import build_dataset
from algm.data.transforms import preprocess


def center_window(image: Tensor, window: tuple[int, int]) -> Tensor:
    """(1, 3, H, W) at test scale -> the centred (1, 3, h, w) window (padded if smaller)."""
    h, w = window
    _, _, H, W = image.shape
    if H < h or W < w:
        image = torch.nn.functional.pad(image, (0, max(w - W, 0), 0, max(h - H, 0)))
        _, _, H, W = image.shape
    top, left = (H - h) // 2, (W - w) // 2
    return image[:, :, top:top + h, left:left + w]


def window_images(setup: Setup, split: str, limit: int, root: str | None = None) -> Iterator[Tensor]:
    """The first ``limit`` images of the split, each (1, 3, h, w) normalised, one window."""
    dataset = build_dataset(setup.dataset.name, split, root=root, limit=limit)
    short = min(setup.window)
    for i in range(len(dataset)):
        image = preprocess(dataset[i].image, short, setup.backbone.mean, setup.backbone.std)
        yield center_window(image, setup.window)


def model_batch(setup: Setup, split: str, batch_size: int, kind: str,
                root: str | None = None) -> tuple[Tensor, str]:
    """A (B, 3, h, w) batch of real frames: ``mixed`` = B distinct frames,
    ``repeated`` = the first frame B times. Also says where the frames came from."""
    n = 1 if kind == "repeated" else batch_size
    frames = list(window_images(setup, split, n, root))
    if len(frames) < n:
        raise ValueError(f"the {split} split has only {len(frames)} images, need {n} for a mixed batch")
    batch = torch.cat(frames * batch_size if kind == "repeated" else frames)
    return batch, f"{setup.dataset.name}/{split}"
