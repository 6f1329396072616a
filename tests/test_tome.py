"""ToMe baseline: matching, merging, index map, proportional attention, schedules, errors."""

import math

import pytest
import torch

from algm.config import DecoderConfig, ViTConfig, get_dataset
from algm.methods import build_method
from algm.model.segmenter import build_segmenter
from algm.reduction import TokenState
from baselines.tome import ToMe, bipartite_soft_matching, merge_state, parse_r
from tiny_inputs import noise_images

CAMVID = get_dataset("camvid")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(method=None, depth=4, decoder="mask"):
    torch.manual_seed(0)
    cfg = ViTConfig("tiny", 64, depth, 2, 16, pos_grid=(4, 6))
    return build_segmenter(cfg, 5, DecoderConfig(decoder), method).eval(), cfg


images = noise_images


def final_state(model, x):
    with torch.no_grad():
        return model.encoder(x, model.method)


def check_index_map(state: TokenState, n: int):
    """Every patch maps to exactly one patch token; sizes count the patches per token."""
    t = state.num_tokens - 1
    assert state.source.shape[1] == n
    assert int(state.source.min()) >= 0 and int(state.source.max()) < t
    counts = torch.stack([torch.bincount(s, minlength=t) for s in state.source]).to(state.size.dtype)
    assert torch.equal(state.size[:, 1:], counts)
    assert torch.equal(state.size[:, 0], torch.ones_like(state.size[:, 0]))


# ------------------------------------------------------------------ no reduction


@pytest.mark.parametrize("decoder", ["mask", "linear"])
@pytest.mark.parametrize("opts", [{"r": 0}, {"schedule": "0,0"}, {"reduction": 0.0},
                                  {"r": 0, "proportional_attn": False}])
def test_no_merging_equals_none(decoder, opts):
    model, cfg = tiny(decoder=decoder)
    x = images()
    tome = build_method("tome", cfg, CAMVID, **opts)
    with torch.no_grad():
        ref = model.run(x)
        out = model.with_method(tome).run(x)
    assert torch.equal(out.logits, ref.logits)
    assert torch.equal(out.token_logits, ref.token_logits)
    assert torch.equal(out.tokens, ref.tokens)


# ------------------------------------------------------------------ matching on a constructed input


def constructed():
    """T = 5 (cls + 4 patches). a = positions 0, 2, 4; b = positions 1, 3.
    Position 2 is almost identical to 3 and position 4 loosely similar to 1."""
    e = torch.eye(4)
    metric = torch.stack([
        e[0],                      # 0 cls
        e[1],                      # 1 b0
        e[2] + 0.01 * e[3],        # 2 a1 ~ b1 (cos ~ 1)
        e[2],                      # 3 b1
        e[1] + e[3],               # 4 a2 ~ b0 (cos 0.71)
    ]).unsqueeze(0)
    return metric


def test_matching_on_constructed_input():
    m = bipartite_soft_matching(constructed(), r=1)
    dest = m.dest[0].tolist()
    assert dest[2] == dest[3] == 3           # a1 (position 2) merges into b1 (position 3)
    assert [dest[0], dest[4]] == [0, 1]      # cls and a2 stay, original order
    # new order: [cls, a2 (pos 4), b0 (pos 1), b1 + a1 (pos 3 and 2)]
    assert m.dest.tolist() == [[0, 2, 3, 3, 1]]

    m2 = bipartite_soft_matching(constructed(), r=2)
    dest = m2.dest[0].tolist()
    assert dest[2] == dest[3] and dest[4] == dest[1]  # a1 -> b1, a2 -> b0
    assert m2.dest.tolist() == [[0, 1, 2, 2, 1]]


def test_merge_sizes_values_and_index_map():
    metric = constructed()
    x = torch.arange(5 * 3, dtype=torch.float).view(1, 5, 3)
    state = TokenState(x=x, size=torch.tensor([[1.0, 1.0, 1.0, 3.0, 1.0]]),
                       source=torch.tensor([[0, 1, 2, 2, 2, 3]]), grid=(2, 3))
    out = merge_state(state, bipartite_soft_matching(metric, r=1))
    assert out.size.tolist() == [[1.0, 1.0, 1.0, 4.0]]
    expected = torch.stack([x[0, 0], x[0, 4], x[0, 1], (x[0, 2] * 1 + x[0, 3] * 3) / 4])
    assert torch.allclose(out.x[0], expected)
    # patch tokens: old 0 (pos 1) -> new 1; old 1 (pos 2) and 2 (pos 3) -> new 2; old 3 -> new 0
    assert out.source.tolist() == [[1, 2, 2, 2, 2, 0]]


def test_cls_is_never_merged_and_r_is_capped():
    metric = torch.ones(2, 9, 4)  # every token identical, cls included
    m = bipartite_soft_matching(metric, r=100)
    assert m.r == 4  # (T - 1) // 2
    assert (m.dest[:, 1:] != 0).all()  # cls is alone in slot 0
    assert (m.dest[:, 0] == 0).all()
    assert bipartite_soft_matching(metric, r=0) is None


