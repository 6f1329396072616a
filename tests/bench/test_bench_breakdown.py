"""Timing of the fixed stages of a Segmenter forward (pytest-benchmark; skipped unless run
with ``--benchmark-enable`` or ``--benchmark-only``), so that ``make bench-regress``
catches a slower stage (issue 15):

* patch embed (conv, position embedding, cls) and the upsample of the logit maps,
  ViT-S/16 at 512 x 512 with 150 classes (ADE20K) and ViT-S/14 at CamVid's 336 x 448
  with 11 classes, batch 1 and 4;
* the mask-transformer decoder on the unreduced tokens of both;
* restore: the gather of merged tokens' logits back to the patch grid;
* the sliding-window accumulation of evaluation: a 512 x 683 ADE20K image (2 windows,
  150 classes) and a 1024 x 2048 Cityscapes frame (8 windows of 768, 19 classes), with a
  model that returns fixed channels-last logits (the Segmenter's layout), so only the
  accumulation is timed; also mixed batches (batched suite rows): 8 CamVid frames of one
  window each, and 4 ADE20K images of 2 windows, every window in one call.

Random weights: timings do not depend on them.
"""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch

from algm.build import make_setup
from algm.evaluate import slide_inference, slide_inference_many
from algm.model.segmenter import upsample_patch_logits
from algm.reduction import TokenState, gather_tokens

CASES = {"ade20k": ("vit-s16", "ade20k"), "camvid": ("vit-s14", "camvid")}


@lru_cache(maxsize=None)
def _setup(case: str):
    torch.manual_seed(0)
    setup = make_setup(*CASES[case])
    setup.model.eval()
    return setup


def _images(case: str, batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, *_setup(case).window, generator=torch.Generator().manual_seed(batch))


def _bench(benchmark, fn, rounds: int = 10):
    def step():
        with torch.no_grad():
            return fn()

    benchmark.pedantic(step, rounds=rounds, warmup_rounds=2, iterations=1)


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("case", list(CASES))
def test_patch_embed(benchmark, case, batch):
    encoder, x = _setup(case).model.encoder, _images(case, batch)

    def embed():
        patches, ctx = encoder.embed(x)
        return encoder.add_cls(TokenState.identity(patches, ctx.grid))

    _bench(benchmark, embed)


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("case", list(CASES))
def test_upsample(benchmark, case, batch):
    setup = _setup(case)
    h, w = setup.grid
    per_patch = torch.randn(batch, h * w, setup.dataset.n_cls)
    _bench(benchmark, lambda: upsample_patch_logits(per_patch, setup.grid, setup.window))


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("case", list(CASES))
def test_decoder(benchmark, case, batch):
    setup = _setup(case)
    h, w = setup.grid
    tokens = torch.randn(batch, h * w, setup.backbone.embed_dim)
    _bench(benchmark, lambda: setup.model.decoder(tokens, None))


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("case", list(CASES))
def test_restore(benchmark, case, batch):
    """Half the patches share a token (a merge of pairs), the rest keep their own."""
    setup = _setup(case)
    n = setup.grid[0] * setup.grid[1]
    order = torch.arange(n)
    source = torch.where(order < n // 2, order // 2, order - n // 4).expand(batch, n)
    token_out = torch.randn(batch, n - n // 4, setup.dataset.n_cls)
    _bench(benchmark, lambda: gather_tokens(token_out, source))


class FixedLogits(torch.nn.Module):
    """(k, 3, h, w) windows -> the first k of fixed channels-last (K, n_cls, h, w) logits."""

    def __init__(self, k: int, n_cls: int, window: tuple[int, int]):
        super().__init__()
        logits = torch.randn(k, n_cls, *window, generator=torch.Generator().manual_seed(0))
        self.logits = logits.contiguous(memory_format=torch.channels_last)

    def forward(self, x):
        return self.logits[: x.shape[0]]


@pytest.mark.parametrize("case", ["ade20k-512x683", "cityscapes-1024x2048"])
def test_slide_accumulation(benchmark, case):
    if case.startswith("ade20k"):
        size, window, stride, n_cls = (512, 683), (512, 512), (480, 480), 150
    else:
        size, window, stride, n_cls = (1024, 2048), (768, 768), (512, 512), 19
    model, image = FixedLogits(8, n_cls, window), torch.zeros(1, 3, *size)
    _bench(benchmark, lambda: slide_inference(model, image, window, stride, n_cls), rounds=5)


@pytest.mark.parametrize("case", ["camvid-8x336x448", "ade20k-4x512x683"])
def test_slide_accumulation_of_a_mixed_batch(benchmark, case):
    if case.startswith("camvid"):
        n, size, window, stride, n_cls = 8, (336, 448), (336, 448), (304, 416), 11
    else:
        n, size, window, stride, n_cls = 4, (512, 683), (512, 512), (480, 480), 150
    model, images = FixedLogits(8, n_cls, window), [torch.zeros(1, 3, *size)] * n
    _bench(benchmark, lambda: slide_inference_many(model, images, window, stride, n_cls), rounds=5)
