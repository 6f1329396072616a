"""MPM (Mutual Pair Merging): the paper's rule against a slow reference, invariants in
the segmenter, batch policies, GFLOPs, registry and option errors."""

from __future__ import annotations

import argparse
import copy
import math

import pytest
import torch

from algm.config import get_backbone
from algm.measure.flops import count_flops, uncounted_ops
from algm.methods import add_method_options, build_method, method_options
from algm.reduction import TokenState
from baselines.mpm import MPM, default_steps, mutual_pair_merge
from tiny_inputs import CAMVID, TINY, encode, run, textured_images, tiny_segmenter, with_registered



pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_segmenter()


images = textured_images


def mpm(model, **kw):
    return with_registered(model, "mpm", **kw)


# ------------------------------------------------------------------ the rule, by slow loops


def reference_step(state: TokenState, per_image: bool):
    """The paper's rule with Python loops, image by image, token by token: every real
    patch token's nearest other real token by cosine (float64, lowest index on ties), the
    mutual pairs (batch_min: every image's r most similar ones, r the batch minimum),
    each pair -> plain mean at the lower index, sizes add. Returns per image the list of
    (x, size) of the real tokens after the prefix and the new source."""
    p = state.prefix
    lengths = state.alive().tolist()
    pairs = []
    for b in range(state.x.shape[0]):
        toks = state.x[b, p:lengths[b]].double()
        u = toks / toks.norm(dim=-1, keepdim=True)
        n = len(toks)
        nn, best = [], []
        for i in range(n):
            top, arg = -math.inf, None
            for j in range(n):
                if j != i and float(u[i] @ u[j]) > top:
                    top, arg = float(u[i] @ u[j]), j
            nn.append(arg)
            best.append(top)
        mine = [(best[i], i, nn[i]) for i in range(n) if nn[i] is not None and nn[nn[i]] == i and i < nn[i]]
        pairs.append(mine)
    if not per_image:
        r = min(len(m) for m in pairs)
        pairs = [sorted(m, key=lambda e: (-e[0], e[1]))[:r] for m in pairs]
    out = []
    for b, mine in enumerate(pairs):
        partner = {i: j for _, i, j in mine}
        gone = set(partner.values())
        toks, sizes, new_index = [], [], {}
        for i in range(lengths[b] - p):
            if i in gone:
                continue
            new_index[i] = len(toks)
            xi, si = state.x[b, p + i], state.size[b, p + i]
            if i in partner:
                j = partner[i]
                xi, si = (xi + state.x[b, p + j]) / 2, si + state.size[b, p + j]
            toks.append(xi)
            sizes.append(float(si))
        for i, j in partner.items():
            new_index[j] = new_index[i]
        source = [new_index[int(s)] for s in state.source[b]]
        out.append((torch.stack(toks), sizes, source))
    return out


def random_state(lengths, prefix=1, d=8, n=20, seed=0) -> TokenState:
    """A padded state: image b has lengths[b] tokens (prefix included) at the front,
    zero padding behind; source covers every real token, sizes count its patches."""
    g = torch.Generator().manual_seed(seed)
    b, t = len(lengths), max(lengths)
    x = torch.randn(b, t, d, generator=g)
    size = torch.zeros(b, t)
    source = torch.zeros(b, n, dtype=torch.long)
    for i, length in enumerate(lengths):
        real = length - prefix
        s = torch.cat([torch.arange(real), torch.randint(real, (n - real,), generator=g)])
        source[i] = s[torch.randperm(n, generator=g)]
        size[i, prefix:length] = torch.bincount(source[i], minlength=real).float()
        size[i, :prefix] = 1
        x[i, length:] = 0
    keep = None if min(lengths) == t else torch.arange(t) < torch.tensor(lengths).unsqueeze(1)
    return TokenState(x=x, size=size, source=source, grid=(4, 5), keep=keep, prefix=prefix)


def check_against_reference(state: TokenState, per_image: bool):
    out = mutual_pair_merge(state, per_image)
    ref = reference_step(state, per_image)
    lengths = out.alive().tolist()
    p = state.prefix
    assert torch.equal(out.x[:, :p], state.x[:, :p])  # the prefix never merges
    for b, (toks, sizes, source) in enumerate(ref):
        assert lengths[b] == p + len(toks)
        torch.testing.assert_close(out.x[b, p:lengths[b]], toks, rtol=1e-6, atol=1e-6)
        assert out.size[b, p:lengths[b]].tolist() == sizes
        assert out.source[b].tolist() == source
        assert (out.x[b, lengths[b]:] == 0).all() and (out.size[b, lengths[b]:] == 0).all()
    if out.keep is not None:
        assert out.keep.sum(1).tolist() == lengths
    return out


