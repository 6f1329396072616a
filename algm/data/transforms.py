"""Model input at test time (SPEC section 4): resize to the test scale, then normalise.

The test scale puts the image's short side at the inference window's short side
(CamVid 480 x 360 with a 448 x 336 window -> 448 x 336), keeping the aspect ratio;
bilinear without antialiasing, as Segmenter and mmseg's cv2 resize do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def scaled_size(size: tuple[int, int], short_side: int) -> tuple[int, int]:
    """(H, W) scaled so that min(H, W) == ``short_side``, rounded half up (as mmcv)."""
    h, w = size
    scale = short_side / min(h, w)
    return (int(h * scale + 0.5), int(w * scale + 0.5))


def preprocess(image: Tensor, short_side: int, mean: tuple[float, float, float],
               std: tuple[float, float, float]) -> Tensor:
    """uint8 image (3, H, W) -> float (1, 3, h, w) at the test scale, normalised with
    ``mean``/``std`` given on the 0..1 scale (e.g. ImageNet's 0.485, ...)."""
    x = image.unsqueeze(0).float().div_(255)
    size = scaled_size(tuple(image.shape[-2:]), short_side)
    if size != tuple(image.shape[-2:]):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t
