"""Pictures: token maps, predictions, `algm-bench predict` / `compare-methods`, gallery.

Tiny random models and generated images only (no weights, no data): fast.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from algm import methods as registry
from algm.algm import ALGM
from algm.cli import main
from algm.config import HALF, DecoderConfig, ViTConfig, get_dataset
from algm.data.windows import center_window, normalise
from algm.methods import build_method
from algm.model.segmenter import build_segmenter
from algm.pictures.figures import TokenPanel, save_figure, tokens_figure
from algm.pictures.gallery import method_variants, write_gallery
from algm.pictures.maps import (PRUNED_COLOR, class_meta, compact_ids, distinct_colors, save_label_png,
                                token_map_rgb)
from algm.pictures.predict import Prediction, check_image, predict, read_image
from algm.reduction import TokenReduction, TrainingTask

N_CLS = 11  # CamVid's classes, so --dataset camvid (the default) names and colours them
WINDOW = (64, 96)  # 4 x 6 = 24 patches

VARIANT = """\
dataset_kwargs:
  normalization: vit
inference_kwargs:
  im_size: 64
  window_size: 64
  window_stride: 48
net_kwargs:
  backbone: vit_tiny_patch16_384
  d_model: 64
  decoder:
    n_cls: 11
    n_layers: 2
    name: mask_transformer
  distilled: false
  image_size: !!python/tuple
  - 64
  - 64
  n_cls: 11
  n_heads: 2
  n_layers: 2
  patch_size: 16
"""


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(method=None, depth: int = 3):
    torch.manual_seed(0)
    cfg = ViTConfig("tiny", 64, depth, 2, 16, norm_eps=1e-5, pos_grid=(4, 4))
    return build_segmenter(cfg, N_CLS, DecoderConfig("mask", 2), method).eval()


def image_tensor(h: int = 70, w: int = 100, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)


def write_png(path: Path, h: int = 70, w: int = 100) -> Path:
    Image.fromarray(image_tensor(h, w).permute(1, 2, 0).numpy()).save(path)
    return path


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """An official-layout checkpoint.pth + variant.yml of a 2-block random model."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.manual_seed(0)
    cfg = ViTConfig("vit_tiny_patch16_384", 64, 2, 2, 16, norm_eps=1e-5, pos_grid=(4, 4))
    model = build_segmenter(cfg, N_CLS, DecoderConfig("mask", 2))
    torch.save({"model": model.state_dict()}, folder / "checkpoint.pth")
    (folder / "variant.yml").write_text(VARIANT)
    return folder / "checkpoint.pth"


def patch_centre_colours(rgb: np.ndarray, grid: tuple[int, int]) -> list[tuple[int, ...]]:
    h, w = rgb.shape[:2]
    gh, gw = grid
    return [tuple(rgb[int((i + 0.5) * h / gh), int((j + 0.5) * w / gw)])
            for i in range(gh) for j in range(gw)]


# ------------------------------------------------------------------- token maps
def test_none_has_one_token_and_one_colour_per_patch():
    pred = predict(tiny(), image_tensor(), WINDOW)
    assert pred.grid == (4, 6) and pred.n_patches == 24
    assert pred.token_ids().numel() == 24 == pred.n_tokens
    assert sorted(pred.source.reshape(-1).tolist()) == list(range(24))
    colours = patch_centre_colours(token_map_rgb(pred.source, size=(64, 96), borders=False), pred.grid)
    assert len(set(colours)) == 24


def test_algm_without_merging_keeps_every_patch():
    """tau > 1 merges no window; with the global stage off ALGM is the unreduced model."""
    method = ALGM(tau=1.5, layers=(1, 2), stages="local", depth=3)
    model = tiny(method)
    image = image_tensor()
    pred = predict(model, image, WINDOW)
    assert pred.token_ids().numel() == pred.n_patches == pred.n_tokens == 24
    assert len(set(patch_centre_colours(token_map_rgb(pred.source, size=WINDOW), pred.grid))) == 24
    assert torch.equal(pred.logits, predict(tiny(), image, WINDOW).logits)


def test_algm_merging_every_window_gives_one_token_per_window():
    pred = predict(tiny(ALGM(tau=-1.0, layers=(1, 2), stages="local", depth=3)), image_tensor(), WINDOW)
    assert pred.n_tokens == 6 == pred.token_ids().numel()
    src = pred.source
    for i in range(0, 4, 2):
        for j in range(0, 6, 2):
            assert src[i:i + 2, j:j + 2].unique().numel() == 1  # a 2x2 window is one token
    colours = patch_centre_colours(token_map_rgb(src, size=WINDOW), pred.grid)
    assert len(set(colours)) == 6