def test_tied_edges_merge_the_lower_a_indices():
    """All edges tie: the r merging a-tokens are a1 .. ar (positions 2, 4, ...)."""
    dest = bipartite_soft_matching(torch.ones(2, 9, 4), r=2).dest
    # a-tokens at positions 0, 2, 4, 6, 8; a1, a2 merge into b slots (3 unmerged a first)
    assert dest[:, [0, 6, 8]].tolist() == [[0, 1, 2]] * 2
    assert (dest[:, [2, 4]] >= 3).all()


def test_index_map_equals_dense_source_matrix():
    """Composed (B, N) index map == argmax of ToMe's dense (B, T, N) source tracking."""
    g = torch.Generator().manual_seed(0)
    b, n, c = 3, 24, 8
    state = TokenState.identity(torch.randn(b, n, c, generator=g), (4, 6))
    state = state.replace(x=torch.cat([torch.zeros(b, 1, c), state.x], 1),
                          size=torch.ones(b, n + 1), prefix=1)
    dense = torch.eye(n + 1).expand(b, -1, -1).clone()  # token -> original positions
    for r in (4, 5, 3, 2):
        m = bipartite_soft_matching(torch.randn(b, state.num_tokens, c, generator=g), r)
        state = merge_state(state, m)
        new = torch.zeros(b, state.num_tokens, n + 1)
        dense = new.scatter_add_(1, m.dest.unsqueeze(-1).expand(-1, -1, n + 1), dense)
        check_index_map(state, n)
    assert torch.equal(dense.sum(1), torch.ones(b, n + 1))
    assert torch.equal(dense.argmax(1)[:, 1:] - 1, state.source)


def official_matching(metric, r):
    """ToMe's ``bipartite_soft_matching`` (facebookresearch/ToMe, tome/merge.py), class
    token protected, no distillation token; returns its ``merge(x, mode)``."""
    t = metric.shape[1]
    r = min(r, (t - 1) // 2)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    scores[..., 0, :] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx = edge_idx[..., r:, :].sort(dim=1)[0]
    src_idx = edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)

    def merge(x, mode="mean"):
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        return torch.cat([unm, dst], dim=1)

    return merge


def test_merges_equal_tomes_official_code():
    """A chain of steps == ToMe's merge_wavg / merge_source: same tokens (up to float
    summation order), same sizes, and the index map == argmax of its dense source."""
    g = torch.Generator().manual_seed(7)
    b, n, c, k = 3, 96, 16, 6
    state = TokenState.identity(torch.randn(b, n, c, generator=g), (8, 12))
    state = state.replace(x=torch.cat([torch.randn(b, 1, c, generator=g), state.x], 1),
                          size=torch.ones(b, n + 1), prefix=1)
    x, size, dense = state.x, torch.ones(b, n + 1, 1), torch.eye(n + 1).expand(b, -1, -1)
    for r in (20, 16, 30, 1):
        metric = torch.randn(b, state.num_tokens, k, generator=g)
        merge = official_matching(metric, r)
        x, size = merge(x * size, "sum"), merge(size, "sum")
        x, dense = x / size, merge(dense, "amax")
        state = merge_state(state, bipartite_soft_matching(metric, r))
        torch.testing.assert_close(state.x, x, rtol=1e-6, atol=1e-6)
        assert torch.equal(state.size, size[..., 0])
        assert torch.equal(state.source, dense.argmax(1)[:, 1:] - 1)


# ------------------------------------------------------------------ proportional attention


def test_proportional_attention_adds_log_size():
    tome = ToMe(depth=4, r=2)
    size = torch.tensor([[1.0, 2.0, 1.0, 5.0], [1.0, 1.0, 3.0, 4.0]])
    state = TokenState(x=torch.randn(2, 4, 8), size=size,
                       source=torch.zeros(2, 9, dtype=torch.long), grid=(3, 3))
    bias = tome.attn_bias(state, 1)
    assert bias.shape == (2, 1, 1, 4)
    assert torch.equal(bias, torch.log(size)[:, None, None, :])
    # before any merge (T == N + 1) there is no bias at all; off -> no bias either
    fresh = TokenState(x=torch.randn(2, 10, 8), size=torch.ones(2, 10),
                       source=torch.arange(9).expand(2, 9), grid=(3, 3))
    assert tome.attn_bias(fresh, 0) is None
    assert ToMe(depth=4, r=2, proportional_attn=False).attn_bias(state, 1) is None
    # padding keys are masked on top of log(size)
    keep = torch.tensor([[True, True, True, False], [True] * 4])
    masked = tome.attn_bias(state.replace(keep=keep), 1)
    assert masked[0, 0, 0, 3] == float("-inf")
    assert torch.equal(masked[1], bias[1])


def test_proportional_attention_is_used_in_the_encoder():
    """With the bias the output differs from the same merges without it."""
    model, cfg = tiny()
    x = images()
    with torch.no_grad():
        on = model.with_method(ToMe(cfg.depth, r=4)).run(x)
        off = model.with_method(ToMe(cfg.depth, r=4, proportional_attn=False)).run(x)
    assert torch.equal(on.tokens, off.tokens)
    assert not torch.allclose(on.logits, off.logits)


