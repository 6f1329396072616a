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


def test_random_view_crops_and_flips_image_and_label_together():
    # ratio 1: the image stays at the test scale, so crop and flip are exact pixel moves
    img = image(40, 72, seed=3)
    label = (img[0] // 26).long()  # a label that is a function of the pixel
    gen = torch.Generator().manual_seed(0)
    for _ in range(8):
        x, y = W.random_view(img, label, (40, 48), MEAN, STD, gen, ignore_index=255, ratio=(1.0, 1.0))
        assert x.shape == (1, 3, 40, 48) and y.shape == (1, 40, 48)
        pixels = (W.denormalise(x, MEAN, STD) * 255).round().long()
        assert torch.equal(pixels[0, 0] // 26, y[0])


def test_random_view_rescales_pads_with_ignore_and_follows_the_generator():
    img, label = image(36, 48), torch.zeros(36, 48, dtype=torch.long)
    views = [W.random_view(img, label, (36, 48), MEAN, STD, torch.Generator().manual_seed(5), 255,
                           ratio=(0.5, 0.5)) for _ in range(2)]
    assert torch.equal(views[0][0], views[1][0]) and torch.equal(views[0][1], views[1][1])
    x, y = views[0]
    # half scale: an 18 x 24 image in the top-left corner, the rest padding
    assert (y[0, :18, :24] == 0).all() and (y[0, 18:] == 255).all() and (y[0, :, 24:] == 255).all()
    assert (x[0, :, 18:] == 0).all()


def test_mixed_groups_are_a_seeded_partition_in_batches():
    groups = W.mixed_groups(21, 8)
    assert [len(g) for g in groups] == [8, 8, 5]
    order = sum(groups, [])
    assert sorted(order) == list(range(21)) and order != list(range(21))
    assert groups == W.mixed_groups(21, 8) and groups != W.mixed_groups(21, 8, seed=1)
    # one seeded order, cut at every batch size
    assert sum(W.mixed_groups(21, 4), []) == sum(groups, []) and W.mixed_groups(0, 4) == []
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match=f"batch_size must be a whole number >= 1, got {bad!r}"):
            W.mixed_groups(5, bad)
