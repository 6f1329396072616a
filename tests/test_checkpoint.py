"""Official Segmenter / ALGM checkpoints: variant.yml parsing and strict loading."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from algm.build import make_setup
from algm.config import HALF, IMAGENET_MEAN, IMAGENET_STD, DecoderConfig, ViTConfig
from algm.model.segmenter import Segmenter, build_segmenter
from algm.weights import VariantInfo, load_checkpoint, read_variant
from algm.weights.checkpoint import configs_from_variant, variant_of

TINY = ViTConfig("tiny", embed_dim=64, depth=2, num_heads=2, patch_size=16, norm_eps=1e-5,
                 pos_grid=(4, 4))
N_CLS = 5

# The layout Segmenter writes (yaml.dump of a dict holding a tuple), trimmed.
VARIANT = """\
algorithm_kwargs:
  batch_size: 8
dataset_kwargs:
  dataset: ade20k
  normalization: {normalization}
inference_kwargs:
  im_size: 64
  window_size: 64
  window_stride: 48
net_kwargs:
  backbone: {backbone}
  d_model: 64
  decoder:
    drop_path_rate: 0.0
    dropout: 0.1
    n_cls: 5
    n_layers: 2
    name: {decoder}
  distilled: false
  drop_path_rate: 0.1
  dropout: 0.0
  image_size: !!python/tuple
  - 64
  - 64
  n_cls: 5
  n_heads: 2
  n_layers: 2
  patch_size: 16
