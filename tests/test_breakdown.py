"""Per-stage breakdown of a Segmenter forward (algm.measure.breakdown)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from algm.algm import ALGM
from algm.cli import main
from algm.config import DecoderConfig, ViTConfig
from algm.measure.breakdown import measure_breakdown, speedup_bound, time_stages
from algm.model.segmenter import build_segmenter
from algm.reduction import NoReduction, TokenReduction

TINY = ViTConfig("tiny", 64, 3, 2, 16, pos_grid=(4, 4))


def tiny(method: TokenReduction | None = None):
    torch.manual_seed(0)
    return build_segmenter(TINY, 5, DecoderConfig("mask"), method).eval()


def images() -> torch.Tensor:
    """Two random (3, 64, 96) images (ALGM at tau 0 merges in both stages)."""
    return torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))


class MergeLastPair(TokenReduction):
    """Merges the last two patch tokens after block ``layer`` (0-based; tests only)."""

    name = "pair"

    def __init__(self, layer: int):
        super().__init__()
        self.layer = layer

    def after_block(self, state, layer):
        if layer != self.layer:
            return state
        x = torch.cat([state.x[:, :-2], state.x[:, -2:].mean(1, keepdim=True)], 1)
        size = torch.cat([state.size[:, :-2], state.size[:, -2:].sum(1, keepdim=True)], 1)
        return state.replace(x=x, size=size, source=state.source.clamp(max=x.shape[1] - 2))


def layout(stages) -> list[tuple[str, str]]:
    return [(s.name, s.kind) for s in stages]


@pytest.mark.parametrize("method", [NoReduction(), ALGM(tau=0.0, layers=(1, 2)), MergeLastPair(0)])
def test_stepped_forward_is_the_models_forward(method):
    model, x = tiny(method), images()
    with torch.no_grad():
        out, stages = time_stages(model, x)
        ref = model.run(x)
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.tokens, ref.tokens)
    assert torch.equal(out.token_logits, ref.token_logits)
    assert all(s.seconds >= 0 for s in stages) and math.isclose(sum(s.share for s in stages), 1.0)


def test_none_has_no_method_stage_and_no_overhead():
    result = measure_breakdown(tiny(), images(), warmup=1, repeats=3)
    assert layout(result.stages) == [("patch embed", "fixed"), ("blocks 1-3", "encoder"),
                                     ("decoder", "decoder"), ("restore", "fixed"), ("upsample", "fixed")]
    assert result.overhead_share == 0.0
    assert math.isclose(sum(s.share for s in result.stages), 1.0)
    assert math.isclose(sum(s.seconds for s in result.stages), result.forward_s)
    assert 0 < result.fixed_share < 1 and result.batch_size == 2 and result.repeats == 3


def test_algm_merge_steps_are_stages_between_block_groups():
    model = tiny(ALGM(tau=0.0, layers=(1, 2)))
    x = images()
    with torch.no_grad():
        tokens = model.run(x).tokens
    assert tokens[:, 0].lt(1 + 24).all() and tokens[:, 1].lt(tokens[:, 0]).all()  # both stages merged
    result = measure_breakdown(model.train(), x, warmup=0, repeats=2)
    assert model.training  # the flag is restored
    assert layout(result.stages) == [
        ("patch embed", "fixed"), ("block 1.attn", "encoder"), ("algm mid_block 1", "method"),
        ("blocks 1.mlp-2.attn", "encoder"), ("algm mid_block 2", "method"), ("blocks 2.mlp-3", "encoder"),
        ("decoder", "decoder"), ("restore", "fixed"), ("upsample", "fixed")]
    method = sum(s.share for s in result.stages if s.kind == "method")
    assert result.overhead_share == method > 0
    assert math.isclose(sum(s.share for s in result.stages), 1.0)


def test_after_block_steps_split_at_whole_blocks_and_the_norm_stands_alone():
    with torch.no_grad():
        _, first = time_stages(tiny(MergeLastPair(0)), images())
        _, last = time_stages(tiny(MergeLastPair(2)), images())
    assert layout(first)[1:4] == [("block 1", "encoder"), ("pair after_block 1", "method"),
                                  ("blocks 2-3", "encoder")]
    assert layout(last)[1:4] == [("blocks 1-3", "encoder"), ("pair after_block 3", "method"),
                                 ("norm", "encoder")]


def test_proportional_bias_is_one_method_stage():
    class Biased(TokenReduction):
        name = "biased"

        def attn_bias(self, state, layer):
            return torch.zeros(state.x.shape[0], 1, 1, state.num_tokens)

    with torch.no_grad():
        _, stages = time_stages(tiny(Biased()), images())
    assert layout(stages)[:3] == [("patch embed", "fixed"), ("biased attn_bias", "method"),
                                  ("blocks 1-3", "encoder")]


def test_changing_steps_between_forwards_is_an_error():
    class Alternating(MergeLastPair):
        calls = 0

        def after_block(self, state, layer):
            Alternating.calls += layer == 0
            return super().after_block(state, layer) if Alternating.calls % 2 else state

    with pytest.raises(ValueError, match="differ between forwards"):
        measure_breakdown(tiny(Alternating(0)), images(), warmup=0, repeats=2)


def test_speedup_bound_is_amdahl():
    assert speedup_bound(0.0, 2.0) == pytest.approx(2.0)
    assert speedup_bound(0.2, 2.0) == pytest.approx(1 / (0.2 + 0.8 / 2))
    assert speedup_bound(0.3, 1.0) == pytest.approx(1.0)
    # fixed GFLOPs left out of the scaling part: the blocks shrink more than the total
    assert speedup_bound(0.2, 2.0, 0.1) == pytest.approx(1 / (0.2 + 0.8 * (0.5 - 0.1) / 0.9))
    result = measure_breakdown(tiny(), images(), warmup=0, repeats=1)
    assert result.bound(2.0) == pytest.approx(speedup_bound(result.fixed_share, 2.0))
    assert result.to_dict()["overhead_share"] == 0.0 and len(result.to_dict()["stages"]) == 5
    with pytest.raises(ValueError, match="fixed_share"):
        speedup_bound(1.0, 2.0)
    with pytest.raises(ValueError, match="gflops_ratio"):
        speedup_bound(0.1, 2.0, 0.6)


def test_throughput_command_prints_the_breakdown(tmp_path, capsys):
    """``algm-bench throughput --breakdown`` on two fake CamVid frames, ViT-S/16 at 64 x 64."""
    (tmp_path / "val").mkdir()
    (tmp_path / "valannot").mkdir()
    (tmp_path / "val.txt").write_text("a\nb\n")
    for name in "ab":
        Image.fromarray(np.full((72, 96, 3), 90, np.uint8)).save(tmp_path / "val" / f"{name}.jpg")
        Image.fromarray(np.zeros((72, 96), np.uint8)).save(tmp_path / "valannot" / f"{name}.png")
    argv = ["throughput", "--backbone", "vit-s16", "--crop", "64", "--method", "algm", "--batch-size", "2",
            "--warmup", "0", "--repeats", "1", "--device", "cpu", "--data-root", str(tmp_path), "--breakdown"]
    assert main(argv + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["backbone"], out["dataset"], out["crop"]) == ("vit-s16", "camvid", [64, 64])
    stages = out["breakdown"]["stages"]
    assert stages[0]["name"] == "patch embed" and stages[-1]["name"] == "upsample"
    assert math.isclose(sum(s["share"] for s in stages), 1.0)
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "  stages (median of 1 stepped forwards" in text and "method overhead" in text
    assert main(argv + ["--compile"]) == 2 and "drop --compile" in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_breakdown_on_cuda_reproduces_the_forward():
    model = tiny(ALGM(tau=0.0, layers=(1, 2))).cuda()
    x = images().cuda()
    with torch.no_grad():
        out, _ = time_stages(model, x)
        assert torch.equal(out.logits, model.run(x).logits)
    result = measure_breakdown(model, x, warmup=1, repeats=2)
    assert result.device.startswith("cuda") and result.overhead_share > 0
