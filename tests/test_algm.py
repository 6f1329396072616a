"""ALGM as a method of the Segmenter: config, invariants, batch policies, GFLOPs."""

from __future__ import annotations

import math

import pytest
import torch

from algm.algm import ALGM, DEFAULT_TAU, default_layers, parse_layers
from algm.config import DecoderConfig, ViTConfig, get_backbone, get_dataset
from algm.measure.flops import average_flops, count_flops
from algm.methods import build_method
from algm.model.segmenter import build_segmenter
from algm.reduction import NoReduction, TokenState
from tiny_inputs import textured_images

TINY = ViTConfig("tiny", 64, 6, 2, 16, pos_grid=(4, 4))
LAYERS = (1, 3)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_segmenter(TINY, 5, DecoderConfig("mask"), NoReduction()).eval()


images = textured_images


def algm(model, **kw):
    kw.setdefault("layers", LAYERS)
    return model.with_method(ALGM(**kw))


def run(model, x):
    with torch.no_grad():
        return model.run(x)


def encode(model, x):
    with torch.no_grad():
        return model.encoder(x, model.method)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("bad", [
    {"tau": float("nan")}, {"tau": float("inf")}, {"tau": "0.9"},
    {"layers": (5, 1)}, {"layers": (3, 3)}, {"layers": (0, 5)}, {"layers": (1, 5, 7)},
    {"layers": (1,)}, {"layers": (1.0, 5.0)}, {"layers": (1, 13)},
    {"batch_policy": "max"}, {"stages": "none"},
])
def test_bad_config_raises_a_clear_error(bad):
    with pytest.raises(ValueError, match=next(iter(bad)).replace("_", ".")):
        build_method("algm", get_backbone("vit-s16"), get_dataset("ade20k"), **bad)


def test_defaults_per_dataset_and_backbone():
    def make(backbone, dataset, **kw):
        return build_method("algm", get_backbone(backbone), get_dataset(dataset), **kw)

    assert make("vit-ti16", "ade20k").tau == 0.90
    assert make("vit-s16", "ade20k").tau == 0.88
    assert make("vit-b16", "ade20k").tau == 0.94
    assert make("vit-l16", "ade20k").tau == 0.95
    assert make("vit-s16", "cityscapes").tau == 0.955
    assert make("vit-s16", "pascal").tau == 0.88
    assert make("vit-b16", "cocostuff").tau == DEFAULT_TAU
    assert make("vit-s16", "ade20k").layers == (1, 5)
    assert make("vit-l16", "ade20k").layers == (1, 7)
    m = make("vit-s14", "camvid", tau=2, layers=[2, 4], batch_policy="per_image")
    assert (m.tau, m.layers, m.batch_policy) == (2.0, (2, 4), "per_image")
    assert m.settings() == {"tau": 2.0, "layers": "2,4", "batch_policy": "per_image", "stages": "both"}
    assert default_layers(6) == (1, 2) and default_layers(18) == (1, 8)
    assert parse_layers("1, 5") == (1, 5)
    assert math.isfinite(make("vit-s14", "camvid").tau)


# ---------------------------------------------------------------- invariants


def test_tau_above_one_local_only_equals_none_bit_for_bit(model):
    x = images()
    ref = run(model, x)
    out = run(algm(model, tau=1.5, stages="local"), x)
    assert torch.equal(out.logits, ref.logits)
    assert torch.equal(out.tokens, ref.tokens)
    # with the global stage on, the local stage still keeps every token; the adaptive
    # global threshold then merges on its own (as in the authors' code)
    both = run(algm(model, tau=1.5, batch_policy="per_image"), x)
    n = 1 + 4 * 6
    assert (both.tokens[:, : LAYERS[1] - 1] == n).all()
    assert (both.tokens[:, LAYERS[1] - 1] < n).all()


def test_tau_minus_one_merges_every_window(model):
    out = run(algm(model, tau=-1.0, stages="local"), images())
    assert (out.tokens == 1 + 6).all()  # 4x6 grid -> 6 windows


