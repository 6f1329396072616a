"""The method contract, checked for every registered method, built-in or new: each is
built at its defaults (plus ``untrained_options``, so no trained part is needed) on a
tiny random ViT, and run on a batch of different images."""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch

from algm.config import DatasetSpec, DecoderConfig, ViTConfig
from algm.measure.flops import count_flops, uncounted_ops
from algm.methods import build_method, method_class, methods
from algm.model.segmenter import build_segmenter

# 12 blocks (so every method's 12-block defaults apply), a 6 x 8 grid (even sides)
CFG = ViTConfig("tiny", 64, 12, 2, 16, pos_grid=(6, 8))
SPEC = DatasetSpec("toy", 5, 255, (96, 128))
H, W = 96, 128


def build(name: str, **options):
    cls = method_class(name)
    method = build_method(name, CFG, SPEC, **{**cls.untrained_options, **options})
    torch.manual_seed(0)
    return build_segmenter(CFG, SPEC.n_cls, DecoderConfig("mask"), method).eval()


def images(n: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, H, W, generator=g)
    x[-1, :, :48] = 0.5  # a flat half: content-adaptive methods reduce it more
    return x


def has_option(name: str, option: str) -> bool:
    return option in {f.name for f in fields(method_class(name).Config)}


@pytest.fixture(params=sorted(methods()))
def name(request) -> str:
    return request.param


def test_restore_covers_every_patch_and_sizes_count_the_patches(name):
    model = build(name)
    with torch.no_grad():
        state, tokens = model.encoder(images(), model.method)
        out = model.run(images())
    n = H // 16 * W // 16
    assert out.logits.shape == (3, SPEC.n_cls, H, W) and torch.isfinite(out.logits).all()
    assert out.token_logits.shape == (3, n, SPEC.n_cls)
    held = model.method.token_map(state)  # (B, N), -1 where no token holds a patch
    assert held.shape == (3, n) and held.min() >= -1 and held.max() < state.num_tokens - state.prefix
    real = torch.ones_like(state.size[:, state.prefix:], dtype=torch.bool) if state.keep is None \
        else state.keep[:, state.prefix:]
    assert not held[held >= 0].eq(-1).any()
    held_sizes = (state.size[:, state.prefix:] * real).sum(1) + held.eq(-1).sum(1)
    assert torch.allclose(held_sizes, torch.full_like(held_sizes, float(n)), atol=1e-3)
    assert (tokens[:, -1] <= 1 + n).all()


def test_padding_never_counts_and_per_image_ignores_the_neighbours(name):
    if not has_option(name, "batch_policy"):
        pytest.skip(f"{name} has no batch policy: every image of a batch keeps the same count")
    try:
        model = build(name, batch_policy="per_image")
    except ValueError as err:  # e.g. a policy of one variant only
        pytest.skip(f"{name} at its defaults takes no per_image policy: {err}")
    x = images()
    with torch.no_grad():
        together = model.run(x).logits
        alone = torch.cat([model.run(x[i:i + 1]).logits for i in range(len(x))])
    assert torch.allclose(together, alone, atol=1e-4)


def test_gflops_are_counted_with_no_unsupported_op(name):
    model, base = build(name), build("none")
    x = images(1)
    assert uncounted_ops(model, x) == {}
    assert count_flops(model, x) <= count_flops(base, x) * 1.02  # a method's own steps are counted, cheap


def test_identity_names_the_method_and_its_settings(name):
    method = build(name).method
    identity = method.identity()
    assert identity["method"] == name and identity["settings"] == method.settings()
    assert set(identity["trained"]) == set(method.trained_parts())
