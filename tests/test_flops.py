"""GFLOPs: the published Segmenter baselines and the SDPA handle."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from algm.build import make_setup
from algm.measure.flops import count_flops

# SPEC section 4: Segmenter + mask decoder, fvcore at batch 1.
PUBLISHED = [
    ("vit-ti16", "ade20k", None, 12.8),
    ("vit-s16", "ade20k", None, 38.6),
    ("vit-b16", "ade20k", None, 130.0),
    ("vit-l16", "ade20k", (640, 640), 672.0),
    ("vit-s16", "cityscapes", None, 116.0),
    ("vit-s16", "pascal", None, 32.1),
]


@pytest.mark.parametrize("backbone,dataset,window,published", PUBLISHED)
def test_segmenter_baseline_gflops_match_published(backbone, dataset, window, published):
    setup = make_setup(backbone, dataset, window=window)
    h, w = setup.window
    gflops = count_flops(setup.model, torch.randn(1, 3, h, w))
    assert gflops == pytest.approx(published, rel=0.005)


class ExplicitAttention(nn.Module):
    def forward(self, q, k, v):
        return (q @ k.transpose(-2, -1)).softmax(-1) @ v


class FusedAttention(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("lq,lk,e,ev", [(7, 7, 8, 8), (5, 11, 4, 6)])
def test_sdpa_handle_equals_explicit_matmuls(lq, lk, e, ev):
    q, k, v = torch.randn(2, 3, lq, e), torch.randn(2, 3, lk, e), torch.randn(2, 3, lk, ev)
    explicit = count_flops(ExplicitAttention(), (q, k, v))
    assert explicit > 0
    assert count_flops(FusedAttention(), (q, k, v)) == explicit
    assert explicit * 1e9 == 2 * 3 * lq * lk * (e + ev)


def test_count_does_not_depend_on_weights():
    a = make_setup("vit-ti16", "pascal").model
    b = make_setup("vit-ti16", "pascal").model
    x = torch.randn(1, 3, 480, 480)
    assert count_flops(a, x) == count_flops(b, x)