@pytest.mark.parametrize("per_image", [True, False], ids=["per_image", "batch_min"])
@pytest.mark.parametrize("lengths, prefix", [((21, 21, 21), 1), ((21, 14, 9), 1), ((12, 7, 20), 0),
                                             ((3, 21, 2), 1)])
def test_step_equals_the_slow_reference(lengths, prefix, per_image):
    state = random_state(lengths, prefix, seed=sum(lengths) + prefix)
    for _ in range(3):  # chained steps: unequal sizes, plain means of merged tokens
        state = check_against_reference(state, per_image)


def test_constructed_pairs_ties_order_and_plain_mean():
    """t0 = 2 e0, t1 = e1, t2 = e0, t3 = e0, t4 = e1 (exact cosines 0 or 1). t0's nearest
    ties between t2 and t3 and takes t2 (lowest index); t2's is t0: pair (0, 2). t3's is
    t0, not mutual: t3 stays. (1, 4) pair. Out: [mean(t0, t2), mean(t1, t4), t3]."""
    e = torch.eye(3)
    x = torch.stack([torch.zeros(3), 2 * e[0], e[1], e[0], e[0], e[1]]).unsqueeze(0)
    size = torch.tensor([[1.0, 3.0, 1.0, 1.0, 1.0, 2.0]])
    source = torch.tensor([[0, 0, 0, 1, 2, 3, 4, 4]])
    out = mutual_pair_merge(TokenState(x=x, size=size, source=source, grid=(2, 4)), True)
    expected = torch.stack([torch.zeros(3), 1.5 * e[0], e[1], e[0]])  # plain, not size-weighted, mean
    assert torch.equal(out.x[0], expected)
    assert out.size.tolist() == [[1.0, 4.0, 3.0, 1.0]]
    assert out.source.tolist() == [[0, 0, 0, 1, 0, 2, 1, 1]]
    assert out.keep is None


def test_lone_tokens_and_a_single_token_do_not_merge():
    state = random_state((2, 2), prefix=1)  # one patch token per image: no neighbour
    assert mutual_pair_merge(state, True) is state
    assert mutual_pair_merge(state, False) is state


def test_pairs_are_disjoint_and_at_most_half_go():
    state = random_state((41, 41), prefix=1, d=4, n=40, seed=3)
    out = mutual_pair_merge(state, True)
    assert (out.alive() >= 1 + 20).all() and (out.alive() < 41).all()
    assert (out.size[:, 1:] <= 2).all()


# ------------------------------------------------------------------ in the segmenter


def check_state(state: TokenState, n: int):
    """Every patch maps to one real patch token; sizes count its patches (padding 0)."""
    t = state.num_tokens - state.prefix
    real = state.patch_keep
    if real is None:
        real = torch.ones(state.source.shape[0], t, dtype=torch.bool)
    assert int(state.source.min()) >= 0 and int(state.source.max()) < t
    assert real.gather(1, state.source).all()
    counts = torch.stack([torch.bincount(s, minlength=t) for s in state.source]).to(state.size.dtype)
    assert torch.equal(state.size[:, state.prefix:], counts)
    assert torch.equal(state.size.sum(1) - state.prefix, torch.full_like(state.size[:, 0], n))


@pytest.mark.parametrize("policy", ["per_image", "batch_min"])
@pytest.mark.parametrize("steps", ["2,3", "1,2,3,4", "4"])
def test_every_patch_maps_to_one_token_and_restore_gathers(model, policy, steps):
    m = mpm(model, steps=steps, batch_policy=policy)
    x = images()
    state = encode(m, x)
    check_state(state, 24)
    out = run(m, x)
    assert out.logits.shape == (3, 5, 64, 96)
    assert (out.tokens[:, -1] < 25).all()
    # restore: patches held by one token get that token's output
    for b in range(3):
        for tok in state.source[b].unique():
            rows = out.token_logits[b, state.source[b] == tok]
            assert torch.equal(rows, rows[:1].expand_as(rows))
    if policy == "batch_min":
        assert state.keep is None and len(set(out.tokens[:, -1].tolist())) == 1


def test_padding_never_attends(model):
    m = mpm(model, steps="2")
    state = encode(m, images())
    assert state.keep is not None  # the mixed batch ends with different lengths
    bias = m.method.attn_bias(state, 2)
    assert torch.equal(torch.isinf(bias[:, 0, 0]), ~state.keep)


def test_no_step_equals_none_bit_for_bit(model):
    x = images()
    ref = run(model, x)
    for steps in ("none", [], ""):
        out = run(mpm(model, steps=steps), x)
        assert torch.equal(out.logits, ref.logits)
        assert torch.equal(out.token_logits, ref.token_logits)
        assert torch.equal(out.tokens, ref.tokens)


