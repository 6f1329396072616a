"""Image -> model windows: the one geometry every path uses (SPEC sections 4 and 9).

1. **Test scale.** The image is resized so its short side equals the window's short
   side, keeping the aspect ratio (bilinear, no antialiasing, as Segmenter and mmseg's
   cv2 resize), then normalised with the encoder's mean / std: :func:`to_test_scale`.
   CamVid 480 x 360 with a 448 x 336 window -> exactly 448 x 336.
2. **Padding.** A side shorter than the window is zero-padded at the bottom / right
   (zero = the mean colour after normalisation; labels get the ignore index).
3. **Windows.** Window origins follow mmseg's sliding rule (:func:`window_starts`):
   every ``stride`` pixels, the last one flush with the image. Evaluation slides with
   stride = window - 32 (:func:`default_stride`); training (decoder heads, a
   method's trained parts) tiles with stride = window, i.e. the fewest windows that cover
   the image (:func:`tiles`); single-window consumers (GFLOPs, throughput, pictures)
   take the centre window (:func:`center_window`), which is the only tile wherever
   one window covers the image.
4. **Training views** for fine-tuning (SPEC section 9, mmseg's pipeline without the
   photometric distortion): :func:`random_view` rescales the test-scale image by a
   random ratio in 0.5-2.0, takes a random window-sized crop (padding where the image is
   smaller) and flips it with probability 0.5.

:func:`split_windows` and :func:`frames_batch` apply the centre window to the images of a
dataset split; :func:`mixed_groups` is the fixed seeded grouping of a split into mixed
batches (batched suite rows measure on it). Shapes: images (3, H, W) uint8 as read;
model inputs (1, 3, h, w) float; labels (H, W).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from algm.config import check_memory
from algm.data.datasets import build_dataset

BATCH_KINDS = ("mixed", "repeated")
DEFAULT_OVERLAP = 32  # default evaluation stride = window - 32 pixels (SPEC section 4)

Window = tuple[int, int]


def scaled_size(size: Window, short_side: int) -> Window:
    """(H, W) scaled so that min(H, W) == ``short_side``, rounded half up (as mmcv)."""
    h, w = size
    scale = short_side / min(h, w)
    return (int(h * scale + 0.5), int(w * scale + 0.5))


def normalise(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(B, 3, H, W) on the 0..1 scale -> normalised with ``mean`` / ``std`` (0..1 scale)."""
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def denormalise(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """The inverse of :func:`normalise`: back to the 0..1 scale."""
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return x * std_t + mean_t


def to_test_scale(image: Tensor, window: Window, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 (3, H, W) -> normalised float (1, 3, h, w) with min(h, w) = min(window)."""
    x = image.unsqueeze(0).float().div_(255)
    size = scaled_size(tuple(image.shape[-2:]), min(window))
    if size != tuple(image.shape[-2:]):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return normalise(x, mean, std)


def label_at(label: Tensor, size: Window) -> Tensor:
    """(H, W) label map -> long (h, w), nearest-neighbour resized when the size differs."""
    y = label.long()
    if tuple(y.shape) != tuple(size):
        y = F.interpolate(y[None, None].float(), size=tuple(size), mode="nearest")[0, 0].long()
    return y


def pad_to(x: Tensor, window: Window, value: float = 0.0) -> Tensor:
    """Pad the last two dims at the bottom / right to at least ``window``."""
    ph, pw = max(window[0] - x.shape[-2], 0), max(window[1] - x.shape[-1], 0)
    return F.pad(x, (0, pw, 0, ph), value=value) if ph or pw else x


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Offsets of the windows along one side (``size >= window``): every ``stride``
    pixels, the last one moved back to end flush with the image (mmseg's rule)."""
    n = max(size - window + stride - 1, 0) // stride + 1
    return [min(i * stride, size - window) for i in range(n)]


def window_boxes(size: Window, window: Window, stride: Window | None = None) -> list[Window]:
    """(top, left) of every window over a (padded) image of ``size``, row by row;
    ``stride`` defaults to the window (tiling)."""
    stride = tuple(stride) if stride is not None else tuple(window)
    return [(y, x) for y in window_starts(size[0], window[0], stride[0])
            for x in window_starts(size[1], window[1], stride[1])]


def default_stride(window: Window) -> Window:
    """Evaluation stride: window minus 32 pixels per side, at least 1."""
    return (max(window[0] - DEFAULT_OVERLAP, 1), max(window[1] - DEFAULT_OVERLAP, 1))


def covering_stride(window: Window, stride: Window) -> tuple[Window, str | None]:
    """``stride`` with each side cut to the window's (a longer step leaves the pixels
    between windows unevaluated), and a note saying so when it was cut (else None)."""
    covering = (min(stride[0], window[0]), min(stride[1], window[1]))
    if covering == tuple(stride):
        return covering, None
    return covering, (f"the stride {stride[0]}x{stride[1]} is longer than the {window[0]}x{window[1]} "
                      f"window and would leave pixels unevaluated; using stride {covering[0]}x{covering[1]}")


def tiles(image: Tensor, window: Window, mean: Sequence[float], std: Sequence[float],
          label: Tensor | None = None, ignore_index: int = 255) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Training windows: (x (1, 3, h, w), y (1, h, w) or None) tiling the test-scale image."""
    x = to_test_scale(image, window, mean, std)
    y = None if label is None else label_at(label, tuple(x.shape[-2:]))
    x = pad_to(x, window)
    if y is not None:
        y = pad_to(y, window, value=ignore_index)
    h, w = window
    for top, left in window_boxes(tuple(x.shape[-2:]), window):
        yield (x[..., top:top + h, left:left + w],
               None if y is None else y[None, top:top + h, left:left + w])


def random_view(image: Tensor, label: Tensor, window: Window, mean: Sequence[float], std: Sequence[float],
                generator: torch.Generator, ignore_index: int = 255,
                ratio: tuple[float, float] = (0.5, 2.0), flip: float = 0.5) -> tuple[Tensor, Tensor]:
    """One random training view: (x (1, 3, h, w) normalised, y (1, h, w) long) of the
    uint8 (3, H, W) ``image`` and its (H, W) ``label``, every draw from ``generator``:
    short side ``min(window) * U(ratio)``, a uniform crop origin, a flip with
    probability ``flip``."""
    r = torch.empty(3).uniform_(generator=generator)
    short = max(round(min(window) * (ratio[0] + (ratio[1] - ratio[0]) * float(r[0]))), 1)
    size = scaled_size(tuple(image.shape[-2:]), short)
    x = F.interpolate(image.unsqueeze(0).float().div_(255), size=size, mode="bilinear", align_corners=False)
    x = pad_to(normalise(x, mean, std), window)
    y = pad_to(label_at(label, size), window, value=ignore_index)
    h, w = window
    top = int(float(r[1]) * (x.shape[-2] - h + 1))
    left = int(float(r[2]) * (x.shape[-1] - w + 1))
    x, y = x[..., top:top + h, left:left + w], y[None, top:top + h, left:left + w]
    if float(torch.rand(1, generator=generator)) < flip:
        x, y = x.flip(-1), y.flip(-1)
    return x.contiguous(), y.contiguous()


def center_window(image: Tensor, window: Window, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """The centred (1, 3, h, w) window of the test-scale image (padded if smaller)."""
    x = pad_to(to_test_scale(image, window, mean, std), window)
    h, w = window
    top, left = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
    return x[..., top:top + h, left:left + w]


def split_windows(dataset: str, split: str, window: Window, mean: Sequence[float], std: Sequence[float],
                  limit: int, root: str | None = None) -> Iterator[Tensor]:
    """The centre windows (1, 3, h, w) of the first ``limit`` images of a split."""
    data = build_dataset(dataset, split, root=root, limit=limit)
    for i in range(len(data)):
        yield center_window(data[i].image, window, mean, std)


def mixed_groups(n: int, batch_size: int, seed: int = 0) -> list[list[int]]:
    """Indices ``0 .. n-1`` in a seeded random order, cut into consecutive groups of
    ``batch_size`` (the last one shorter when ``batch_size`` does not divide ``n``).

    The fixed mixed batches that batched measurements use: the same images end up
    together in every run and for every method, and consecutive video frames (nearly
    identical images) are spread over different groups.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def frames_batch(dataset: str, split: str, window: Window, mean: Sequence[float], std: Sequence[float],
                 batch_size: int, kind: str, root: str | None = None) -> Tensor:
    """A (B, 3, h, w) batch of real frames: ``mixed`` = B distinct frames, ``repeated`` =
    the first frame B times (the authors' protocol)."""
    if kind not in BATCH_KINDS:
        raise ValueError(f"batch kind must be one of {', '.join(BATCH_KINDS)}, got {kind!r}")
    check_memory(batch_size * 3 * window[0] * window[1] * 4, f"a batch of {batch_size:,} images of "
                 f"{window[0]}x{window[1]}")  # the fp32 input alone
    n = 1 if kind == "repeated" else batch_size
    frames = list(split_windows(dataset, split, window, mean, std, n, root))
    if len(frames) < n:
        raise ValueError(f"the {split} split has only {len(frames)} images, need {n} for a mixed batch")
    return torch.cat(frames * batch_size if kind == "repeated" else frames)
