"""One image through one model, kept for pictures: :func:`predict` -> :class:`Prediction`.

The model sees what evaluation and training see: the centre window of the image at
test scale (:func:`algm.data.windows.center_window`; for CamVid frames, 480 x 360 into
448 x 336, that is the whole frame). The pictures show the same region at the image's
own scale (:attr:`Prediction.image`). The token map is the method's own
(:meth:`~algm.reduction.TokenReduction.token_map`), so no picture knows a method.

Images are read with :func:`read_image`; :func:`check_image` fails the same way without
decoding, for checking many files before any work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from algm.config import check_window
from algm.data.datasets import check_image_file
from algm.data.windows import center_window, pad_to

BLACK = (0.0, 0.0, 0.0)
UNIT = (1.0, 1.0, 1.0)


# ============================================================================ images
def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image not found: {path}")
    if not path.is_file():
        raise ValueError(f"not an image file: {path} is a folder")
    return path


def read_image(path: str | Path) -> Tensor:
    """(3, H, W) uint8 RGB of an image file; FileNotFoundError / ValueError that name it."""
    from PIL import Image, UnidentifiedImageError

    path = _existing(path)
    try:
        with Image.open(path) as im:
            rgb = np.array(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from None
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


def check_image(path: str | Path) -> None:
    """Fail like :func:`read_image`, cheaply (:func:`~algm.data.datasets.check_image_file`:
    PNG chunks verified, JPEGs decoded at 1/8 scale, so a truncated file fails too)."""
    check_image_file(_existing(path))


def window_view(image: Tensor, window: tuple[int, int]) -> Tensor:
    """(3, H, W) uint8 -> (3, h', w') uint8: the region of ``image`` that the model's
    centre window covers, at the image's own scale (black where the window reaches past
    the image). It is :func:`center_window` of a window scaled back by the test-scale
    factor, so no resize happens and both use one placement rule."""
    x = center_window(image, _view_size(tuple(image.shape[-2:]), window), BLACK, UNIT)[0]  # 0..1, nothing resized
    return x.mul(255).round_().to(torch.uint8)


def label_view(label: Tensor, window: tuple[int, int], ignore_index: int) -> Tensor:
    """(H, W) label map -> (h', w') long: the region :func:`window_view` shows of its
    image, ``ignore_index`` where the window reaches past the image (the padding and
    centring of :func:`center_window`, at the image's own scale, so nothing is resized)."""
    view = _view_size(tuple(label.shape[-2:]), window)
    y = pad_to(label.long(), view, value=ignore_index)
    top, left = (y.shape[-2] - view[0]) // 2, (y.shape[-1] - view[1]) // 2
    return y[top:top + view[0], left:left + view[1]]


def _view_size(size: tuple[int, int], window: tuple[int, int]) -> tuple[int, int]:
    """``window`` scaled back by the test-scale factor of an image of ``size`` (H, W)."""
    scale = min(window) / min(size)
    return (round(window[0] / scale), round(window[1] / scale))


# ======================================================================== predicting
@dataclass(frozen=True)
class Prediction:
    """One image through one model.

    image: (3, H, W) uint8, the region the model saw at the image's scale
    (:func:`window_view`; the whole image where the window covers it);
    input: (1, 3, h, w) what the model got; logits: (1, n_cls, h, w) float32 exactly
    as returned (no softmax/argmax); source: (gh, gw) long token index of every patch
    (-1: no token holds it, e.g. pruned); tokens: (depth,) tokens alive after every
    block, cls included; method / settings: the method's name and settings.
    """

    image: Tensor
    input: Tensor
    logits: Tensor
    source: Tensor
    tokens: Tensor
    method: str
    settings: dict = field(default_factory=dict)

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.source.shape)

    @property
    def n_patches(self) -> int:
        return self.source.numel()

    @property
    def n_tokens(self) -> int:
        """Patch tokens alive after the last block (cls not counted)."""
        return int(self.tokens[-1]) - 1

    @property
    def n_pruned(self) -> int:
        return int((self.source < 0).sum())

    def token_ids(self) -> Tensor:
        """The distinct token indices that hold at least one patch."""
        return torch.unique(self.source[self.source >= 0])

    def rgb(self) -> np.ndarray:
        """:attr:`image` as an (H, W, 3) uint8 array."""
        return self.image.permute(1, 2, 0).cpu().numpy()

    def labels(self, size: tuple[int, int] | None = None) -> Tensor:
        """(H, W) long argmax of the logits resized (bilinear) to ``size`` (default:
        :attr:`image`'s size), as Segmenter resizes predictions back."""
        size = tuple(size) if size is not None else tuple(self.image.shape[-2:])
        logits = self.logits.float()
        if tuple(logits.shape[-2:]) != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits[0].argmax(0).cpu()

    def caption(self) -> str:
        """``608 of 768 tokens kept (79.2 %)`` (+ how many patches no token holds)."""
        text = f"{self.n_tokens} of {self.n_patches} tokens kept ({100 * self.n_tokens / self.n_patches:.1f} %)"
        if self.n_pruned:
            text += f", {self.n_pruned} patches pruned (dark)"
        return text


@torch.no_grad()
def predict(model, image: Tensor, window: tuple[int, int], mean: Sequence[float] | None = None,
            std: Sequence[float] | None = None, device: str | torch.device | None = None) -> Prediction:
    """Run ``model`` (a Segmenter with its method) once on ``image`` (3, H, W) uint8.

    The input is :func:`center_window` at ``window`` with the encoder's own
    normalisation unless ``mean`` / ``std`` are given. One forward pass: the final
    ``TokenState`` is read with a forward hook on ``model.encoder`` (nothing patched)
    and turned into the token map by ``model.method.token_map``.
    """
    cfg = model.encoder.cfg
    window = tuple(window)
    check_window(window, cfg.patch_size)
    mean = tuple(mean) if mean is not None else cfg.mean
    std = tuple(std) if std is not None else cfg.std
    if device is None:
        device = next(model.parameters()).device
    x = center_window(image, window, mean, std).to(device)
    captured = {}
    hook = model.encoder.register_forward_hook(lambda mod, args, out: captured.__setitem__("state", out[0]))
    try:
        out = model.run(x)
    finally:
        hook.remove()
    state = captured["state"]
    source = model.method.token_map(state)[0].detach().cpu().reshape(state.grid).clone()
    return Prediction(
        image=window_view(image.cpu(), window), input=x.cpu(), logits=out.logits.detach().float().cpu(),
        source=source, tokens=out.tokens[0].detach().cpu(),
        method=model.method.name, settings=dict(model.method.settings()),
    )
