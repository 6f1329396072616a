"""PiToMe: energies, A/B split and merge destinations against slow loop references,
invariants in the segmenter, batch policies, GFLOPs, registry and option errors."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from algm.config import get_backbone, get_dataset
from algm.measure.flops import count_flops, uncounted_ops
from algm.methods import add_method_options, build_method
from algm.reduction import AttentionView, TokenState
from baselines.pitome import (PiToMe, cosine_similarity, elu_energy, gaussian_log_energy,
                              gaussian_log_threshold, layer_margin, merge_count, protected_plan)
from tiny_inputs import CAMVID, TINY, run, textured_images, tiny_segmenter, with_registered



pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_segmenter()


images = textured_images


def pitome(model, **kw):
    return with_registered(model, "pitome", **kw)


def encode(model, x):
    with torch.no_grad():
        return model.encoder(x, model.method)


# ---------------------------------------------------------------- slow references (loops)


def slow_cos(rows: list[list[float]]) -> list[list[float]]:
    norms = [math.sqrt(sum(v * v for v in r)) for r in rows]
    return [[sum(a * b for a, b in zip(ri, rj)) / (ni * nj) for rj, nj in zip(rows, norms)]
            for ri, ni in zip(rows, norms)]


def slow_elu_energy(cos: list[list[float]], m: float, paper: bool) -> list[float]:
    """Paper eq. (4): mean over j of f(cos_ij), f = x (paper) / x - m (code) above m,
    exp(x - m) - 1 below."""
    out = []
    for row in cos:
        total = 0.0
        for s in row:
            total += (s if paper else s - m) if s >= m else math.exp(s - m) - 1
        out.append(total / len(row))
    return out


def kernel(d: float, sigma: float) -> float:
    return math.exp(-0.5 * (d / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))


def slow_gaussian_energy(cos: list[list[float]], sigma: float) -> list[float]:
    """The segmentation variant: 1/T sum over j != i of the Gaussian kernel of 1 - cos."""
    n = len(cos)
    return [sum(kernel(1 - cos[i][j], sigma) for j in range(n) if j != i) / n for i in range(n)]


def slow_plan(energy: list[float], cos: list[list[float]], r: int, prefix: int = 1):
    """The protected rule on one image: tokens by descending energy (ties: lower index),
    the 2r first alternately A / B, each A into its most similar B (ties: the earlier B),
    the rest protected. Returns the new position of every token (prefix first) in the
    order [prefix, protected, B] and the lists A, B, protected."""
    n = len(energy)
    ranked = sorted(range(n), key=lambda i: (-energy[i], i))
    a, b, protected = ranked[0:2 * r:2], ranked[1:2 * r:2], ranked[2 * r:]
    pos = {}
    for k, i in enumerate(protected + b):
        pos[i] = prefix + k
    for i in a:
        pos[i] = pos[max(b, key=lambda j: cos[i][j])]  # max keeps the first of ties
    return list(range(prefix)) + [pos[i] for i in range(n)], a, b, protected


def slow_merge(x, size, source, dest, length, prefix=1):
    """Size-weighted merge of one image's real tokens by ``dest``; new source."""
    d = len(x[0])
    acc, total = [[0.0] * d for _ in range(length)], [0.0] * length
    for i, j in enumerate(dest):
        for c in range(d):
            acc[j][c] += x[i][c] * size[i]
        total[j] += size[i]
    new_x = [[v / total[j] for v in acc[j]] for j in range(length)]
    return new_x, total, [dest[prefix + s] - prefix for s in source]


def flat(rows: list[list[float]]) -> list[float]:
    return [v for row in rows for v in row]


