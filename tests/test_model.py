"""The segmenter and its token-reduction hook points."""

import pytest
import torch
import torch.nn.functional as F

from algm.build import make_setup
from algm.config import DecoderConfig, ViTConfig, check_window, get_backbone, get_dataset, parse_crop
from algm.model.segmenter import build_segmenter, upsample_patch_logits
from algm.reduction import NoReduction, TokenReduction

TINY = ViTConfig("tiny", 64, 3, 2, 16, pos_grid=(4, 4))


def tiny(decoder="mask", method=None, layer_scale=False, n_cls=5):
    torch.manual_seed(0)
    cfg = ViTConfig("tiny", 64, 3, 2, 16, pos_grid=(4, 4), layer_scale=layer_scale)
    return build_segmenter(cfg, n_cls, DecoderConfig(decoder), method).eval()


@pytest.mark.parametrize("decoder", ["mask", "linear"])
def test_forward_shapes_and_token_counts(decoder):
    model = tiny(decoder)
    out = model.run(torch.randn(2, 3, 64, 96))
    assert out.logits.shape == (2, 5, 64, 96)
    assert out.token_logits.shape == (2, 4 * 6, 5)
    assert out.tokens.tolist() == [[25, 25, 25]] * 2


def test_base_method_restore_by_gather_equals_none():
    """The generic hooks (identity + gather restore) reproduce the baseline exactly."""
    model = tiny(layer_scale=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        base = model(x)
        generic = model.with_method(TokenReduction())(x)
    assert torch.equal(base, generic)


class Recorder(TokenReduction):
    """Logs every hook call (tests only)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def begin(self, patches, ctx):
        self.calls.append(("begin", tuple(patches.shape), ctx.grid))
        return super().begin(patches, ctx)

    def attn_bias(self, state, layer):
        self.calls.append(("attn_bias", layer))
        return super().attn_bias(state, layer)

    def mid_block(self, state, layer, attn):
        self.calls.append(("mid_block", layer, tuple(attn.keys.shape)))
        return state

    def after_block(self, state, layer):
        self.calls.append(("after_block", layer))
        return state

    def restore(self, token_out, state):
        self.calls.append(("restore", tuple(token_out.shape)))
        return super().restore(token_out, state)


def test_hooks_are_called_in_documented_order():
    rec = Recorder()
    tiny(method=rec)(torch.randn(1, 3, 32, 64))
    expected = [("begin", (1, 8, 64), (2, 4))]
    for i in range(3):
        expected += [("attn_bias", i), ("mid_block", i, (1, 2, 9, 32)), ("after_block", i)]
    expected.append(("restore", (1, 8, 5)))
    assert rec.calls == expected


class DropLast(TokenReduction):
    """Merges the last two patch tokens into one after block 0 (tests only)."""

    def after_block(self, state, layer):
        if layer != 0:
            return state
        x = torch.cat([state.x[:, :-2], state.x[:, -2:].mean(1, keepdim=True)], 1)
        size = torch.cat([state.size[:, :-2], state.size[:, -2:].sum(1, keepdim=True)], 1)
        source = state.source.clamp(max=x.shape[1] - 2)
        return state.replace(x=x, size=size, source=source)


def test_reduction_changes_token_count_and_restores_full_grid():
    model = tiny(method=DropLast())
    out = model.run(torch.randn(2, 3, 32, 32))
    assert out.tokens[:, 0].tolist() == [4, 4]
    assert out.tokens[:, 1:].eq(4).all()
    assert out.token_logits.shape == (2, 4, 5)
    assert torch.equal(out.token_logits[:, 2], out.token_logits[:, 3])


def test_padding_mask_hides_tokens_from_attention():
    """A token with keep=False changes nothing for the others."""

    class PadOne(TokenReduction):
        def begin(self, patches, ctx):
            state = super().begin(patches, ctx)
            junk = torch.randn_like(patches[:, :1]) * 100
            keep = torch.ones(patches.shape[:2], dtype=torch.bool)
            return state.replace(x=torch.cat([patches, junk], 1), size=torch.cat([state.size, state.size[:, :1]], 1),
                                 keep=torch.cat([keep, keep[:, :1] & False], 1))

    model = tiny()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        base = model(x)
        padded = model.with_method(PadOne())(x)
    assert torch.allclose(base, padded, atol=1e-5)


def test_pos_embed_is_resized_to_the_input_grid():
    model = tiny()
    assert model.encoder.patch_pos((4, 4)).shape == (1, 16, 64)
    assert model.encoder.patch_pos((3, 5)).shape == (1, 15, 64)
    assert torch.equal(model.encoder.patch_pos((4, 4)), model.encoder.pos_embed[:, 1:])


def test_bad_input_sizes_and_names():
    with pytest.raises(ValueError, match="not divisible by the patch size 16"):
        tiny()(torch.randn(1, 3, 40, 32))
    with pytest.raises(ValueError, match="unknown backbone 'vit-xl'.*vit-s14"):
        get_backbone("vit-xl")
    with pytest.raises(ValueError, match="unknown dataset 'voc'"):
        get_dataset("voc")
    with pytest.raises(ValueError, match="crop must be"):
        parse_crop("12x")
    with pytest.raises(ValueError, match="unknown decoder"):
        DecoderConfig("fpn")
    with pytest.raises(ValueError, match="not divisible"):
        make_setup("vit-s14", "ade20k")


def test_window_sizes():
    assert get_dataset("camvid").window(14) == (336, 448)
    assert get_dataset("camvid").window(16) == (384, 512)
    assert get_dataset("ade20k").window(16) == (512, 512)
    assert check_window((336, 448), 14) == (24, 32)
    assert parse_crop("336x448") == (336, 448) and parse_crop("512") == (512, 512)


def test_none_method_is_identity_restore():
    t = torch.randn(2, 6, 3)
    assert NoReduction().restore(t, None) is t


def test_every_piece_of_the_forward_runs_through_the_stage_in_order():
    pieces = []

    def stage(name, layer, fn, *args):
        pieces.append((name, layer))
        return fn(*args)

    model, x = tiny(), torch.randn(1, 3, 32, 64)
    with torch.no_grad():
        assert torch.equal(model.run(x, stage=stage).logits, model(x))
    blocks = [(name, i) for i in range(3) for name in ("attn_bias", "attend", "mid_block", "feed", "after_block")]
    assert pieces == ([("embed", None), ("begin", None), ("cls", None)] + blocks
                      + [("norm", None), ("before_decoder", None), ("decoder", None), ("restore", None),
                         ("upsample", None)])


@pytest.mark.parametrize("batch", [1, 2])
def test_upsample_is_bilinear_on_the_patch_maps_and_channels_last(batch):
    per_patch = torch.randn(batch, 3 * 4, 5)
    out = upsample_patch_logits(per_patch, (3, 4), (48, 64))
    maps = per_patch.transpose(1, 2).reshape(batch, 5, 3, 4).contiguous()
    torch.testing.assert_close(out, F.interpolate(maps, size=(48, 64), mode="bilinear", align_corners=False))
    assert out.is_contiguous(memory_format=torch.channels_last)  # the fast kernel's layout