def test_steps_merge_before_the_named_blocks(model):
    """Steps 1 and 4: tokens drop in ``begin`` (block 1 already runs on fewer) and after
    block 3 (``tokens[:, k]`` counts what block k + 2 sees)."""
    tokens = run(mpm(model, steps="1,4"), images()).tokens
    assert (tokens[:, 0] < 25).all() and (tokens[:, 1] == tokens[:, 0]).all()
    assert (tokens[:, 2] < tokens[:, 1]).all() and (tokens[:, 3] == tokens[:, 2]).all()


@pytest.mark.parametrize("hw", [(64, 96), (80, 48)])
def test_per_image_batch_equals_each_image_alone(model, hw):
    m = mpm(model, steps="1,2,3")
    x = images(hw=hw)
    batch = run(m, x)
    for i in range(x.shape[0]):
        alone = run(m, x[i: i + 1])
        assert torch.equal(batch.tokens[i], alone.tokens[0])
        torch.testing.assert_close(batch.logits[i], alone.logits[0], atol=1e-5, rtol=1e-5)


def test_batch_policies_agree_on_identical_images_and_per_image_merges_more(model):
    same = images("same")
    a, b = run(mpm(model, batch_policy="batch_min"), same), run(mpm(model, batch_policy="per_image"), same)
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.logits, b.logits)
    mixed = images()
    a, b = run(mpm(model, batch_policy="batch_min"), mixed), run(mpm(model, batch_policy="per_image"), mixed)
    assert (b.tokens <= a.tokens).all() and (b.tokens < a.tokens).any()


# ------------------------------------------------------------------ GFLOPs


@pytest.mark.parametrize("opts", [{}, {"steps": "1,2,3,4"}, {"batch_policy": "batch_min"}])
def test_gflops_counted_and_lower_than_none(model, opts):
    m = mpm(model, **opts)
    x = images()[:1]
    assert uncounted_ops(m, x) == {}
    assert count_flops(m, x) < count_flops(model, x)


# ------------------------------------------------------------------ registry and options


def test_defaults_per_depth_and_settings():
    assert default_steps(12) == (3, 6) and default_steps(24) == (5, 11)
    for name, steps in (("vit-s16", (3, 6)), ("vit-s14", (3, 6)), ("vit-l16", (5, 11))):
        method = build_method("mpm", get_backbone(name), CAMVID)
        assert isinstance(method, MPM) and method.steps == steps
    method = build_method("mpm", get_backbone("vit-s16"), CAMVID, steps=[2, 4, 6], batch_policy="batch_min")
    assert method.settings() == {"steps": "2,4,6", "batch_policy": "batch_min"}
    assert method.label() == "mpm (steps=2,4,6)"
    assert build_method("mpm", TINY, CAMVID, steps="none").settings()["steps"] == "none"
    assert build_method("mpm", TINY, CAMVID, steps=3).steps == (3,)


def test_command_line_options():
    parser = argparse.ArgumentParser()
    add_method_options(parser, "mpm")
    for argv, steps in ((["--steps", "3", "6"], (3, 6)), (["--steps", "2,4,6"], (2, 4, 6)),
                        (["--steps", "none"], ())):
        opts = method_options(parser.parse_args(argv), "mpm")
        assert build_method("mpm", get_backbone("vit-s16"), CAMVID, **opts).steps == steps


@pytest.mark.parametrize("bad", [
    {"steps": "3,x"}, {"steps": (6, 3)}, {"steps": (3, 3)}, {"steps": (0, 3)}, {"steps": (3, 13)},
    {"steps": 3.5}, {"steps": (3.0, 6.0)}, {"batch_policy": "max"},
])
def test_bad_options_raise_one_line_naming_the_option(bad):
    with pytest.raises(ValueError, match=next(iter(bad)).replace("_", ".")) as err:
        build_method("mpm", get_backbone("vit-s16"), CAMVID, **bad)
    assert "\n" not in str(err.value)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_equals_cpu(model):
    from algm.measure.throughput import cuda_settings

    m = mpm(model, steps="1,2,3")
    x = images()
    cpu = run(m, x)
    # TF32 off: cuDNN would run the patch-embed convolution in TF32 (1e-3 error)
    with cuda_settings(torch.device("cuda"), tf32=False, cudnn_benchmark=False):
        gpu = run(copy.deepcopy(m).to("cuda"), x.to("cuda"))
    assert torch.equal(gpu.tokens.cpu(), cpu.tokens)
    torch.testing.assert_close(gpu.logits.cpu(), cpu.logits, atol=1e-4, rtol=1e-4)
