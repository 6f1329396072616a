"""The custom-method example in the README runs and keeps the invariants."""

import re
from pathlib import Path

import torch

from algm.config import DecoderConfig, ViTConfig
from algm.model.segmenter import build_segmenter

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_method():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    code = next(b for b in blocks if "class MergeOnePair" in b)
    namespace = {}
    exec(compile(code, str(README), "exec"), namespace)
    return namespace["MergeOnePair"]


def test_readme_example_merges_one_pair_and_restores_the_grid(isolated_registry):
    torch.manual_seed(0)
    cfg = ViTConfig("tiny", 64, 5, 2, 16, pos_grid=(4, 4))
    model = build_segmenter(cfg, 3, DecoderConfig("mask"), readme_method()(layer=3)).eval()
    with torch.no_grad():
        out = model.run(torch.randn(2, 3, 64, 64))
        state, _ = model.encoder(torch.randn(2, 3, 64, 64), model.method)
    assert out.tokens[:, 3].tolist() == [16, 16] and out.tokens[:, 2].tolist() == [17, 17]
    assert out.logits.shape == (2, 3, 64, 64)
    counts = torch.zeros_like(state.size[:, 1:]).scatter_add_(
        1, state.source, torch.ones_like(state.source, dtype=state.size.dtype))
    assert torch.equal(counts, state.size[:, 1:])
    assert state.size[:, 1:].sum(1).tolist() == [16, 16]