def test_pruned_patches_are_dark_and_ids_compact():
    source = torch.tensor([[5, 5, -1], [9, -1, 2]])
    ids, k = compact_ids(source.numpy())
    assert k == 3 and ids.tolist() == [[0, 0, -1], [1, -1, 2]]
    rgb = token_map_rgb(source, size=(20, 30), grid=False, borders=False)
    assert tuple(rgb[15, 15]) == PRUNED_COLOR and tuple(rgb[5, 25]) == PRUNED_COLOR
    assert tuple(rgb[5, 5]) == tuple(rgb[5, 15]) != tuple(rgb[15, 5])
    pred = Prediction(image=image_tensor(20, 30), input=torch.zeros(1), logits=torch.zeros(1, 2, 20, 30),
                      source=source, tokens=torch.tensor([7, 4]), method="prune")
    assert (pred.n_tokens, pred.n_pruned, pred.token_ids().tolist()) == (3, 2, [2, 5, 9])


def test_distinct_colors_are_distinct():
    colours = distinct_colors(3000)
    assert len({tuple(c) for c in colours}) == 3000
    assert PRUNED_COLOR not in {tuple(c) for c in colours}


def test_label_png_shows_colours_and_reads_back_as_classes(tmp_path):
    classes, palette = class_meta("camvid", 11)
    labels = np.arange(12 * 10).reshape(12, 10) % 11
    path = save_label_png(labels, palette, tmp_path / "p.png")
    with Image.open(path) as im:
        assert im.mode == "P"
        assert np.array_equal(np.array(im), labels)
        assert np.array_equal(np.array(im.convert("RGB")), palette[labels])
    with pytest.raises(ValueError, match="predicts 5 classes but camvid has 11"):
        class_meta("camvid", 5)


class MarkEven(TokenReduction):
    """No reduction, but its token map gives even patches to no token (like pruning)."""

    name = "mark-even"

    def token_map(self, state):
        return state.source.masked_fill(state.source % 2 == 0, -1)


class Untrained(TokenReduction):
    """A method with a part that was never trained."""

    name = "untrained"

    @classmethod
    def required_training(cls, config, backbone, dataset):
        return [TrainingTask("exit heads", Path("nowhere/heads.pt"), lambda context: None)]


def test_the_token_map_is_the_methods_own():
    pred = predict(tiny(MarkEven()), image_tensor(), WINDOW)
    assert pred.source.reshape(-1).tolist() == [-1 if i % 2 == 0 else i for i in range(24)]
    assert pred.n_pruned == 12 and pred.caption().endswith("12 patches pruned (dark)")


def test_camvid_frames_feed_the_whole_frame_and_other_images_keep_their_aspect():
    """CamVid 480 x 360 into 448 x 336: the centre window at test scale is the whole frame
    resized, exactly the old input; a wider image is cropped, not squeezed."""
    model, frame = tiny(), image_tensor(360, 480)
    pred = predict(model, frame, (336, 448))
    cfg = model.encoder.cfg
    resized = F.interpolate(frame.unsqueeze(0).float().div_(255), size=(336, 448), mode="bilinear",
                            align_corners=False)
    assert torch.equal(pred.input, normalise(resized, cfg.mean, cfg.std))
    assert torch.equal(pred.image, frame) and pred.labels().shape == (360, 480)

    wide = image_tensor(64, 128)
    pred = predict(model, wide, (64, 64))
    assert torch.equal(pred.input, normalise(wide[None, :, :, 32:96].float() / 255, cfg.mean, cfg.std))
    assert torch.equal(pred.image, wide[:, :, 32:96])


def test_method_variants_leave_out_untrained_methods_and_say_so(monkeypatch, capsys):
    registry.methods()  # discover the built-ins first, then add the untrained one
    monkeypatch.setitem(registry._REGISTRY, "untrained", Untrained)
    model = tiny()
    models = method_variants(model, model.encoder.cfg, get_dataset("camvid"), ["none", "untrained", "algm"])
    algm = build_method("algm", model.encoder.cfg, get_dataset("camvid"))
    assert list(models) == ["none", algm.label()]
    assert "untrained left out" in capsys.readouterr().err


def test_figures_are_written_whole_in_the_format_of_their_name(tmp_path):
    pred = predict(tiny(), image_tensor(), WINDOW)
    fig = tokens_figure(pred.rgb(), TokenPanel("none", pred.source.numpy(), pred.caption()))
    path = save_figure(fig, tmp_path / "tokens.svg")
    assert "<svg" in path.read_text()[:1000]
    assert [p.name for p in tmp_path.iterdir()] == ["tokens.svg"]  # no temporary file left


