"""Timing of the ToMe and CTS baselines (pytest-benchmark; skipped unless run with
``pytest tests/bench --benchmark-enable`` / ``--benchmark-only``).

vit-s14 at CamVid's window (336 x 448, 24 x 32 tokens), random weights: whole-model
forwards against ``none`` and with the reduction switched off (r=0, k=0: the overhead
must be nil), plus the merge / sharing kernels alone on ViT-S-sized tensors.
"""

from __future__ import annotations

import pytest
import torch

from algm.build import make_setup
from algm.reduction import EncoderContext, TokenState
from baselines.cts import CTS
from baselines.tome import bipartite_soft_matching, merge_state

WINDOW = (336, 448)

CASES = {
    "none": ("none", {}),
    "tome-r0": ("tome", {"r": 0}),
    "tome-r16": ("tome", {"r": 16}),
    "tome-r32": ("tome", {"r": 32}),
    "cts-k0": ("cts", {"k": 0}),
    "cts-variance": ("cts", {}),
    "cts-variance-0.6": ("cts", {"k_ratio": 0.6}),
}


def _images(batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, *WINDOW, generator=torch.Generator().manual_seed(batch))


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("case", list(CASES))
def test_forward(benchmark, case, batch):
    name, options = CASES[case]
    torch.manual_seed(0)
    model = make_setup("vit-s14", "camvid", name, window=WINDOW, **options).model.eval()
    x = _images(batch)
    with torch.no_grad():
        out = model.run(x)
    benchmark.extra_info["tokens_after_last_block"] = out.tokens[:, -1].tolist()

    def forward():
        with torch.no_grad():
            return model(x)

    benchmark.pedantic(forward, rounds=5, warmup_rounds=2, iterations=1)


@pytest.mark.parametrize("r", [16, 64])
def test_tome_merge_kernel(benchmark, r):
    """One ToMe step on (8, 769, 384) tokens: matching + size-weighted merge + index map."""
    g = torch.Generator().manual_seed(0)
    b, n, d = 8, 768, 384
    state = TokenState(x=torch.randn(b, n + 1, d, generator=g), size=torch.ones(b, n + 1),
                       source=torch.arange(n).expand(b, n), grid=(24, 32))
    keys = torch.randn(b, 6, n + 1, d // 6, generator=g)

    def step():
        with torch.no_grad():
            return merge_state(state, bipartite_soft_matching(keys.mean(1), r))

    benchmark.pedantic(step, rounds=20, warmup_rounds=3, iterations=1)


def test_cts_begin(benchmark):
    """CTS selection + sharing (variance policy) on a batch of 8 CamVid windows."""
    torch.manual_seed(0)
    setup = make_setup("vit-s14", "camvid", "none", window=WINDOW)
    enc = setup.model.encoder
    x = _images(8)
    with torch.no_grad():
        pos = enc.patch_pos((24, 32))
        patches = enc.patch_embed(x) + pos
    ctx = EncoderContext(images=x, grid=(24, 32), patch_size=14, pos=pos,
                         embed=lambda px: enc.patch_embed(px)[:, 0], depth=enc.depth)
    method = CTS("variance", k=77)

    def begin():
        with torch.no_grad():
            return method.begin(patches, ctx)

    benchmark.pedantic(begin, rounds=20, warmup_rounds=3, iterations=1)
