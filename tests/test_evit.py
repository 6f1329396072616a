"""EViT (Expedit's segmentation port): selection, fusion and reconstruction pinned against
slow per-image loops of the authors' rule; index-map invariants, padding, zero-reduction
equality with ``none``, GFLOPs and the registry."""

from __future__ import annotations

import math

import pytest
import torch

from algm.config import DecoderConfig, get_backbone, get_dataset
from algm.measure.flops import count_flops, uncounted_ops
from algm.methods import build_method
from algm.model.segmenter import build_segmenter
from algm.reduction import AttentionView, NoReduction, TokenState, padding_bias
from baselines.evit import EViT, EViTAux, default_layers
from tiny_inputs import CAMVID, TINY, noise_images, run, tiny_segmenter, with_registered



pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_segmenter()


images = noise_images


def evit(model, **kw):
    return with_registered(model, "evit", **kw)


# ---------------------------------------------------------------- slow references (the paper's rule)


def slow_scores(q, k, alive):
    """Head-averaged softmax(q_cls k^T / sqrt(d)) over the patch tokens, per image by
    explicit loops. q, k: (H, T, d) of one image (cls at 0); alive: real tokens (cls incl.)."""
    h_count, _, d = q.shape
    scores = [0.0] * (alive - 1)
    for h in range(h_count):
        logits = [sum(float(q[h, 0, c]) * float(k[h, t, c]) for c in range(d)) / math.sqrt(d)
                  for t in range(alive)]
        top = max(logits)
        e = [math.exp(v - top) for v in logits]
        for j in range(1, alive):
            scores[j - 1] += e[j] / sum(e) / h_count
    return scores


def slow_step(x, size, source, scores, rate):
    """One EViT step on one image (x: list of rows, cls first; only real tokens):
    returns the new x, size, source (patch -> patch token) and the kept / dropped lists."""
    n = len(scores)
    k = math.ceil(rate * n)
    ranked = sorted(range(n), key=lambda j: -scores[j])
    kept = sorted(ranked[:k])
    dropped = sorted(ranked[k:])
    new_x = [x[0]] + [x[1 + j] for j in kept]
    new_size = [1.0] + [size[1 + j] for j in kept]
    if dropped:
        fused = sum(scores[j] * x[1 + j] for j in dropped)
        new_x.append(fused)
        new_size.append(sum(size[1 + j] for j in dropped))
    where = {j: i for i, j in enumerate(kept)}
    new_source = [where.get(s, len(kept)) for s in source]
    return new_x, new_size, new_source, kept, dropped


def slow_port_reconstruction(final, steps, source0):
    """The port's ``reconstruct``: from the last step back, kept tokens take their output,
    a dropped token the output of the kept token nearest to it (squared L2 on the features
    at that step); the fused token's own output is discarded. final: list of patch rows."""
    out = final
    for feats, kept, dropped in reversed(steps):
        new = [None] * len(feats)
        for pos, j in enumerate(kept):
            new[j] = out[pos]
        for i in dropped:
            nearest = min(kept, key=lambda j: float(((feats[i] - feats[j]) ** 2).sum()))
            new[i] = new[nearest]
        out = new
    return torch.stack([out[s] for s in source0])


def random_attention(b, h, t, d, seed, keep=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, h, t, d, generator=g, dtype=torch.float64)
    return AttentionView(queries=q, keys=k, bias=padding_bias(keep, torch.float64))