# ------------------------------------------------------------------ whole model


@pytest.mark.parametrize("opts", [{"r": 3}, {"r": 5, "inflection": -1.0}, {"schedule": "6,0,4"},
                                  {"reduction": 50.0}, {"r": 100}, {"r": 4, "merge_layers": "2-3"}])
def test_every_patch_maps_to_one_token(opts):
    model, cfg = tiny(method=build_method("tome", tiny()[1], CAMVID, **opts))
    x = images()
    state, alive = final_state(model, x)
    check_index_map(state, 24)
    assert alive[:, -1].tolist() == [state.num_tokens] * 2
    # alive counts follow the (capped) schedule
    t, expected = 25, []
    for r in model.method.r_per_layer(24):
        t -= min(r, (t - 1) // 2)
        expected.append(t)
    assert alive.tolist() == [expected] * 2
    out = model.run(x)
    assert out.token_logits.shape == (2, 24, 5)


def test_restore_gathers_through_the_index_map():
    model, cfg = tiny(method=ToMe(4, r=4))
    x = images()
    with torch.no_grad():
        state, _ = model.encoder(x, model.method)
        token_out = model.decoder(state.x[:, 1:])
        out = model.run(x)
    for b in range(2):
        for n in range(24):
            assert torch.equal(out.token_logits[b, n], token_out[b, state.source[b, n]])


def test_batch_equals_single_images():
    """Vectorised over the batch: no mixing between images."""
    model, _ = tiny(method=ToMe(4, r=4))
    x = images(b=3)
    with torch.no_grad():
        batch = model(x)
        single = torch.cat([model(x[i: i + 1]) for i in range(3)])
    assert torch.allclose(batch, single, atol=1e-5)


# ------------------------------------------------------------------ schedules and config


def test_parse_r_schedules():
    assert parse_r(12, 16) == [16] * 12
    assert parse_r(12, (16, 0.0)) == [16] * 12
    dec = parse_r(12, (8, -1.0))
    assert dec[0] == 16 and dec[-1] == 0 and dec == sorted(dec, reverse=True)
    assert parse_r(12, (8, 1.0)) == dec[::-1]
    assert parse_r(4, [3, 2]) == [3, 2, 0, 0]
    assert sum(parse_r(12, (100 / 12, -0.5), total=100)) == 100
    assert sum(parse_r(12, (100 / 12, 0.5), total=100)) == 100


def test_r_per_layer_from_options():
    assert ToMe(12).r_per_layer(768) == [16] * 12  # default
    assert ToMe(12, schedule="8,8,4").r_per_layer(768) == [8, 8, 4] + [0] * 9
    assert ToMe(12, r=10, merge_layers="3-5").r_per_layer(768) == [0, 0, 10, 10, 10] + [0] * 7
    red = ToMe(12, reduction=25.0).r_per_layer(768)
    assert sum(red) == 192 and red == [16] * 12
    assert sum(ToMe(12, reduction=40.0, inflection=-1.0).r_per_layer(768)) == round(0.4 * 768)


def test_defaults_and_settings():
    tome = build_method("tome", tiny()[1], CAMVID)
    assert tome.r == 16 and tome.proportional_attn
    s = tome.settings()
    assert s == {"r": 16, "inflection": 0.0, "schedule": None, "reduction": None,
                 "merge_layers": "1-4", "proportional_attn": True}


@pytest.mark.parametrize("opts, match", [
    ({"r": -1}, "non-negative"),
    ({"schedule": "4,-2"}, ">= 0"),
    ({"schedule": "4,x"}, "comma-separated"),
    ({"schedule": "1,1,1,1,1"}, "entries"),
    ({"r": 4, "schedule": "4"}, "only one"),
    ({"reduction": 100.0}, "percentage"),
    ({"reduction": -5.0}, "percentage"),
    ({"inflection": 2.0}, "inflection"),
    ({"schedule": "2", "inflection": -1.0}, "inflection"),
    ({"merge_layers": "0-3"}, "range"),
    ({"merge_layers": "2-9"}, "range"),
    ({"merge_layers": "a-b"}, "merge_layers"),
])
def test_bad_options_give_clear_errors(opts, match):
    with pytest.raises(ValueError, match=match):
        build_method("tome", tiny()[1], CAMVID, **opts)


def test_unknown_option_is_rejected():
    with pytest.raises(ValueError, match="no option"):
        build_method("tome", tiny()[1], CAMVID, tau=0.5)


def test_log_of_size_is_finite_after_many_merges():
    model, _ = tiny(method=ToMe(4, r=100))
    with torch.no_grad():
        out = model(images())
    assert torch.isfinite(out).all()


def test_fvcore_counts_fewer_flops_with_merging():
    """The method traces under torch.jit (fvcore) and merging lowers the count."""
    from algm.measure.flops import count_flops

    model, cfg = tiny()
    x = images(b=1)
    base = count_flops(model, x)
    assert count_flops(model.with_method(ToMe(cfg.depth, r=0)), x) == base
    merged = count_flops(model.with_method(ToMe(cfg.depth, r=4)), x)
    assert merged < base
