"""Timing of the pruning method (pytest-benchmark; skipped unless run with
``pytest tests/bench --benchmark-enable`` / ``--benchmark-only``).

vit-s14 at CamVid's window (336 x 448, 24 x 32 tokens), random encoder weights and
random heads scaled so that a sizeable share of tokens exits; compares against the
``none`` method and against ``p0 > 1`` (pruning disabled: the overhead must be nil).
"""

from __future__ import annotations

import pytest
import torch

from algm.build import make_setup
from baselines.prune import TokenPruning

WINDOW = (336, 448)


def _model(method: str, **options):
    torch.manual_seed(0)
    setup = make_setup("vit-s14", "camvid", method, window=WINDOW, **options)
    model = setup.model.eval()
    if isinstance(model.method, TokenPruning):
        with torch.no_grad():
            for head in model.method.heads:  # confident random heads: many tokens exit
                head.linear.weight.normal_(0, 0.3)
    return model


def _images(batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, *WINDOW, generator=torch.Generator().manual_seed(batch))


CASES = {
    "none": ("none", {}),
    "prune-off": ("prune", {"p0": 2.0, "random_heads": True}),
    "prune-0.9": ("prune", {"p0": 0.9, "random_heads": True}),
}


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("case", list(CASES))
def test_forward(benchmark, case, batch):
    name, options = CASES[case]
    model = _model(name, **options)
    x = _images(batch)
    with torch.no_grad():
        out = model.run(x)
    benchmark.extra_info["tokens_after_last_block"] = out.tokens[:, -1].tolist()

    def forward():
        with torch.no_grad():
            return model(x)

    benchmark.pedantic(forward, rounds=5, warmup_rounds=2, iterations=1)