"""


def write_official(folder: Path, model: Segmenter, backbone: str = "vit_tiny_patch16_384",
                   decoder: str = "mask_transformer", normalization: str = "vit",
                   edit=None, **extra) -> Path:
    """Save ``model`` as Segmenter does: checkpoint.pth {"model": ..., ...} + variant.yml.

    The state dict gets the unused ``encoder.head.*``; ``edit(state)`` may corrupt it.
    """
    state = dict(model.state_dict())
    state["encoder.head.weight"] = torch.randn(1000, TINY.embed_dim)
    state["encoder.head.bias"] = torch.zeros(1000)
    if edit is not None:
        edit(state)
    path = folder / "checkpoint.pth"
    torch.save({"model": state, "epoch": 63, **extra}, path)
    (folder / "variant.yml").write_text(
        VARIANT.format(backbone=backbone, decoder=decoder, normalization=normalization))
    return path


@pytest.fixture
def source() -> Segmenter:
    torch.manual_seed(0)
    return build_segmenter(TINY, N_CLS, DecoderConfig("mask", 2)).eval()


def test_variant_needs_the_tuple_aware_loader(tmp_path, source):
    write_official(tmp_path, source)
    with pytest.raises(yaml.constructor.ConstructorError):
        yaml.safe_load((tmp_path / "variant.yml").read_text())
    assert read_variant(tmp_path / "variant.yml")["net_kwargs"]["image_size"] == (64, 64)


def test_roundtrip_gives_identical_outputs(tmp_path, source):
    model, info = load_checkpoint(write_official(tmp_path, source))
    assert info == VariantInfo(backbone="vit_tiny_patch16_384", n_cls=N_CLS, im_size=64,
                               window=(64, 64), stride=(48, 48), mean=HALF, std=HALF)
    cfg = model.encoder.cfg
    assert (cfg.norm_eps, cfg.pos_grid, cfg.pos_interp) == (1e-5, (4, 4), "bilinear")
    torch.manual_seed(1)
    for size in [(64, 64), (80, 96)]:  # the training grid, and a resized pos-embed
        images = torch.randn(2, 3, *size)
        with torch.no_grad():
            assert torch.equal(model(images), source(images))


def test_linear_decoder_and_deit_normalization(tmp_path):
    source = build_segmenter(TINY, N_CLS, DecoderConfig("linear")).eval()
    path = write_official(tmp_path, source, backbone="deit_tiny_patch16_224",
                          decoder="linear", normalization="deit")
    model, info = load_checkpoint(path)
    assert (info.mean, info.std) == (IMAGENET_MEAN, IMAGENET_STD)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(images), source(images))


def _drop(state):
    del state["decoder.proj_patch"]


def _add(state):
    state["encoder.blocks.0.attn.extra"] = torch.zeros(3)


def _reshape(state):
    state["encoder.blocks.1.mlp.fc1.weight"] = torch.zeros(128, 64)


@pytest.mark.parametrize("edit, words", [
    (_drop, ["missing: decoder.proj_patch"]),
    (_add, ["unexpected: encoder.blocks.0.attn.extra"]),
    (_reshape, ["mis-shaped: encoder.blocks.1.mlp.fc1.weight (file (128, 64), model (256, 64))"]),
])
def test_corrupt_checkpoint_names_the_key(tmp_path, source, edit, words):
    with pytest.raises(ValueError) as err:
        load_checkpoint(write_official(tmp_path, source, edit=edit))
    for word in words:
        assert word in str(err.value)


def test_every_bad_key_is_reported(tmp_path, source):
    def edit(state):
        del state["encoder.norm.bias"], state["decoder.cls_emb"]
        state["encoder.dist_token"] = torch.zeros(1, 1, 64)
        state["encoder.pos_embed"] = torch.zeros(1, 10, 64)

    with pytest.raises(ValueError) as err:
        load_checkpoint(write_official(tmp_path, source, edit=edit))
    for key in ["decoder.cls_emb", "encoder.norm.bias", "encoder.dist_token", "encoder.pos_embed"]:
        assert key in str(err.value)


def test_missing_variant_names_the_expected_path(tmp_path, source):
    path = write_official(tmp_path, source)
    (tmp_path / "variant.yml").unlink()
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "variant.yml")):
        load_checkpoint(path)


def test_pickled_metadata_needs_trusted(tmp_path, source):
    path = write_official(tmp_path, source, args=argparse.Namespace(lr=0.001))
    with pytest.raises(ValueError, match="trusted=True"):
        load_checkpoint(path)
    model, _ = load_checkpoint(path, trusted=True)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(images), source(images))


def test_unknown_decoder_is_rejected(tmp_path, source):
    with pytest.raises(ValueError, match="unknown decoder 'fancy'"):
        load_checkpoint(write_official(tmp_path, source, decoder="fancy"))


def _listing(folder: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*")}


def _text(path: Path) -> None:
    path.write_text("hello\nthis is not a torch file\n")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-200])


def _numpy(path: Path) -> None:
    np.save(path.with_suffix(".npy"), np.zeros(3))
    path.with_suffix(".npy").replace(path)


@pytest.mark.parametrize("damage", [
    _text,  # torch.load: KeyError / IndexError
    _truncate,  # torch.load: RuntimeError (zip central directory missing)
    lambda p: p.write_bytes(b""),  # EOFError
    lambda p: p.write_bytes(bytes(range(256)) * 4),  # UnpicklingError, but no refused global
    _numpy,
])
def test_unreadable_checkpoint_is_one_line_naming_the_file(tmp_path, source, damage):
    path = write_official(tmp_path, source)
    damage(path)
    before = _listing(tmp_path)
    for trusted in (False, True):  # trusted unpickling gets no further, and says the same
        with pytest.raises(ValueError, match=f"^{path}: not a readable torch file") as err:
            load_checkpoint(path, trusted=trusted)
        assert "\n" not in str(err.value)
    assert _listing(tmp_path) == before


def test_refused_objects_suggest_the_flag_in_one_line(tmp_path, source):
    """torch's own message is 6 lines with ANSI codes and names only the Python API."""
    path = write_official(tmp_path, source, scale=np.float64(0.5))
    with pytest.raises(ValueError) as err:
        load_checkpoint(path)
    text = str(err.value)
    assert text.startswith(f"{path}: ") and "--trusted" in text and "arbitrary code" in text
    assert "numpy" in text  # the refused object is named
    assert "\n" not in text and "\x1b" not in text
    load_checkpoint(path, trusted=True)


