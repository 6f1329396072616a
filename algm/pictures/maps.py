"""Class palettes, label maps and token maps as pictures: arrays in, RGB arrays out.

* :func:`class_meta`: names and palette of a dataset's classes (nothing read from disk).
* :func:`colorize`, :func:`overlay_rgb`, :func:`save_label_png`: (H, W) class maps;
  :func:`label_rgb` with the ignored pixels apart, :func:`error_mask` /
  :func:`error_map_rgb`: a prediction's wrong pixels against its ground truth.
* :func:`token_map_rgb`: a (gh, gw) token map (token index per patch, -1 where no token
  holds the patch) drawn with every token in its own colour (:func:`distinct_colors`),
  the patch grid and the borders of merged tokens.

Arrays are numpy; tensors are accepted where noted and moved to numpy first.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.colors import hsv_to_rgb
from torch import Tensor

from algm.atomic import write_with

PRUNED_COLOR = (25, 25, 25)  # patches no token holds any more (pruned / exited early)
BORDER_COLOR = (0, 0, 0)  # between patches of different tokens
GRID_COLOR = (255, 255, 255)  # thin patch grid, blended
GRID_ALPHA = 0.35
OVERLAY_ALPHA = 0.5
TOKEN_IMAGE_WEIGHT = 0.25  # share of the (grey) image under a merged token's colour
SINGLE_IMAGE_WEIGHT = 0.72  # ... under a token that holds a single patch
IGNORE_COLOR = (0, 0, 0)  # ground-truth pixels no metric counts
ERROR_COLOR = (255, 0, 40)  # a prediction's wrong pixels
ERROR_IMAGE_WEIGHT = 0.45  # brightness of the grey image under the correct pixels of an error map


def _numpy(a: np.ndarray | Tensor) -> np.ndarray:
    return a.cpu().numpy() if isinstance(a, Tensor) else np.asarray(a)


# ============================================================== classes and colours
def class_meta(dataset: str, n_cls: int) -> tuple[tuple[str, ...], np.ndarray]:
    """Class names and (n_cls, 3) uint8 palette of ``dataset`` (Pascal Context: 60 or 59).

    No data needs to be on disk. A model predicting another number of classes than
    the dataset has is an error (the colours would lie)."""
    from algm.data import classes as d

    table = {
        "camvid": (d.CAMVID_CLASSES, d.CAMVID_PALETTE),
        "ade20k": (d.ADE20K_CLASSES, d.ADE20K_PALETTE),
        "cityscapes": (d.CITYSCAPES_CLASSES, d.CITYSCAPES_PALETTE),
        "pascal": (d.PASCAL_CONTEXT_CLASSES, d.PASCAL_CONTEXT_PALETTE),
        "cocostuff": (d.COCO_STUFF_CLASSES, d.COCO_STUFF_PALETTE),
    }
    if dataset not in table:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of: {', '.join(table)}")
    classes, palette = table[dataset]
    if dataset == "pascal" and n_cls == len(classes) - 1:
        classes, palette = classes[1:], palette[1:]
    if n_cls != len(classes):
        raise ValueError(f"the model predicts {n_cls} classes but {dataset} has {len(classes)}; "
                         f"pass the --dataset the model was trained on")
    return tuple(c.strip() for c in classes), np.asarray(palette, dtype=np.uint8)


def distinct_colors(n: int) -> np.ndarray:
    """(n, 3) uint8 colours, pairwise different, consecutive ones far apart in hue
    (golden-ratio hue steps, cycling saturation and brightness; never dark)."""
    i = np.arange(n)
    hue = (i * 0.6180339887498949) % 1.0
    sat = np.array([0.85, 0.55, 0.70])[i % 3]
    val = np.array([1.0, 0.82, 0.92, 0.74])[(i // 3) % 4]
    rgb = np.round(hsv_to_rgb(np.stack([hue, sat, val], -1)) * 255).astype(np.int64)
    taken: set[tuple[int, int, int]] = set()
    for k in range(n):  # nudge the rare rounding collisions apart
        c = tuple(int(v) for v in rgb[k])
        step = 0
        while c in taken or c == PRUNED_COLOR:
            step += 1
            c = (c[0], c[1], (c[2] + step * 37) % 256) if step % 2 else ((c[0] + step) % 256, c[1], c[2])
        taken.add(c)
        rgb[k] = c
    return rgb.astype(np.uint8)


def colorize(labels: np.ndarray | Tensor, palette: np.ndarray) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8 colours."""
    return np.asarray(palette, dtype=np.uint8)[_numpy(labels)]


def label_rgb(labels: np.ndarray | Tensor, palette: np.ndarray, ignore_index: int) -> np.ndarray:
    """(H, W) ground truth -> (H, W, 3) uint8 class colours, :data:`IGNORE_COLOR` where
    the label is ``ignore_index`` (which may lie past the palette)."""
    labels = _numpy(labels)
    ignored = labels == ignore_index
    rgb = colorize(np.where(ignored, 0, labels), palette)
    rgb[ignored] = IGNORE_COLOR
    return rgb


def error_mask(pred: np.ndarray | Tensor, labels: np.ndarray | Tensor, ignore_index: int) -> np.ndarray:
    """(H, W) bool: the pixels ``pred`` (H, W) gets wrong, the ignored ones excluded."""
    pred, labels = _numpy(pred), _numpy(labels)
    if pred.shape != labels.shape:
        raise ValueError(f"prediction is {pred.shape}, ground truth {labels.shape}")
    return (pred != labels) & (labels != ignore_index)


