"""Sliding-window inference, test-time preprocessing and the mIoU loop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from algm.config import get_backbone
from algm.data.datasets import build_dataset
from algm.data.windows import default_stride, mixed_groups, scaled_size, to_test_scale, window_starts
from algm.evaluate import evaluate, slide_inference, slide_inference_many

N_CLS = 4
CFG = get_backbone("vit-s14")  # ImageNet mean/std


class Constant(nn.Module):
    """(B, 3, h, w) -> (B, N_CLS, h, w) equal to ``value`` per class everywhere."""

    def __init__(self):
        super().__init__()
        self.value = nn.Parameter(torch.arange(N_CLS, dtype=torch.float) * 1.5 - 2)

    def forward(self, x):
        return self.value.view(1, -1, 1, 1).expand(x.shape[0], -1, *x.shape[-2:]).clone()


class PositionDependent(nn.Module):
    """Output depends on the content and on the position inside the window, so
    overlapping windows disagree and only the right averaging gives the reference."""

    def forward(self, x):
        h, w = x.shape[-2:]
        rows = torch.arange(h, dtype=x.dtype).view(1, 1, h, 1)
        cols = torch.arange(w, dtype=x.dtype).view(1, 1, 1, w)
        c = torch.arange(N_CLS, dtype=x.dtype).view(1, -1, 1, 1)
        return x[:, :1] * (c + 1) + rows * 0.1 * (c - 1) + cols * 0.01 * (c + 2)


def reference_slide(model, image, window, stride):
    """Per-pixel brute force: average the outputs of every window covering the pixel."""
    _, _, height, width = image.shape
    h, w = window
    padded = torch.nn.functional.pad(image, (0, max(w - width, 0), 0, max(h - height, 0)))
    ph, pw = padded.shape[-2:]

    def starts(size, win, step):
        return sorted(set(range(0, size - win + 1, step)) | {size - win})

    outputs = {(y, x): model(padded[..., y:y + h, x:x + w])[0]
               for y in starts(ph, h, stride[0]) for x in starts(pw, w, stride[1])}
    ref = torch.zeros(1, N_CLS, height, width)
    for i in range(height):
        for j in range(width):
            vals = [out[:, i - y, j - x] for (y, x), out in outputs.items()
                    if y <= i < y + h and x <= j < x + w]
            ref[0, :, i, j] = torch.stack(vals).mean(0)
    return ref


def test_window_starts():
    assert window_starts(10, 10, 3) == [0]
    assert window_starts(11, 8, 3) == [0, 3]
    assert window_starts(12, 8, 3) == [0, 3, 4]
    assert window_starts(1024, 768, 736) == [0, 256]
    assert default_stride((336, 448)) == (304, 416) and default_stride((20, 33)) == (1, 1)


@pytest.mark.parametrize("size", [(5, 7), (8, 10), (8, 23), (19, 10), (21, 29), (3, 40)])
def test_constant_model_gives_the_constant(size):
    model = Constant()
    image = torch.randn(1, 3, *size)
    out = slide_inference(model, image, (8, 10), (5, 6), N_CLS)
    assert out.shape == (1, N_CLS, *size)
    torch.testing.assert_close(out, model.value.detach().view(1, -1, 1, 1).expand_as(out))


@pytest.mark.parametrize("size, window, stride", [
    ((13, 17), (8, 10), (3, 4)),
    ((8, 10), (8, 10), (3, 3)),
    ((6, 23), (8, 10), (5, 7)),
    ((20, 9), (7, 7), (6, 6)),
])
def test_overlap_averaging_matches_brute_force(size, window, stride):
    image = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    model = PositionDependent()
    expected = reference_slide(model, image, window, stride)
    torch.testing.assert_close(slide_inference(model, image, window, stride, N_CLS), expected)
    torch.testing.assert_close(slide_inference(model, image, window, stride, N_CLS, batch_size=2), expected)


def test_slide_inference_errors():
    with pytest.raises(ValueError, match="model returned"):
        slide_inference(Constant(), torch.zeros(1, 3, 8, 8), (4, 4), (4, 4), N_CLS + 1)
    with pytest.raises(ValueError, match="one image"):
        slide_inference(Constant(), torch.zeros(2, 3, 8, 8), (4, 4), (4, 4), N_CLS)


def test_test_scale_resizes_short_side_and_normalises():
    assert scaled_size((360, 480), 336) == (336, 448)
    assert scaled_size((480, 360), 336) == (448, 336)
    assert scaled_size((512, 683), 512) == (512, 683)
    image = torch.full((3, 360, 480), 128, dtype=torch.uint8)
    x = to_test_scale(image, (336, 448), CFG.mean, CFG.std)
    assert x.shape == (1, 3, 336, 448) and x.dtype == torch.float32
    expected = (128 / 255 - torch.tensor(CFG.mean)) / torch.tensor(CFG.std)
    torch.testing.assert_close(x[0, :, 100, 200], expected)
    raw = torch.randint(0, 256, (3, 24, 32), dtype=torch.uint8)
    torch.testing.assert_close(to_test_scale(raw, (24, 32), (0.0,) * 3, (1.0,) * 3)[0], raw.float() / 255)


class Oracle(nn.Module):
    """Reads the class back from the red channel (value 20 * class + 10) of the input."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))  # gives the model a device
        self.encoder = nn.Module()
        self.encoder.cfg = CFG

    def forward(self, x):
        red = (x[:, :1] * CFG.std[0] + CFG.mean[0]) * 255
        centres = torch.arange(11, dtype=x.dtype).view(1, -1, 1, 1) * 20 + 10
        return -self.scale * (red - centres) ** 2