@pytest.mark.parametrize("key", ["decoder.cls_emb", "encoder.blocks.1.attn.qkv.weight"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_by_name(tmp_path, source, key, bad):
    def edit(state):
        state[key] = state[key].clone()
        state[key].view(-1)[3] = bad

    path = write_official(tmp_path, source, edit=edit)
    with pytest.raises(ValueError, match=rf"^{path}: tensor {key} holds NaN/inf \(1 of "):
        load_checkpoint(path)


def test_non_finite_unused_classifier_is_ignored(tmp_path, source):
    def edit(state):
        state["encoder.head.weight"][0, 0] = float("nan")

    load_checkpoint(write_official(tmp_path, source, edit=edit))


@pytest.mark.parametrize("text, words", [
    ("net_kwargs: [unclosed\n", "not valid YAML: .*line 2"),
    ("net_kwargs: !!python/object:os.system {}\n", "not valid YAML: could not determine a constructor"),
    ("- a list\n", "expected a mapping of settings"),
    ("", r"expected a mapping of settings \(.*\), got NoneType"),
    (b"a: \xff\x80", r"not UTF-8 text \(byte 0xff at offset 3\); is this variant file a binary file\?$"),
    (b"a: \x00\x01", "not valid YAML: .*special characters are not allowed"),  # binary, yet UTF-8
    # a "billion laughs" alias bomb is refused before it expands, and so is any alias
    ("a: &a [x, x]\nb: &b [*a, *a]\nc: &c [*b, *b]\nnet_kwargs: *c\n",
     r"not valid YAML: aliases \(\*name\) are not allowed here \(line 2, column 8\)$"),
    ("net_kwargs: {}\nnet_kwargs: {}\n", r"not valid YAML: key 'net_kwargs' is given twice \(line 2"),
])
def test_malformed_variant_is_one_line_naming_the_file(tmp_path, source, text, words):
    path = write_official(tmp_path, source)
    variant = tmp_path / "variant.yml"
    variant.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=f"^{variant}: {words}") as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("old, new, words", [
    ("  n_cls: 5\n  n_heads", "  n_heads", "missing net_kwargs.n_cls"),
    ("  d_model: 64", "  d_model: wide", "net_kwargs.d_model must be an integer, got 'wide'"),
    ("  decoder:\n    drop_path_rate: 0.0\n    dropout: 0.1\n    n_cls: 5\n    n_layers: 2\n"
     "    name: mask_transformer\n", "  decoder: mask\n", "net_kwargs.decoder must be a mapping"),
    ("inference_kwargs:\n  im_size: 64", "inference_kwargs: 64\nx:\n  im_size: 64",
     "inference_kwargs must be a mapping"),
    ("  window_size: 64", "  window_size: 0",
     r"inference_kwargs.window_size must be a whole number >= 1 or \[h, w\] of them, got 0$"),
    ("  d_model: 64", "  d_model: " + "w" * 5000, "net_kwargs.d_model must be an integer, got 'w{20,}\\.\\.\\.w+'$"),
])
def test_incomplete_variant_names_the_file_and_entry(tmp_path, source, old, new, words):
    path = write_official(tmp_path, source)
    variant = tmp_path / "variant.yml"
    assert old in variant.read_text()
    variant.write_text(variant.read_text().replace(old, new))
    with pytest.raises(ValueError, match=f"^{variant}: {words}") as err:
        load_checkpoint(path)
    assert len(str(err.value)) < 200 + len(str(variant))  # a long value is shown shortened


def test_checkpoint_folder_is_named(tmp_path, source):
    write_official(tmp_path, source)
    with pytest.raises(FileNotFoundError, match=f"checkpoint {tmp_path} is a folder"):
        load_checkpoint(tmp_path)


def test_variant_describes_a_dinov2_style_encoder_and_a_non_square_window():
    setup = make_setup("vit-s14", "camvid")
    variant = variant_of(setup.model, "camvid", setup.window, setup.stride)
    encoder, decoder, info = configs_from_variant(variant)
    theirs, ours = encoder, setup.model.encoder.cfg
    assert (theirs.embed_dim, theirs.depth, theirs.num_heads, theirs.patch_size, theirs.layer_scale,
            theirs.norm_eps, theirs.pos_grid, theirs.pos_interp, theirs.mean, theirs.std) == (
        ours.embed_dim, ours.depth, ours.num_heads, ours.patch_size, True, 1e-6, (37, 37), "bicubic",
        ours.mean, ours.std)
    assert decoder.name == "mask" and info.n_cls == 11
    assert info.window == (336, 448) and info.stride == setup.stride