# ------------------------------------------------------------------------- CLI
def test_predict_writes_pictures_and_the_exact_logits(tmp_path, checkpoint, capsys):
    from algm.weights import load_checkpoint

    img = write_png(tmp_path / "street.png", 70, 100)
    out = tmp_path / "out"
    argv = ["predict", "--image", str(img), "--checkpoint", str(checkpoint), "--method", "algm",
            "--tau", "-1", "--stages", "local", "--out", str(out), "--save-logits", "--device", "cpu"]
    assert main(argv) == 0
    names = {"street_pred.png", "street_overlay.png", "street_tokens.png", "street_logits.pt"}
    assert {p.name for p in out.iterdir()} == names
    assert len(capsys.readouterr().out.split()) == 4

    saved = torch.load(out / "street_logits.pt", weights_only=True)
    model, info = load_checkpoint(checkpoint)
    method = build_method("algm", model.encoder.cfg, get_dataset("camvid"), tau=-1.0, stages="local")
    model = model.with_method(method).eval()
    x = center_window(read_image(img), info.window, HALF, HALF)
    with torch.no_grad():
        direct = model(x)
    assert saved.dtype == torch.float32 and saved.shape == (1, N_CLS, 64, 64)
    assert torch.equal(saved, direct)
    with Image.open(out / "street_pred.png") as im:
        # the 64 x 64 centre window of the 70 x 100 image, at the image's scale
        assert im.mode == "P" and im.size == (70, 70)
        assert np.array(im).max() < N_CLS


def test_predict_without_a_trained_head_says_the_decoder_is_random(tmp_path, capsys):
    img = write_png(tmp_path / "a.jpg", 64, 96)
    out = tmp_path / "out"
    argv = ["predict", "--image", str(img), "--backbone", "vit-ti16", "--crop", "64x96",
            "--data-root", str(tmp_path / "no-data"), "--out", str(out)]
    assert main(argv) == 0
    assert "decoder is random" in capsys.readouterr().err
    assert {p.name for p in out.iterdir()} == {"a_pred.png", "a_overlay.png", "a_tokens.png"}


def test_compare_methods_and_gallery(tmp_path, checkpoint, capsys):
    img = write_png(tmp_path / "x.png", 64, 64)
    fig = tmp_path / "figs" / "fig.png"
    assert main(["compare-methods", "--image", str(img), "--checkpoint", str(checkpoint),
                 "--out", str(fig), "--device", "cpu"]) == 0
    with Image.open(fig) as im:
        assert im.size[0] > im.size[1] > 300  # five columns, two rows

    from algm.weights import load_checkpoint

    model, _ = load_checkpoint(checkpoint)
    models = method_variants(model, model.encoder.cfg, get_dataset("camvid"), ["none", "algm"])
    assert list(models)[0] == "none"
    frames = [("a", image_tensor(64, 64, 1)), ("b", image_tensor(64, 64, 2))]
    path = write_gallery(models, frames, tmp_path / "g" / "gallery.png", window=(64, 64))
    with Image.open(path) as im:
        assert im.size[0] > im.size[1]


def _bad_checkpoint(tmp_path, checkpoint):
    (checkpoint.parent / "variant.yml").unlink()
    return ["--checkpoint", str(checkpoint)]


@pytest.mark.parametrize("case, message", [
    ("missing", "image not found"),
    ("unreadable", "cannot read this image"),
    ("no_variant", "variant file not found"),
])
@pytest.mark.parametrize("out_exists", [False, True])
def test_bad_input_fails_clearly_and_writes_nothing(tmp_path, checkpoint, capsys, case, message, out_exists):
    img = write_png(tmp_path / "ok.png")
    extra = ["--checkpoint", str(checkpoint)]
    if case == "missing":
        img = tmp_path / "nope.png"
    elif case == "unreadable":
        img = tmp_path / "broken.png"
        img.write_text("not a picture")
    else:
        extra = _bad_checkpoint(tmp_path, checkpoint)
    out = tmp_path / "out"
    if out_exists:
        out.mkdir()
    assert main(["predict", "--image", str(write_png(tmp_path / "first.png")), "--image", str(img),
                 "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "algm-bench predict: error:" in err
    assert (list(out.iterdir()) == []) if out_exists else not out.exists()
    fig = tmp_path / "fig.png"
    assert main(["compare-methods", "--image", str(img), "--out", str(fig), *extra]) == 2
    assert message in capsys.readouterr().err and not fig.exists()


def test_an_image_damaged_past_its_header_fails_before_anything_is_written(tmp_path, checkpoint, capsys):
    """A truncated JPEG has a valid header; the up-front check decodes it (cheaply) and
    fails before the pictures of the first image are written."""
    Image.fromarray(image_tensor().permute(1, 2, 0).numpy()).save(tmp_path / "whole.jpg")
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.jpg"):
        check_image(tmp_path / "cut.jpg")
    out = tmp_path / "out"
    assert main(["predict", "--image", str(write_png(tmp_path / "first.png")), "--image",
                 str(tmp_path / "cut.jpg"), "--checkpoint", str(checkpoint), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "cut.jpg" in err and "cannot read this image" in err and not out.exists()


def test_compare_methods_with_only_untrained_methods_fails_clearly(tmp_path, checkpoint, capsys, monkeypatch):
    registry.methods()
    monkeypatch.setitem(registry._REGISTRY, "untrained", Untrained)
    fig = tmp_path / "fig.png"
    assert main(["compare-methods", "--image", str(write_png(tmp_path / "x.png", 64, 64)), "--checkpoint",
                 str(checkpoint), "--methods", "untrained", "--out", str(fig)]) == 2
    assert "every one chosen still needs training" in capsys.readouterr().err and not fig.exists()