def error_map_rgb(image: np.ndarray, pred: np.ndarray | Tensor, labels: np.ndarray | Tensor,
                  ignore_index: int) -> np.ndarray:
    """(H, W, 3) uint8: the (H, W, 3) uint8 image in dim grey, :data:`ERROR_COLOR` on the
    pixels ``pred`` gets wrong (:func:`error_mask`), :data:`IGNORE_COLOR` where the ground
    truth is ignored."""
    grey = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    rgb = np.repeat(np.round(ERROR_IMAGE_WEIGHT * grey)[..., None], 3, -1).astype(np.uint8)
    rgb[_numpy(labels) == ignore_index] = IGNORE_COLOR
    rgb[error_mask(pred, labels, ignore_index)] = ERROR_COLOR
    return rgb


def save_label_png(labels: np.ndarray | Tensor, palette: np.ndarray, path: str | Path) -> Path:
    """A palette ("P" mode) PNG of (H, W) class indices: shows the colours, reads back
    as class indices. Written atomically."""
    from PIL import Image

    labels = _numpy(labels)
    if labels.max(initial=0) > 255:
        raise ValueError("a palette PNG holds at most 256 classes")
    im = Image.fromarray(labels.astype(np.uint8), mode="P")
    flat = np.zeros((256, 3), dtype=np.uint8)
    flat[: len(palette)] = palette
    im.putpalette(flat.reshape(-1).tolist())
    return write_with(path, lambda tmp: im.save(tmp, format="PNG"))


def overlay_rgb(image: np.ndarray, labels: np.ndarray, palette: np.ndarray,
                alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """(H, W) class colours blended over the (H, W, 3) uint8 image."""
    colours = colorize(labels, palette).astype(np.float32)
    return np.round((1 - alpha) * image.astype(np.float32) + alpha * colours).astype(np.uint8)


# ========================================================================= token maps
def compact_ids(source: np.ndarray) -> tuple[np.ndarray, int]:
    """Renumber token indices 0..K-1 in order of first appearance (raster order), so
    colours are stable and neighbours get consecutive (far apart) colours; -1 stays."""
    source = np.asarray(source)
    flat = source.reshape(-1)
    alive = flat >= 0
    uniq, first = np.unique(flat[alive], return_index=True)
    order = uniq[np.argsort(first)]
    lut = {int(t): k for k, t in enumerate(order)}
    out = np.full(flat.shape, -1, dtype=np.int64)
    out[alive] = [lut[int(t)] for t in flat[alive]]
    return out.reshape(source.shape), len(order)


def _pixel_patches(length: int, cells: int) -> np.ndarray:
    """Patch index of every pixel row/column when ``cells`` patches span ``length`` pixels."""
    return np.minimum(((np.arange(length) + 0.5) * cells / length).astype(np.int64), cells - 1)


def token_map_rgb(source: np.ndarray | Tensor, size: tuple[int, int] | None = None,
                  image: np.ndarray | None = None, image_weight: float = TOKEN_IMAGE_WEIGHT,
                  single_weight: float = SINGLE_IMAGE_WEIGHT, grid: bool = True,
                  borders: bool = True) -> np.ndarray:
    """(gh, gw) token index per patch -> (H, W, 3) uint8 picture.

    Every token gets its own colour (:func:`distinct_colors`); patches no token holds
    (-1) are near-black. With ``image`` (H, W, 3) its grey version shows through: with
    ``image_weight`` under tokens that hold several patches, with ``single_weight``
    under tokens of one patch (so merged groups stand out as solid areas and the scene
    stays readable where nothing merged). ``grid`` draws the patch grid (thin, light),
    ``borders`` a dark line between patches of different tokens where one of them is
    merged or pruned (a single-patch token is outlined by the grid alone, so ``none``
    shows the plain patch grid). ``size`` defaults to the image's, else 16 pixels per
    patch.
    """
    ids, k = compact_ids(_numpy(source))
    gh, gw = ids.shape
    if size is None:
        size = image.shape[:2] if image is not None else (gh * 16, gw * 16)
    h, w = size
    py, px = _pixel_patches(h, gh), _pixel_patches(w, gw)
    pix = ids[py][:, px]
    colours = np.concatenate([distinct_colors(k), np.asarray([PRUNED_COLOR], np.uint8)])
    rgb = colours[pix].astype(np.float32)  # -1 indexes the last row: PRUNED_COLOR
    merged = np.concatenate([np.bincount(ids[ids >= 0], minlength=k) > 1, [True]])  # per id, -1 last
    if image is not None:
        if image.shape[:2] != (h, w):
            raise ValueError(f"image is {image.shape[:2]}, token map {size}")
        grey = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        weight = np.where(merged, image_weight, single_weight).astype(np.float32)[pix][..., None]
        rgb = (1 - weight) * rgb + weight * grey[..., None]
    if grid:
        cols = np.flatnonzero(px[1:] != px[:-1]) + 1
        rows = np.flatnonzero(py[1:] != py[:-1]) + 1
        g = np.asarray(GRID_COLOR, np.float32)
        rgb[:, cols] = (1 - GRID_ALPHA) * rgb[:, cols] + GRID_ALPHA * g
        rgb[rows, :] = (1 - GRID_ALPHA) * rgb[rows, :] + GRID_ALPHA * g
    if borders:
        rgb[_token_borders(pix, merged[pix])] = BORDER_COLOR
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def _token_borders(pix: np.ndarray, merged: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels beside a pixel of another token, where one of the two tokens
    is merged (or pruned); ``pix`` token id per pixel, ``merged`` per pixel."""
    edge = np.zeros(pix.shape, dtype=bool)
    dx = (pix[:, 1:] != pix[:, :-1]) & (merged[:, 1:] | merged[:, :-1])
    dy = (pix[1:, :] != pix[:-1, :]) & (merged[1:, :] | merged[:-1, :])
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    edge[1:, :] |= dy
    edge[:-1, :] |= dy
    return edge
