"""The README's quick start and structure, and the custom-method example (docs/) runs and
keeps the invariants."""

import re
from pathlib import Path

import torch

from algm.config import DecoderConfig, ViTConfig
from algm.model.segmenter import build_segmenter

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
METHOD_DOC = ROOT / "docs" / "writing-a-method.md"


def readme_method():
    blocks = re.findall(r"```python\n(.*?)```", METHOD_DOC.read_text(), re.S)
    code = next(b for b in blocks if "class MergeOnePair" in b)
    namespace = {}
    exec(compile(code, str(METHOD_DOC), "exec"), namespace)
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


def test_readme_starts_with_the_two_commands_and_stays_short():
    text = README.read_text()
    block = re.findall(r"```bash\n(.*?)```", text, re.S)[0].splitlines()
    assert [line.split("#")[0].strip() for line in block] == ["make bench", "make test"]
    assert text.index("## What you get") < text.index("## Quick start") < text.index("## Reference table")
    assert "<!-- reference-table:start -->" in text and "<!-- reference-table:end -->" in text
    prose = re.sub(r"<!-- reference-table:start -->.*<!-- reference-table:end -->", "", text, flags=re.S)
    assert len(prose.split()) < 1500  # the pasted table is data, not reading


def test_readme_links_point_at_files():
    for link in re.findall(r"\]\(((?:docs|results)/[^)#]+)\)", README.read_text()):
        assert (ROOT / link).exists(), link