def synthetic_state(b: int, n: int, d: int, seed: int, lengths=None, clusters: int = 0) -> TokenState:
    """A float64 state: cls + n patch tokens per image (front-packed ``lengths`` real ones,
    padding behind with x 0 and size 0). With ``clusters`` the first tokens are noisy
    copies of a few directions (similar, high energy), the rest random."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 1 + n, d, generator=g, dtype=torch.float64)
    if clusters:
        centres = torch.randn(b, clusters, d, generator=g, dtype=torch.float64)
        k = n // 2
        x[:, 1:1 + k] = centres.repeat_interleave(math.ceil(k / clusters), 1)[:, :k] \
            + 0.02 * torch.randn(b, k, d, generator=g, dtype=torch.float64)
    lengths = [n] * b if lengths is None else lengths
    keep = torch.arange(1 + n).unsqueeze(0) < 1 + torch.tensor(lengths).unsqueeze(1)
    x = x * keep.unsqueeze(-1)
    source = torch.stack([torch.arange(n).clamp(max=m - 1) for m in lengths])  # last token holds the rest
    size = torch.cat([torch.ones(b, 1, dtype=torch.float64),
                      torch.stack([torch.bincount(s, minlength=n) for s in source]).double()], 1)
    return TokenState(x=x, size=size, source=source, grid=(1, n),
                      keep=None if min(lengths) == n else keep)


# ---------------------------------------------------------------- semantics


@pytest.mark.parametrize("paper", [False, True])
def test_classic_energy_equals_the_formula(paper):
    metric = torch.randn(2, 9, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for m in (0.9, 0.3, -0.2):
        got = elu_energy(cosine_similarity(metric), m, paper)
        for b in range(2):
            cos = slow_cos(metric[b].tolist())
            want = slow_elu_energy(cos, m, paper)
            assert got[b].tolist() == pytest.approx(want, abs=1e-12)
    assert [layer_margin(0.9, layer, 12) for layer in (0, 6, 11)] == pytest.approx([0.9, 0.45, 0.9 / 12])


def test_gaussian_energy_and_threshold_equal_the_formula():
    """log-domain energies == log of the kernel mean (self excluded, 1/T_b), padding
    left out; the count against k(1 - margin) equals the slow one."""
    state = synthetic_state(3, 10, 6, seed=2, lengths=[10, 7, 4], clusters=2)
    keep = state.patch_keep
    sim = cosine_similarity(state.patches)
    for sigma, margin in ((0.5, 0.8), (0.05, 0.9), (0.005, 0.9)):
        log_e = gaussian_log_energy(sim, sigma, keep)
        const = -math.log(sigma * math.sqrt(2 * math.pi))
        thr = gaussian_log_threshold(margin, sigma)
        for b, n in enumerate([10, 7, 4]):
            cos = slow_cos(state.patches[b, :n].tolist())
            want = slow_gaussian_energy(cos, sigma)
            assert torch.isinf(log_e[b, n:]).all()
            for i in range(n):
                if want[i] > 1e-250:  # the slow kernel underflows in double further out
                    assert log_e[b, i].item() + const == pytest.approx(math.log(want[i]), rel=1e-9)
            if sigma >= 0.05:
                passed = sum(e > kernel(1 - margin, sigma) for e in want)
                assert int((log_e[b] > thr).sum()) == passed


def test_merge_count_follows_the_ratio():
    assert merge_count(768, 0.95) == 38  # floor(768 * 0.05) = floor(38.4)
    assert merge_count(100, 0.9) == 10  # not 9 through float noise
    assert merge_count(24, 0.5) == 12 and merge_count(25, 0.5) == 12
    assert merge_count(24, 1.0) == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plan_equals_the_slow_protected_rule(seed):
    """A / B split, merge destinations and the protected tokens' order, per-image r and
    padding, against :func:`slow_plan`."""
    g = torch.Generator().manual_seed(seed)
    b, n = 3, 11
    lengths = torch.tensor([11, 8, 5])
    r = torch.tensor([4, 2, 0]) if seed != 2 else torch.tensor([5, 4, 2])
    metric = torch.randn(b, n, 4, generator=g, dtype=torch.float64)
    sim = cosine_similarity(metric)
    energy = torch.randn(b, n, generator=g, dtype=torch.float64)
    if seed == 1:
        energy = energy.round()  # ties: the lower index ranks first
    keep = torch.arange(n) < lengths.unsqueeze(1)
    energy = energy.masked_fill(~keep, float("-inf"))
    dest, new_lengths = protected_plan(energy, sim, r, lengths, prefix=1)
    assert new_lengths.tolist() == (1 + lengths - r).tolist()
    trash = int(new_lengths.max())
    for i in range(b):
        m, ri = int(lengths[i]), int(r[i])
        want, a, bb, protected = slow_plan(energy[i, :m].tolist(), sim[i, :m, :m].tolist(), ri)
        assert dest[i, : 1 + m].tolist() == want
        assert (dest[i, 1 + m:] == trash).all()  # padding -> trash slot
        assert len(a) == len(bb) == ri and len(protected) == m - 2 * ri


@pytest.mark.parametrize("proportional_attn", [False, True])
def test_classic_steps_equal_the_slow_reference(proportional_attn):
    """Two classic steps through ``mid_block`` on random keys: energies from the mean
    keys, r from the ratio, merged tokens, sizes and source; protected tokens untouched."""
    depth, ratio, margin = 4, 0.7, 0.9
    method = PiToMe(depth, ratio=ratio, proportional_attn=proportional_attn)
    g = torch.Generator().manual_seed(3)
    state = synthetic_state(2, 14, 5, seed=4)
    first = True
    for layer in (0, 1):
        t = state.num_tokens
        keys = torch.randn(2, 3, t, 4, generator=g, dtype=torch.float64)
        out = method.mid_block(state, layer, AttentionView(queries=keys, keys=keys))
        n = t - 1
        r = math.floor(n * (1 - ratio) + 1e-9)
        assert out.num_tokens == t - r
        for b in range(2):
            mean_keys = [[sum(keys[b, h, 1 + i, c].item() for h in range(3)) / 3 for c in range(4)]
                         for i in range(n)]
            cos = slow_cos(mean_keys)
            energy = slow_elu_energy(cos, margin * (1 - layer / depth), paper=False)
            dest, a, bb, protected = slow_plan(energy, cos, r)
            x, size, source = slow_merge(state.x[b].tolist(), state.size[b].tolist(),
                                         state.source[b].tolist(), dest, t - r)
            assert out.x[b].flatten().tolist() == pytest.approx(flat(x), abs=1e-12)
            assert out.size[b].tolist() == size
            assert out.source[b].tolist() == source
            if first:  # sizes 1: a protected token passes bit for bit
                for k, i in enumerate(protected):
                    assert torch.equal(out.x[b, 1 + k], state.x[b, 1 + i])
        assert torch.equal(out.x[:, 0], state.x[:, 0])  # cls untouched
        state, first = out, False
    bias = method.attn_bias(state, 2)
    if proportional_attn:
        assert torch.equal(bias, state.size.log()[:, None, None, :])
    else:
        assert bias is None


@pytest.mark.parametrize("policy", ["batch_min", "per_image"])
def test_adaptive_step_equals_the_slow_reference(policy):
    """The algm variant's PiToMe step on a padded state: counts from the Gaussian energy
    threshold (batch minimum or per image, at most half), merges, padding."""
    sigma, margin = 0.05, 0.9
    lengths = [12, 9, 6]
    state = synthetic_state(3, 12, 6, seed=5, lengths=lengths, clusters=2)
    method = PiToMe(4, variant="algm", layers=(1, 2), sigma=sigma, margin=margin, batch_policy=policy)
    out = method.adaptive_step(state)
    refs = []
    for b, n in enumerate(lengths):
        cos = slow_cos(state.patches[b, :n].tolist())
        energy = slow_gaussian_energy(cos, sigma)
        passed = sum(e > kernel(1 - margin, sigma) for e in energy)
        refs.append((cos, energy, min(passed, n // 2)))
    counts = [ref[2] for ref in refs]
    assert len(set(counts)) > 1 and max(counts) > 0  # a meaningful case
    rs = counts if policy == "per_image" else [min(counts)] * 3
    new_lengths = [1 + n - r for n, r in zip(lengths, rs)]
    longest = max(new_lengths)
    assert out.num_tokens == longest
    for b, ((cos, energy, _), n, r) in enumerate(zip(refs, lengths, rs)):
        dest, *_ = slow_plan(energy, cos, r)
        x, size, source = slow_merge(state.x[b, : 1 + n].tolist(), state.size[b, : 1 + n].tolist(),
                                     state.source[b].tolist(), dest, 1 + n - r)
        m = new_lengths[b]
        assert out.x[b, :m].flatten().tolist() == pytest.approx(flat(x), abs=1e-12)
        assert out.size[b, :m].tolist() == size
        assert out.source[b].tolist() == source
        assert (out.size[b, m:] == 0).all()  # padding holds no patch
        if out.keep is not None:
            assert out.keep[b].tolist() == [j < m for j in range(longest)]
    assert (out.keep is None) == (len(set(new_lengths)) == 1)


# ---------------------------------------------------------------- invariants in the segmenter


def check_state(state: TokenState, n: int) -> None:
    """Every patch maps to one real token; sizes count them and sum to N; padding holds none."""
    b, t, _ = state.x.shape
    assert int(state.source.min()) >= 0 and int(state.source.max()) < t - 1
    counts = torch.zeros(b, t - 1).scatter_add_(1, state.source, torch.ones(state.source.shape))
    assert torch.equal(counts, state.size[:, 1:])
    assert (state.size[:, 1:].sum(1) == n).all()
    assert ((counts > 0).sum(1) + 1).tolist() == state.alive().tolist()


SETTINGS = [
    {"ratio": 0.7},
    {"ratio": 0.5, "proportional_attn": True, "energy": "paper"},
    {"ratio": 0.8, "merge_layers": "2-3"},
    {"variant": "algm", "layers": "1,3", "tau": 0.9, "margin": 0.2},
    {"variant": "algm", "layers": "1,3", "tau": 0.9, "margin": 0.2, "batch_policy": "per_image"},
]


@pytest.mark.parametrize("opts", SETTINGS)
def test_restore_covers_every_patch(model, opts):
    m = pitome(model, **opts)
    x = images()
    state, tokens = encode(m, x)
    check_state(state, 4 * 6)
    assert (tokens[:, -1] < 1 + 4 * 6).all()  # it did merge
    assert torch.equal(tokens[:, -1], state.alive())
    keep = None if state.keep is None else state.keep[:, 1:]
    with torch.no_grad():
        token_out = m.decoder(state.x[:, 1:], keep)
        restored = m.method.restore(token_out, state)
    for b in range(x.shape[0]):
        for n in range(state.source.shape[1]):
            assert torch.equal(restored[b, n], token_out[b, state.source[b, n]])
    assert torch.equal(run(m, x).token_logits, restored)


def test_classic_token_counts_follow_the_ratio(model):
    out = run(pitome(model, ratio=0.8, merge_layers="2-3"), images())
    # 24 patches: block 1 keeps them, block 2 merges floor(4.8) = 4, block 3 floor(4) = 4
    assert out.tokens.tolist() == [[25, 21, 17, 17]] * 3


@pytest.mark.parametrize("opts", [
    {"ratio": 1.0}, {"ratio": 1.0, "proportional_attn": True}, {"ratio": 0.97},
    {"variant": "algm", "layers": "1,3", "tau": 1.5, "margin": 1.0},
    {"variant": "algm", "layers": "1,3", "tau": 1.5, "margin": 1.0, "batch_policy": "per_image"},
])
def test_zero_reduction_equals_none_bit_for_bit(model, opts):
    x = images()
    ref = run(model, x)
    out = run(pitome(model, **opts), x)
    assert torch.equal(out.logits, ref.logits)
    assert torch.equal(out.token_logits, ref.token_logits)
    assert torch.equal(out.tokens, ref.tokens)


@pytest.mark.parametrize("hw", [(64, 96), (80, 48)])
def test_per_image_batch_equals_each_image_alone(model, hw):
    m = pitome(model, variant="algm", layers="1,3", tau=0.9, margin=0.2, batch_policy="per_image")
    x = images(hw=hw)
    batch = run(m, x)
    assert len(set(batch.tokens[:, -1].tolist())) > 1  # the images did differ
    for i in range(x.shape[0]):
        alone = run(m, x[i: i + 1])
        assert torch.equal(batch.tokens[i], alone.tokens[0])
        torch.testing.assert_close(batch.logits[i], alone.logits[0], atol=1e-5, rtol=1e-5)


def test_batch_min_takes_the_fewest_merges(model):
    x = images()
    a = run(pitome(model, variant="algm", layers="1,3", tau=0.9, margin=0.2), x)
    b = run(pitome(model, variant="algm", layers="1,3", tau=0.9, margin=0.2, batch_policy="per_image"), x)
    assert len(set(a.tokens[:, -1].tolist())) == 1
    assert (b.tokens <= a.tokens).all()
    assert a.tokens[0, -1] == b.tokens[:, -1].max()


@pytest.mark.parametrize("proportional_attn", [False, True])
def test_padding_never_attends(model, proportional_attn):
    m = pitome(model, variant="algm", layers="1,3", tau=0.9, margin=0.2, batch_policy="per_image",
               proportional_attn=proportional_attn)
    state, _ = encode(m, images())
    assert state.keep is not None and not state.keep.all()
    bias = m.method.attn_bias(state, 3)[:, 0, 0]
    assert torch.isneginf(bias[~state.keep]).all()
    assert torch.isfinite(bias[state.keep]).all()


# ---------------------------------------------------------------- GFLOPs


@pytest.mark.parametrize("opts", [{"ratio": 0.7, "proportional_attn": True},
                                  {"variant": "algm", "layers": "1,3", "tau": 0.9, "margin": 0.2}])
def test_gflops_counted_with_no_unsupported_op(model, opts):
    m = pitome(model, **opts)
    x = images()[:1]  # the flat image: both steps merge
    assert run(m, x).tokens[0, -1] < run(m, x).tokens[0, 0]
    assert uncounted_ops(m.eval(), x) == {}
    assert count_flops(m, x) < count_flops(model, x)


# ---------------------------------------------------------------- registry and options


def test_defaults_per_backbone():
    s14 = build_method("pitome", get_backbone("vit-s14"), CAMVID)
    assert s14.settings() == {"variant": "classic", "ratio": 0.95, "margin": 0.9, "energy": "code",
                              "merge_layers": "1-12", "proportional_attn": False, "tau": None,
                              "layers": None, "sigma": None, "batch_policy": None}
    assert s14.label() == "pitome (ratio=0.95)"
    large = build_method("pitome", get_backbone("vit-l16"), get_dataset("ade20k"))
    assert large.ratio == 0.975 and large.settings()["merge_layers"] == "1-24"
    seg = build_method("pitome", get_backbone("vit-s14"), CAMVID, variant="algm")
    assert seg.settings() == {"variant": "algm", "ratio": None, "margin": 0.9, "energy": None,
                              "merge_layers": None, "proportional_attn": False, "tau": 0.985,
                              "layers": "1,5", "sigma": 0.005, "batch_policy": "batch_min"}
    assert seg.label() == "pitome (variant=algm, tau=0.985)"
    ade = build_method("pitome", get_backbone("vit-l16"), get_dataset("ade20k"), variant="algm")
    assert (ade.layers, ade.tau) == ((1, 7), 0.95)
    assert build_method("pitome", TINY, CAMVID, variant="algm", layers=[2, 3]).layers == (2, 3)


@pytest.mark.parametrize("bad, name", [
    ({"ratio": 0.3}, "ratio"), ({"ratio": float("nan")}, "ratio"), ({"ratio": "0.9"}, "ratio"),
    ({"margin": 1.5}, "margin"), ({"energy": "exact"}, "energy"), ({"variant": "fast"}, "variant"),
    ({"merge_layers": "0-3"}, "merge_layers"), ({"merge_layers": "x"}, "merge_layers"),
    ({"tau": 0.9}, "tau"), ({"batch_policy": "per_image"}, "batch_policy"),
    ({"variant": "algm", "ratio": 0.9}, "ratio"), ({"variant": "algm", "sigma": 0.0}, "sigma"),
    ({"variant": "algm", "layers": "3,1"}, "layers"), ({"variant": "algm", "layers": "1,5"}, "layers"),
    ({"variant": "algm", "batch_policy": "max"}, "batch_policy"),
])
def test_bad_options_raise_one_line_naming_the_option(bad, name):
    with pytest.raises(ValueError, match=name) as err:
        build_method("pitome", TINY, CAMVID, **bad)
    assert "\n" not in str(err.value)


def test_cli_options():
    parser = argparse.ArgumentParser()
    add_method_options(parser, "pitome")
    args = parser.parse_args(["--variant", "algm", "--layers", "1,3", "--tau", "0.9",
                              "--batch-policy", "per_image", "--no-proportional-attn"])
    assert (args.variant, args.layers, args.tau, args.batch_policy) == ("algm", "1,3", 0.9, "per_image")
    assert args.proportional_attn is False and args.ratio is None