def random_state(b, t, dim, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, dim, generator=g, dtype=torch.float64)
    n = t - 1
    return TokenState(x=x, size=torch.ones(b, t, dtype=torch.float64),
                      source=torch.arange(n).expand(b, n), grid=(3, n // 3))


# ---------------------------------------------------------------- semantics vs slow loops


@pytest.mark.parametrize("rate", [0.6, 0.5, 0.9, 0.25])
def test_one_step_matches_the_slow_rule(rate):
    b, t, dim, heads = 2, 13, 6, 2
    state = random_state(b, t, dim, seed=3)
    attn = random_attention(b, heads, t, dim // heads, seed=4)
    x_before = state.x.clone()
    out = EViT(keep_rate=rate, layers=(1,)).mid_block(state, 0, attn)
    assert torch.equal(state.x, x_before)  # inputs are never mutated
    for i in range(b):
        scores = slow_scores(attn.queries[i], attn.keys[i], t)
        x, size, source, kept, dropped = slow_step(list(state.x[i]), [1.0] * t, list(range(t - 1)), scores, rate)
        assert len(kept) == math.ceil(rate * (t - 1))
        assert torch.allclose(out.x[i], torch.stack(x), atol=1e-12)
        assert out.size[i].tolist() == size
        assert out.source[i].tolist() == source
    assert out.keep is None


def test_fused_token_is_the_unnormalised_attention_weighted_sum():
    """The authors' code: ``sum(a_i x_i)`` over the dropped tokens, not divided by sum(a_i)."""
    state = random_state(1, 10, 4, seed=5)
    attn = random_attention(1, 2, 10, 2, seed=6)
    out = EViT(keep_rate=0.5, layers=(1,)).mid_block(state, 0, attn)
    scores = torch.tensor(slow_scores(attn.queries[0], attn.keys[0], 10), dtype=torch.float64)
    dropped = scores.argsort(descending=True)[5:]
    expected = (scores[dropped, None] * state.x[0, 1:][dropped]).sum(0)
    assert torch.allclose(out.x[0, -1], expected, atol=1e-12)
    assert scores[dropped].sum() < 1  # so the fused token really is shorter than a mean
    assert out.size[0, -1] == 4


@pytest.mark.parametrize("seed", range(6))
def test_two_steps_and_reconstruction_match_the_port(seed):
    """Two reduction blocks (the second ranks the first one's fused token like any
    other), then the port's nearest-kept reconstruction before the decoder."""
    b, t, dim, heads, rate = 2, 16, 6, 3, 0.6
    method = EViT(keep_rate=rate, layers=(1, 2))
    state = random_state(b, t, dim, seed=10 + seed)
    attn1 = random_attention(b, heads, t, dim // heads, seed=20 + seed)
    s1 = method.mid_block(state, 0, attn1)
    t2 = s1.num_tokens
    assert t2 == 1 + math.ceil(rate * 15) + 1
    # the block's MLP and the next attention change the features
    g = torch.Generator().manual_seed(30 + seed)
    s1 = s1.replace(x=torch.randn(s1.x.shape, generator=g, dtype=torch.float64))
    attn2 = random_attention(b, heads, t2, dim // heads, seed=40 + seed)
    s2 = method.mid_block(s1, 1, attn2)
    assert s2.num_tokens == 1 + math.ceil(rate * (t2 - 1)) + 1
    final = s2.replace(x=torch.randn(s2.x.shape, generator=g, dtype=torch.float64))
    rebuilt = method.before_decoder(final)
    n = t - 1
    assert rebuilt.num_tokens == 1 + n and rebuilt.keep is None
    assert torch.equal(rebuilt.source, torch.arange(n).expand(b, n))
    assert torch.equal(rebuilt.x[:, 0], final.x[:, 0])
    for i in range(b):
        x, size, src, kept1, dropped1 = slow_step(list(state.x[i]), [1.0] * t, list(range(n)),
                                                  slow_scores(attn1.queries[i], attn1.keys[i], t), rate)
        feats1 = list(state.x[i, 1:])
        x2 = list(s1.x[i])
        x2, size, src, kept2, dropped2 = slow_step(x2, size, src, slow_scores(attn2.queries[i], attn2.keys[i], t2),
                                                   rate)
        assert torch.allclose(s2.x[i], torch.stack(x2), atol=1e-12)
        assert s2.size[i].tolist() == size and s2.source[i].tolist() == src
        steps = [(feats1, kept1, dropped1), (list(s1.x[i, 1:]), kept2, dropped2)]
        expected = slow_port_reconstruction(list(final.x[i, 1:]), steps, list(range(n)))
        assert torch.equal(rebuilt.x[i, 1:], expected)


def test_source_reconstruction_leaves_the_state_to_restore():
    state = random_state(1, 10, 4, seed=7)
    method = EViT(keep_rate=0.5, layers=(1,), reconstruct="source")
    out = method.mid_block(state, 0, random_attention(1, 2, 10, 2, seed=8))
    assert out.aux is None and method.before_decoder(out) is out
    token_out = torch.randn(1, out.num_tokens - 1, 3, dtype=torch.float64)
    restored = method.restore(token_out, out)
    assert torch.equal(restored[0], token_out[0, out.source[0]])  # fused patches: the fused token's output


# ---------------------------------------------------------------- padding (keep mask)


def padded_state(seed):
    """Two images, N = 13 patches: image 0 has 10 patch tokens, image 1 only 7 real
    ones and 3 padding tokens full of garbage (keep False, size 0)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 11, 6, generator=g, dtype=torch.float64)
    x[1, 8:] = 1e3
    size = torch.tensor([[1.0] * 8 + [2.0] * 3, [1.0] * 6 + [4.0, 4.0] + [0.0] * 3], dtype=torch.float64)
    source = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 7, 8, 8, 9, 9],
                           [0, 1, 2, 3, 4, 5, 5, 5, 5, 6, 6, 6, 6]])
    keep = torch.ones(2, 11, dtype=torch.bool)
    keep[1, 8:] = False
    return TokenState(x=x, size=size, source=source, grid=(1, 13), keep=keep)


@pytest.mark.parametrize("rate", [0.6, 0.5])
def test_padding_is_never_kept_fused_or_a_target_and_images_are_independent(rate):
    state = padded_state(seed=1)
    attn = random_attention(2, 3, 11, 2, seed=2, keep=state.keep)
    method = EViT(keep_rate=rate, layers=(1,))
    out = method.mid_block(state, 0, attn)
    counts = [math.ceil(rate * 10), math.ceil(rate * 7)]
    lengths = [1 + c + 1 for c in counts]
    assert out.num_tokens == max(lengths)
    assert out.alive().tolist() == lengths
    assert out.size[:, 1:].sum(1).tolist() == [13.0, 13.0]  # real tokens hold every patch, padding none
    assert (out.size[~out.keep] == 0).all() and (out.x[~out.keep] == 0).all()
    for i in range(2):
        assert int(out.source[i].max()) < lengths[i] - 1
        assert int(out.aux.recon[i].max()) < counts[i]  # reconstruction takes kept tokens only
    bias = method.attn_bias(out, 1)
    assert torch.isinf(bias[1, 0, 0, lengths[1]:]).all() and torch.isfinite(bias[1, 0, 0, :lengths[1]]).all()
    # image 1 alone (unpadded) gives the same tokens: padding and neighbours change nothing
    alone = TokenState(x=state.x[1:, :8], size=state.size[1:, :8], source=state.source[1:], grid=(1, 13))
    attn_alone = AttentionView(queries=attn.queries[1:, :, :8], keys=attn.keys[1:, :, :8])
    ref = method.mid_block(alone, 0, attn_alone)
    assert torch.allclose(out.x[1, :lengths[1]], ref.x[0], atol=1e-12)
    assert torch.equal(out.size[1, :lengths[1]], ref.size[0])
    assert torch.equal(out.source[1], ref.source[0]) and torch.equal(out.aux.recon[1], ref.aux.recon[0])
    # and the slow rule on the real tokens only
    scores = slow_scores(attn.queries[1], attn.keys[1], 8)
    x, size, source, _, _ = slow_step(list(state.x[1, :8]), state.size[1, :8].tolist(), state.source[1].tolist(),
                                      scores, rate)
    assert torch.allclose(out.x[1, :lengths[1]], torch.stack(x), atol=1e-12)
    rebuilt = method.before_decoder(out)
    assert rebuilt.keep is None and rebuilt.num_tokens == 14


def test_padded_batch_where_no_image_fuses_is_untouched():
    state = padded_state(seed=3)
    attn = random_attention(2, 3, 11, 2, seed=4, keep=state.keep)
    out = EViT(keep_rate=0.95, layers=(1,)).mid_block(state, 0, attn)
    assert out is state  # ceil(0.95 * 10) = 10, ceil(0.95 * 7) = 7


# ---------------------------------------------------------------- the method in the segmenter


def check_index_map(state: TokenState, n: int):
    """Every patch maps to exactly one patch token; sizes count the patches per token."""
    t = state.num_tokens - 1
    assert state.source.shape[1] == n
    assert int(state.source.min()) >= 0 and int(state.source.max()) < t
    counts = torch.stack([torch.bincount(s, minlength=t) for s in state.source]).to(state.size.dtype)
    assert torch.equal(state.size[:, 1:], counts)
    assert torch.equal(state.size[:, 0], torch.ones_like(state.size[:, 0]))


@pytest.mark.parametrize("reconstruct", ["nearest", "source"])
def test_invariants_in_the_segmenter(model, reconstruct):
    m = evit(model, keep_rate=0.5, reconstruct=reconstruct)
    x = images()
    n = 4 * 6
    with torch.no_grad():
        state, tokens = m.encoder(x, m.method)
        out = m.run(x)
    check_index_map(state, n)
    assert state.keep is None
    # default blocks for 4 blocks: 1, 2, 3; counts ceil(0.5 n) + fused + cls
    expected, t = [], n
    for block in range(1, 5):
        if block in (1, 2, 3):
            t = math.ceil(0.5 * t) + 1
        expected.append(t + 1)
    assert tokens.tolist() == [expected, expected]
    assert out.token_logits.shape == (2, n, 5) and torch.isfinite(out.token_logits).all()
    # every image is what it would be alone (equal counts: no padding, no batch policy)
    for i in range(2):
        alone = run(m, x[i:i + 1])
        assert torch.allclose(alone.token_logits[0], out.token_logits[i], atol=1e-5)
    assert torch.equal(m.method.token_map(state), state.source)


def test_nearest_reconstruction_feeds_the_decoder_every_patch(model):
    m = evit(model, keep_rate=0.5)
    x = images(b=1)
    seen = {}
    hook = m.decoder.register_forward_hook(lambda mod, args, out: seen.__setitem__("tokens", args[0].shape[1]))
    try:
        run(m, x)
    finally:
        hook.remove()
    assert seen["tokens"] == 24


@pytest.mark.parametrize("decoder", ["mask", "linear"])
@pytest.mark.parametrize("opts", [{"keep_rate": 1.0}, {"keep_rate": 1.0, "reconstruct": "source"},
                                  {"keep_rate": 0.99, "layers": "1,4"}])
def test_no_reduction_equals_none(decoder, opts):
    torch.manual_seed(0)
    base = build_segmenter(TINY, 5, DecoderConfig(decoder), NoReduction()).eval()
    x = images()
    ref = run(base, x)
    out = run(base.with_method(build_method("evit", TINY, CAMVID, **opts)), x)
    assert torch.equal(out.logits, ref.logits)
    assert torch.equal(out.token_logits, ref.token_logits)
    assert torch.equal(out.tokens, ref.tokens)


def test_gradients_flow_through_the_fused_token(model):
    m = evit(model, keep_rate=0.5)
    x = images(b=1).requires_grad_()
    m.run(x).logits.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# ---------------------------------------------------------------- GFLOPs


def test_every_op_is_counted_and_reduction_saves_flops(model):
    x = images(b=1)
    base = count_flops(model, x)
    nearest, source = evit(model, keep_rate=0.5), evit(model, keep_rate=0.5, reconstruct="source")
    assert uncounted_ops(nearest, x) == {}
    assert uncounted_ops(source, x) == {}
    assert count_flops(source, x) < count_flops(nearest, x) < base  # nearest decodes all N tokens


# ---------------------------------------------------------------- registry and options


def test_build_from_the_registry_with_per_depth_defaults():
    m = build_method("evit", get_backbone("vit-s14"), CAMVID)
    assert isinstance(m, EViT)
    assert m.settings() == {"keep_rate": 0.8, "layers": "4,7,10", "reconstruct": "nearest"}
    assert m.label() == "evit (keep_rate=0.8, layers=4,7,10)"
    assert build_method("evit", get_backbone("vit-l16"), CAMVID).layers == (8, 14, 20)  # the port's
    assert default_layers(12) == (4, 7, 10) and default_layers(24) == (8, 14, 20)
    m = build_method("evit", get_backbone("vit-b16"), get_dataset("ade20k"), keep_rate=0.5,
                     layers="2,6", reconstruct="source")
    assert m.settings() == {"keep_rate": 0.5, "layers": "2,6", "reconstruct": "source"}
    assert build_method("evit", TINY, CAMVID, layers=[3]).layers == (3,)


@pytest.mark.parametrize("opts, word", [
    ({"keep_rate": 0.0}, "keep_rate"), ({"keep_rate": 1.5}, "keep_rate"), ({"keep_rate": "x"}, "keep_rate"),
    ({"keep_rate": float("nan")}, "keep_rate"), ({"layers": "0,3"}, "layers"), ({"layers": "3,2"}, "layers"),
    ({"layers": "a"}, "layers"), ({"layers": "5"}, "layers"), ({"layers": []}, "layers"),
    ({"layers": 2.5}, "layers"),
    ({"reconstruct": "mean"}, "reconstruct"), ({"batch_policy": "per_image"}, "batch_policy"),
])
def test_option_errors_are_one_line_naming_the_option(opts, word):
    with pytest.raises(ValueError) as err:
        build_method("evit", TINY, CAMVID, **opts)
    assert word in str(err.value) and "\n" not in str(err.value)


def test_aux_holds_the_reconstruction_map(model):
    m = evit(model, keep_rate=0.5)
    with torch.no_grad():
        state, _ = m.encoder(images(), m.method)
    assert isinstance(state.aux, EViTAux)
    recon = state.aux.recon
    assert recon.shape == (2, 24) and int(recon.min()) >= 0
    # the reconstruction never names the last fused token (created after its comparison)
    assert (recon < state.num_tokens - 2).all()
