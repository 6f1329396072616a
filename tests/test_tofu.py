"""ToFu baseline: pruning and MLERP against a slow per-token reference, the index map,
the switch, r = 0 == none, GFLOPs, the registry and option errors."""

import argparse

import pytest
import torch

from algm.config import DecoderConfig, ViTConfig, get_backbone, get_dataset
from algm.measure.flops import count_flops, uncounted_ops
from algm.methods import add_method_options, build_method, method_options
from algm.model.segmenter import build_segmenter
from algm.reduction import AttentionView, TokenState
from baselines.tofu import ToFu, match, mlerp, prune, r_per_block
from tiny_inputs import noise_images

CAMVID = get_dataset("camvid")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(method=None, depth=4, decoder="mask"):
    torch.manual_seed(0)
    cfg = ViTConfig("tiny", 64, depth, 2, 16, pos_grid=(4, 6))
    return build_segmenter(cfg, 5, DecoderConfig(decoder), method).eval(), cfg


images = noise_images


def random_state(b=3, n=24, d=8, seed=0):
    """A mid-encoder state: cls + n patch tokens holding 2 n original patches (every
    token at least one, the rest at random), sizes counting them."""
    g = torch.Generator().manual_seed(seed)
    source = torch.cat([torch.arange(n).expand(b, n), torch.randint(0, n, (b, n), generator=g)], 1)
    source = source.gather(1, torch.rand(b, 2 * n, generator=g).argsort(1))
    size = torch.stack([torch.bincount(s, minlength=n) for s in source]).float()
    x = torch.randn(b, n + 1, d, generator=g)
    return TokenState(x=x, size=torch.cat([torch.ones(b, 1), size], 1), source=source,
                      grid=(4, n // 2), prefix=1)


# ------------------------------------------------------------------ slow reference


def slow_step(x, size, source, metric, r, mode, norm="max"):
    """ToFu's rule on one image with Python loops over tokens.

    x (T, D), size (T,), source (N,) among patch tokens, metric (T, C). ToMe's matching
    (a = even positions, cls protected, best b partner, the r best edges, ties to the
    lower a-index); ``prune``: the b-token keeps its value; ``mlerp``: the size-weighted
    mean's direction with the max (or size-weighted mean) of the members' norms.
    Returns new x, size, source; order [cls, unmatched a, b]."""
    t = x.shape[0]
    r = min(r, (t - 1) // 2)
    a_pos, b_pos = list(range(0, t, 2)), list(range(1, t, 2))
    unit = [metric[i] / metric[i].norm() for i in range(t)]
    best = {}
    for i in a_pos[1:]:
        scores = [float(unit[i] @ unit[j]) for j in b_pos]
        k = max(range(len(b_pos)), key=lambda k: (scores[k], -k))
        best[i] = (scores[k], b_pos[k])
    chosen = sorted(best, key=lambda i: (-best[i][0], i))[:r]
    order = [i for i in a_pos if i not in chosen] + b_pos
    new_x, new_size = [], []
    for p in order:
        members = [p] + [i for i in chosen if best[i][1] == p]
        total = sum(float(size[m]) for m in members)
        if mode == "prune" or len(members) == 1:
            value = x[p] if mode == "prune" else sum(x[m] * size[m] for m in members) / total
        else:
            mean = sum(x[m] * size[m] for m in members) / total
            norms = [float(x[m].norm()) for m in members]
            target = max(norms) if norm == "max" else sum(nm * float(size[m]) for nm, m in zip(norms, members)) / total
            value = mean / mean.norm() * target
        new_x.append(value)
        new_size.append(total)
    position = {p: k for k, p in enumerate(order)}
    for i in chosen:
        position[i] = position[best[i][1]]
    new_source = [position[int(s) + 1] - 1 for s in source]
    return torch.stack(new_x), torch.tensor(new_size), torch.tensor(new_source)


def run_slow(state, metric, r, mode, norm="max"):
    outs = [slow_step(state.x[i], state.size[i], state.source[i], metric[i], r, mode, norm)
            for i in range(state.x.shape[0])]
    return tuple(torch.stack(parts) for parts in zip(*outs))


@pytest.mark.parametrize("r", [1, 5, 12, 100])
def test_pruning_equals_slow_reference(r):
    state = random_state()
    metric = torch.randn(3, 25, 6, generator=torch.Generator().manual_seed(r))
    out = prune(state, match(metric, r))
    x, size, source = run_slow(state, metric, r, "prune")
    assert torch.equal(out.x, x)  # b-tokens keep their values exactly
    assert torch.equal(out.size, size)
    assert torch.equal(out.source, source)


@pytest.mark.parametrize("norm", ["max", "mean"])
@pytest.mark.parametrize("r", [1, 5, 12, 100])
def test_mlerp_equals_slow_reference(r, norm):
    state = random_state(seed=r)
    metric = torch.randn(3, 25, 6, generator=torch.Generator().manual_seed(r + 1))
    out = mlerp(state, match(metric, r), norm)
    x, size, source = run_slow(state, metric, r, "mlerp", norm)
    torch.testing.assert_close(out.x, x, rtol=1e-5, atol=1e-6)
    assert torch.equal(out.size, size)
    assert torch.equal(out.source, source)


def test_mlerp_keeps_the_mean_direction_and_the_max_norm():
    """Per fused slot, loop-checked: direction == size-weighted mean's, norm == the
    largest member norm (max) or the size-weighted mean of member norms (mean)."""
    state = random_state(b=2, seed=5)
    step = match(torch.randn(2, 25, 6, generator=torch.Generator().manual_seed(9)), 8)
    outs = {norm: mlerp(state, step, norm) for norm in ("max", "mean")}
    fused = 0
    for i in range(2):
        for slot in range(step.length):
            members = [k for k in range(25) if int(step.dest[i, k]) == slot]
            if len(members) < 2:
                continue
            fused += 1
            w = state.size[i, members]
            mean = (state.x[i, members] * w[:, None]).sum(0) / w.sum()
            norms = state.x[i, members].norm(dim=-1)
            for norm, target in (("max", norms.max()), ("mean", (norms * w).sum() / w.sum())):
                v = outs[norm].x[i, slot]
                torch.testing.assert_close(v.norm(), target, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(v / v.norm(), mean / mean.norm(), rtol=1e-5, atol=1e-6)
    assert fused >= 2 * 8 // 2  # every image fused some slots


def test_cls_is_never_matched_and_r_is_capped():
    step = match(torch.ones(2, 9, 4), 100)  # every token identical, cls included
    assert step.length == 5 and int(step.matched.sum()) == 2 * 4  # (T - 1) // 2 per image
    assert not step.matched[:, 0].any() and (step.dest[:, 0] == 0).all()
    assert (step.dest[:, 1:] != 0).all()
    assert match(torch.ones(2, 9, 4), 0) is None


# ------------------------------------------------------------------ the hooks


def view(metric, heads=2):
    """An AttentionView whose keys average over heads to ``metric`` (B, T, C)."""
    keys = metric.unsqueeze(1).expand(-1, heads, -1, -1)
    return AttentionView(queries=keys, keys=keys)


def test_mid_block_prunes_before_switch_and_merges_from_it():
    tofu = ToFu(depth=6, r=4, switch=3)  # blocks 1, 2 prune, 3.. MLERP
    state = random_state(seed=3)
    metric = torch.randn(3, 25, 6, generator=torch.Generator().manual_seed(4))
    step = match(metric, 4)
    for layer in range(6):
        out = tofu.mid_block(state, layer, view(metric))
        ref = prune(state, step) if layer < 2 else mlerp(state, step, "max")
        assert torch.equal(out.x, ref.x) and torch.equal(out.source, ref.source)


def test_padding_is_refused_and_masked():
    """Same r in every image: ToFu never pads; a padded state from elsewhere is refused,
    and attn_bias masks padded keys on top of log(size)."""
    tofu = ToFu(depth=4, r=2)
    state = random_state(b=2)
    keep = torch.ones(2, 25, dtype=torch.bool)
    keep[0, -3:] = False
    with pytest.raises(ValueError, match="padded"):
        tofu.mid_block(state.replace(keep=keep), 0, view(torch.randn(2, 25, 6)))
    bias = tofu.attn_bias(state.replace(keep=keep), 1)
    assert bias.shape == (2, 1, 1, 25)
    assert torch.isinf(bias[0, 0, 0, -3:]).all() and torch.isfinite(bias[1]).all()
    assert torch.equal(bias[1, 0, 0], state.size[1].log())


def test_proportional_attention():
    size = torch.tensor([[1.0, 2.0, 1.0, 5.0]])
    merged = TokenState(x=torch.randn(1, 4, 8), size=size, source=torch.zeros(1, 9, dtype=torch.long),
                        grid=(3, 3))
    assert torch.equal(ToFu(4, r=2).attn_bias(merged, 1), size.log()[:, None, None, :])
    assert ToFu(4, r=2, proportional_attn=False).attn_bias(merged, 1) is None
    fresh = TokenState(x=torch.randn(1, 10, 8), size=torch.ones(1, 10), source=torch.arange(9)[None],
                       grid=(3, 3))
    assert ToFu(4, r=2).attn_bias(fresh, 0) is None  # no step yet: exactly the plain model
    model, cfg = tiny()
    with torch.no_grad():
        on = model.with_method(ToFu(cfg.depth, r=4)).run(images())
        off = model.with_method(ToFu(cfg.depth, r=4, proportional_attn=False)).run(images())
    assert torch.equal(on.tokens, off.tokens) and not torch.allclose(on.logits, off.logits)


# ------------------------------------------------------------------ whole model


@pytest.mark.parametrize("decoder", ["mask", "linear"])
@pytest.mark.parametrize("opts", [{"r": 0}, {"reduction": 0.0}, {"r": 0, "proportional_attn": False},
                                  {"r": 0, "switch": 1}])
def test_no_reduction_equals_none(decoder, opts):
    model, cfg = tiny(decoder=decoder)
    x = images()
    with torch.no_grad():
        ref = model.run(x)
        out = model.with_method(build_method("tofu", cfg, CAMVID, **opts)).run(x)
    assert torch.equal(out.logits, ref.logits)
    assert torch.equal(out.token_logits, ref.token_logits)
    assert torch.equal(out.tokens, ref.tokens)


@pytest.mark.parametrize("opts", [{"r": 3}, {"r": 100}, {"reduction": 50.0}, {"r": 4, "switch": 1},
                                  {"r": 4, "switch": 5, "mlerp_norm": "mean"}])
def test_every_patch_maps_to_one_token(opts):
    cfg = tiny()[1]
    model, _ = tiny(method=build_method("tofu", cfg, CAMVID, **opts))
    x = images()
    with torch.no_grad():
        state, alive = model.encoder(x, model.method)
        out = model.run(x)
    t = state.num_tokens - 1
    assert int(state.source.min()) >= 0 and int(state.source.max()) < t
    counts = torch.stack([torch.bincount(s, minlength=t) for s in state.source]).float()
    assert torch.equal(state.size[:, 1:], counts)  # sizes count the patches, sum to N
    assert torch.equal(state.size.sum(1), torch.full((2,), 25.0))
    t, expected = 25, []
    for r in model.method.r_per_block(24):
        t -= min(r, (t - 1) // 2)
        expected.append(t)
    assert alive.tolist() == [expected] * 2
    # restore is one gather through the index map
    with torch.no_grad():
        token_out = model.decoder(state.patches)
    assert torch.equal(out.token_logits, token_out.gather(1, state.source[..., None].expand(-1, -1, 5)))


def test_batch_equals_single_images():
    model, _ = tiny(method=ToFu(4, r=4))
    x = images(b=3)
    with torch.no_grad():
        batch = model(x)
        single = torch.cat([model(x[i: i + 1]) for i in range(3)])
    assert torch.allclose(batch, single, atol=1e-5)


def test_switch_changes_the_output_not_the_counts():
    model, cfg = tiny()
    with torch.no_grad():
        pruned = model.with_method(ToFu(cfg.depth, r=4, switch=5)).run(images())
        merged = model.with_method(ToFu(cfg.depth, r=4, switch=1)).run(images())
    assert torch.equal(pruned.tokens, merged.tokens)
    assert not torch.allclose(pruned.logits, merged.logits)


@pytest.mark.parametrize("norm", ["max", "mean"])
def test_flops_are_counted_and_lower(norm):
    model, cfg = tiny()
    x = images(b=1)
    base = count_flops(model, x)
    tofu = model.with_method(ToFu(cfg.depth, r=4, switch=3, mlerp_norm=norm))
    assert uncounted_ops(tofu, x) == {}
    assert count_flops(tofu, x) < base
    assert count_flops(model.with_method(ToFu(cfg.depth, r=0)), x) == base


# ------------------------------------------------------------------ schedule, registry, options


def test_reduction_schedule():
    assert r_per_block(12, 768, 16, None) == [16] * 12
    red = r_per_block(12, 768, None, 40.0)
    assert sum(red) == round(0.4 * 768) and red == sorted(red, reverse=True) and max(red) - min(red) <= 1
    assert r_per_block(12, 768, None, 25.0) == [16] * 12


def test_defaults_per_backbone():
    small = build_method("tofu", get_backbone("vit-s14"), CAMVID)
    assert small.settings() == {"r": 16, "reduction": None, "switch": 8, "mlerp_norm": "max",
                                "proportional_attn": True}
    assert small.label() == "tofu (r=16, switch=8)"
    large = build_method("tofu", get_backbone("vit-l16"), CAMVID)
    assert (large.r, large.switch) == (8, 14)
    assert build_method("tofu", get_backbone("vit-s14"), CAMVID, reduction=30.0).r is None


@pytest.mark.parametrize("opts, name", [
    ({"r": -1}, "r must"), ({"r": 1.5}, "r must"), ({"reduction": 100.0}, "reduction"),
    ({"reduction": -1.0}, "reduction"), ({"r": 4, "reduction": 20.0}, "only one of r and reduction"),
    ({"switch": 0}, "switch"), ({"switch": 6}, "switch"), ({"mlerp_norm": "min"}, "mlerp_norm"),
])
def test_bad_options_give_one_line_errors(opts, name):
    with pytest.raises(ValueError, match=name) as err:
        build_method("tofu", tiny()[1], CAMVID, **opts)
    assert "\n" not in str(err.value)


def test_cli_options():
    parser = argparse.ArgumentParser()
    add_method_options(parser, "tofu")
    args = parser.parse_args(["--r", "8", "--switch", "5", "--mlerp-norm", "mean", "--no-proportional-attn"])
    opts = method_options(args, "tofu")
    assert opts == {"r": 8, "switch": 5, "mlerp_norm": "mean", "proportional_attn": False}
    assert build_method("tofu", tiny()[1], CAMVID, **opts).settings()["switch"] == 5