def make_camvid(root: Path, frames: dict[str, tuple[int, tuple[int, int]]]) -> Path:
    """One flat-colour frame per entry: name -> (class, (H, W)); top-left 3x4 corner ignored."""
    (root / "valannot").mkdir(parents=True)
    (root / "val").mkdir()
    (root / "val.txt").write_text("".join(f"{n}\n" for n in frames))
    for name, (cls, (h, w)) in frames.items():
        image = np.zeros((h, w, 3), np.uint8)
        image[..., 0] = 20 * cls + 10
        Image.fromarray(image).save(root / "val" / f"{name}.jpg", quality=95)
        label = np.full((h, w), cls, np.uint8)
        label[:3, :4] = 11
        Image.fromarray(label).save(root / "valannot" / f"{name}.png")
    return root


@pytest.fixture
def camvid(tmp_path):
    # landscape (resized to the window), portrait (padded along W) and larger (several windows)
    return build_dataset("camvid", "val", root=make_camvid(tmp_path, {
        "a": (0, (30, 40)), "b": (3, (40, 30)), "c": (8, (48, 90)),
    }))


def test_evaluate_oracle_is_perfect(camvid):
    model = Oracle().train()
    res = evaluate(model, camvid, (24, 32), progress=False)
    assert model.training  # the flag is restored
    assert res.n_images == 3 and res.miou == 100.0 and res.acc == 100.0  # percent
    assert [i for i, v in enumerate(res.per_class_iou) if v == v] == [0, 3, 8]
    labelled = 30 * 40 + 40 * 30 + 48 * 90 - 3 * 3 * 4  # original sizes, ignore corner left out
    assert res.confusion.sum() == labelled


def test_evaluate_constant_prediction(camvid):
    class Always3(Oracle):
        def forward(self, x):
            return torch.eye(11)[3].view(1, -1, 1, 1).expand(x.shape[0], -1, *x.shape[-2:]) * self.scale

    res = evaluate(Always3(), camvid, (24, 32), progress=False)
    sizes = {0: 30 * 40 - 12, 3: 40 * 30 - 12, 8: 48 * 90 - 12}  # labelled pixels per class
    assert res.per_class_iou[3] == pytest.approx(100 * sizes[3] / sum(sizes.values()))  # percent
    assert res.per_class_iou[0] == res.per_class_iou[8] == 0.0
    assert res.miou == pytest.approx(res.per_class_iou[3] / 3)
    assert res.acc == pytest.approx(res.per_class_iou[3])
    with pytest.raises(ValueError, match="model returned"):  # 4 classes for an 11-class dataset
        evaluate(Constant(), camvid, (24, 32), backbone_cfg=CFG, progress=False)


