"""The one image -> window geometry (algm.data.windows)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from algm.data import windows as W

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def reference_test_scale(img, short):
    x = img.unsqueeze(0).float() / 255
    h, w = img.shape[-2:]
    size = (int(h * short / min(h, w) + 0.5), int(w * short / min(h, w) + 0.5))
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def test_camvid_frame_is_exactly_one_window():
    img = image(360, 480)
    tiles = list(W.tiles(img, (336, 448), MEAN, STD, label=torch.zeros(360, 480, dtype=torch.long)))
    assert len(tiles) == 1
    x, y = tiles[0]
    assert x.shape == (1, 3, 336, 448) and y.shape == (1, 336, 448)
    assert torch.equal(x, reference_test_scale(img, 336))
    assert torch.equal(W.center_window(img, (336, 448), MEAN, STD), x)


def test_wide_image_tiles_with_the_fewest_windows_flush_with_the_border():
    img = image(480, 640)  # ADE20K-like; 512 window -> test scale 512 x 683
    label = torch.randint(0, 150, (480, 640))
    tiles = list(W.tiles(img, (512, 512), MEAN, STD, label=label))
    assert [t[0].shape for t in tiles] == [(1, 3, 512, 512)] * 2
    full = reference_test_scale(img, 512)
    assert full.shape[-2:] == (512, 683)
    assert torch.equal(tiles[0][0], full[..., :512]) and torch.equal(tiles[1][0], full[..., -512:])
    assert torch.equal(tiles[1][1][0], W.label_at(label, (512, 683))[:, -512:])
    centre = W.center_window(img, (512, 512), MEAN, STD)
    assert torch.equal(centre, full[..., 85:597])


def test_narrow_image_is_padded_with_the_mean_colour_and_ignore():
    img = image(100, 200)  # test scale for a 300 x 700 window: 300 x 600, 100 columns short
    x, y = next(W.tiles(img, (300, 700), MEAN, STD, label=torch.zeros(100, 200, dtype=torch.long)))
    assert x.shape == (1, 3, 300, 700) and y.shape == (1, 300, 700)
    assert torch.equal(x[..., :600], reference_test_scale(img, 300))
    assert torch.equal(x[..., 600:], torch.zeros(1, 3, 300, 100))  # zero = the mean colour
    assert (y[0, :, 600:] == 255).all() and (y[0, :, :600] == 0).all()


@pytest.mark.parametrize("size,window,stride,expected", [
    (512, 512, 480, [0]), (683, 512, 480, [0, 171]), (1100, 512, 480, [0, 480, 588]), (683, 512, 512, [0, 171]),
])
def test_window_starts_follow_mmseg(size, window, stride, expected):
    assert W.window_starts(size, window, stride) == expected


def test_default_stride_and_boxes():
    assert W.default_stride((512, 512)) == (480, 480)
    assert W.window_boxes((512, 683), (512, 512)) == [(0, 0), (0, 171)]