def check_state(state: TokenState) -> None:
    b, t, _ = state.x.shape
    counts = torch.zeros(b, t - 1).scatter_add_(1, state.source, torch.ones(state.source.shape))
    assert torch.equal(counts, state.size[:, 1:])
    alive = state.alive()
    assert ((counts > 0).sum(1) + 1).tolist() == alive.tolist()  # padding holds no patch


@pytest.mark.parametrize("policy", ["batch_min", "per_image"])
@pytest.mark.parametrize("tau", [0.9, -1.0])
def test_every_patch_maps_to_one_token_and_restore_gathers(model, policy, tau):
    m = algm(model, tau=tau, batch_policy=policy)
    x = images()
    state, tokens = encode(m, x)
    check_state(state)
    assert torch.equal(tokens[:, -1], state.alive())
    keep = None if state.keep is None else state.keep[:, 1:]
    with torch.no_grad():
        token_out = m.decoder(state.x[:, 1:], keep)
        restored = m.method.restore(token_out, state)
    for b in range(x.shape[0]):
        for n in range(state.source.shape[1]):
            assert torch.equal(restored[b, n], token_out[b, state.source[b, n]])
    assert torch.equal(run(m, x).token_logits, restored)


def test_batch_min_equals_per_image_on_identical_images(model):
    x = images("same")
    a = run(algm(model, tau=0.9, batch_policy="batch_min"), x)
    b = run(algm(model, tau=0.9, batch_policy="per_image"), x)
    assert (a.tokens[:, -1] < a.tokens[:, 0]).all()  # it did merge
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.logits, b.logits)


def test_per_image_merges_at_least_as_much_on_a_mixed_batch(model):
    x = images()
    a = run(algm(model, tau=0.9, batch_policy="batch_min"), x)
    b = run(algm(model, tau=0.9, batch_policy="per_image"), x)
    assert (b.tokens <= a.tokens).all()
    assert (b.tokens[:, 0] < a.tokens[:, 0]).any()  # the mixed batch did differ
    assert len(set(b.tokens[:, 0].tolist())) > 1


@pytest.mark.parametrize("hw", [(64, 96), (80, 48)])
def test_per_image_batch_equals_each_image_alone(model, hw):
    m = algm(model, tau=0.9, batch_policy="per_image")
    x = images(hw=hw)
    batch = run(m, x)
    for i in range(x.shape[0]):
        alone = run(m, x[i: i + 1])
        assert torch.equal(batch.tokens[i], alone.tokens[0])
        torch.testing.assert_close(batch.logits[i], alone.logits[0], atol=1e-5, rtol=1e-5)


def test_square_rectangular_and_odd_grids(model):
    # even rectangular grid 4x6 covered above; square 4x4 and odd 5x3 here
    for hw, windows in (((64, 64), 4), ((80, 48), 2)):
        out = run(algm(model, tau=-1.0, stages="local"), images(hw=hw))
        n = (hw[0] // 16) * (hw[1] // 16)
        assert (out.tokens == 1 + n - 3 * windows).all()
        assert out.logits.shape[-2:] == hw
    state, _ = encode(algm(model, tau=-1.0, stages="local"), images(hw=(80, 48)))
    # 5x3 grid: windows cover rows 0-3 x cols 0-1; the last row and column stay
    assert state.source[0].reshape(5, 3)[:, 2].tolist() == [2, 3, 4, 5, 8]
    assert state.source[0].reshape(5, 3)[4].tolist() == [6, 7, 8]


# ---------------------------------------------------------------- GFLOPs


def test_gflops_trace_through_algm(model):
    m = algm(model, tau=0.9, batch_policy="per_image")
    x = images()
    calls = []

    def signature(image):
        calls.append(image)
        with torch.no_grad():
            return tuple(m.run(image).tokens[0].tolist())

    # flat, noise, flat again: the third image reuses the first trace (same signature)
    mean, per_image = average_flops(m, [x[0:1], x[1:2], x[0:1]], signature=signature)
    base = count_flops(model, x[:1])
    assert len(calls) == 3 and per_image[0] == per_image[2]
    assert per_image[0] < per_image[1] < base  # the flat image merges most
    assert mean == pytest.approx(sum(per_image) / 3)
