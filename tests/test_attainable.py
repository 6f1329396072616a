"""The zero-cost reduction behind the attainable speed-up, and its GFLOPs match."""

import pytest
import torch

from algm.config import DecoderConfig, ViTConfig
from algm.measure.attainable import ZeroCostReduction, matched_tokens
from algm.measure.flops import count_flops
from algm.model.segmenter import build_segmenter
from algm.reduction import EncoderContext


def tiny():
    torch.manual_seed(0)
    cfg = ViTConfig("tiny", 64, 3, 2, 16, pos_grid=(4, 4), layer_scale=True)
    return build_segmenter(cfg, 5, DecoderConfig("mask")).eval()


def test_keeping_every_token_is_the_baseline_bit_for_bit():
    model = tiny()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(model.with_method(ZeroCostReduction(24))(x), model(x))
        assert torch.equal(model.with_method(ZeroCostReduction(100))(x), model(x))  # k capped at N


def test_kept_tokens_are_spread_and_every_patch_restores_from_the_one_at_or_before_it():
    model = tiny()
    x = torch.randn(2, 3, 64, 96)  # 4 x 6 = 24 patches
    method = ZeroCostReduction(5)
    with torch.no_grad():
        out = model.with_method(method).run(x)
        patches = torch.randn(2, 24, 64)
        state = method.begin(patches, EncoderContext(images=None, grid=(4, 6), patch_size=16, pos=None,
                                                     embed=None, depth=3))
    assert out.tokens.tolist() == [[6, 6, 6]] * 2  # 5 patches + cls after every block
    kept = [0, 4, 9, 14, 19]  # floor(i * 24 / 5)
    assert torch.equal(state.x, patches[:, kept])
    expected = [sum(k <= n for k in kept) - 1 for n in range(24)]
    assert state.source.tolist() == [expected] * 2
    assert state.size.tolist() == [[4.0, 5.0, 5.0, 5.0, 5.0]] * 2 and state.size.sum(1).tolist() == [24.0] * 2
    # per patch, the logits of its kept token: 5 distinct rows, shared within each run
    assert len(torch.unique(out.token_logits[0], dim=0)) == 5
    assert torch.equal(out.token_logits, out.token_logits[:, [kept[t] for t in expected]])


def test_matched_tokens_is_the_largest_k_within_the_gflops():
    model = tiny()
    image = torch.randn(1, 3, 64, 96)

    def gflops(k):
        return count_flops(model.with_method(ZeroCostReduction(k)), image)

    target = (count_flops(model, image) + gflops(1)) / 2
    k = matched_tokens(model, image, target)
    assert 1 <= k < 24 and gflops(k) <= target < gflops(k + 1)
    assert matched_tokens(model, image, count_flops(model, image)) == 24
    assert matched_tokens(model, image, 0.0) == 1
    assert model.training is False  # counting left the shared modules in eval mode


def test_a_reduction_keeps_at_least_one_token():
    with pytest.raises(ValueError, match="keeps at least 1 token, got 0"):
        ZeroCostReduction(0)