def test_evaluate_counts_and_limit(camvid):
    res = evaluate(Oracle(), camvid, (24, 32), stride=(10, 10), limit=2, progress=False, batch_size=1)
    assert res.n_images == 2 and res.confusion.sum() == 30 * 40 + 40 * 30 - 2 * 12
    with pytest.raises(ValueError, match="backbone_cfg"):
        evaluate(Constant(), camvid, (24, 32), progress=False)


def test_channels_last_model_outputs_average_alike():
    """The Segmenter's logits are channels-last: the accumulation gives the same values."""
    model = PositionDependent()
    image = torch.randn(1, 3, 13, 17, generator=torch.Generator().manual_seed(0))
    channels_last = lambda x: model(x).contiguous(memory_format=torch.channels_last)  # noqa: E731
    for window, stride in [((8, 10), (3, 4)), ((13, 17), (5, 5))]:
        out = slide_inference(channels_last, image, window, stride, N_CLS)
        assert torch.equal(out, slide_inference(model, image, window, stride, N_CLS))


def test_non_finite_logits_are_an_error_naming_the_image(camvid):
    class NaNOnClass3(Oracle):
        def forward(self, x):
            logits = super().forward(x)
            red = (x[:, 0] * CFG.std[0] + CFG.mean[0]) * 255
            return logits.masked_fill(((red - 70).abs() < 5)[:, None], float("nan"))

    with pytest.raises(ValueError, match="non-finite logits on b"):
        evaluate(NaNOnClass3(), camvid, (24, 32), progress=False)


def test_windows_of_several_images_share_calls_and_match_each_image_alone():
    """Image by image, window by window across the images; each image gets what
    slide_inference gives it alone (overlaps averaged, padding cropped)."""
    model = PositionDependent()
    gen = torch.Generator().manual_seed(1)
    images = [torch.randn(1, 3, 13, 17, generator=gen), torch.randn(1, 3, 8, 10, generator=gen),
              torch.randn(1, 3, 6, 20, generator=gen)]
    window, stride = (8, 10), (3, 4)
    calls = []
    counting = lambda x: calls.append(x.shape[0]) or model(x)  # noqa: E731
    outs = slide_inference_many(counting, images, window, stride, N_CLS, batch_size=5)
    n_windows = [len(window_starts(max(i.shape[-2], 8), 8, 3)) * len(window_starts(max(i.shape[-1], 10), 10, 4))
                 for i in images]
    assert n_windows == [9, 1, 4] and calls == [5, 5, 4]  # 14 windows, calls across image borders
    for image, out in zip(images, outs):
        assert out.shape == (1, N_CLS, *image.shape[-2:])
        torch.testing.assert_close(out, slide_inference(model, image, window, stride, N_CLS), rtol=0, atol=1e-6)


def test_mixed_batch_evaluation_takes_the_seeded_groups(camvid):
    """images_per_batch: the images of each mixed_groups group go through the model
    together; a model that scores windows alone gives the same confusion matrix."""
    seen = []

    class Recording(Oracle):
        def forward(self, x):
            red = ((x[:, 0, 5, 5] * CFG.std[0] + CFG.mean[0]) * 255 - 10) / 20
            seen.append(red.round().long().tolist())
            return super().forward(x)

    alone = evaluate(Oracle(), camvid, (24, 32), (24, 32), progress=False)
    grouped = evaluate(Recording(), camvid, (24, 32), (24, 32), progress=False, images_per_batch=2)
    assert torch.equal(grouped.confusion, alone.confusion) and grouped.n_images == 3
    # the windows of frames a, b, c by class: b is 32 x 24 at test scale, c 24 x 45
    windows = [[0], [3, 3], [8, 8]]
    assert seen == [sum((windows[i] for i in g), []) for g in mixed_groups(3, 2)]
