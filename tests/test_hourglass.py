"""Hourglass: clustering and reconstruction against slow loop references, the method
contract, GFLOPs and option validation."""

import math

import pytest
import torch
import torch.nn.functional as F

from algm.config import DecoderConfig, ViTConfig, get_backbone, get_dataset
from algm.measure.flops import count_flops, uncounted_ops
from algm.methods import build_method
from algm.model.segmenter import build_segmenter
from baselines.hourglass import (Clustered, cluster_grid, nearest_centres, parse_clusters,
                                 reconstruct, soft_kmeans, window_index)
from tiny_inputs import noise_images

CAMVID = get_dataset("camvid")
CFG = ViTConfig("tiny", 64, 4, 2, 16, pos_grid=(4, 6))  # 64 x 96 images: a 4 x 6 grid


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(method=None, decoder="mask"):
    torch.manual_seed(0)
    return build_segmenter(CFG, 5, DecoderConfig(decoder), method).eval()


images = noise_images


def hourglass(**opts):
    return build_method("hourglass", CFG, CAMVID, **opts)


# ------------------------------------------------------------------ slow references


def slow_soft_kmeans(x, grid, cgrid, window, iterations, temperature):
    """The paper's rule, one image, loops: x (N, D) -> centres (M, D). Centres start as
    the adaptive average pool (torch's cells: rows floor(i h / h') .. ceil((i+1) h / h'));
    token n's home centre is (floor(row h' / h), floor(col w' / w)) and it sees the
    centres within window // 2 rows and columns of it; assignment = softmax over those of
    -|x - c|^2 / temperature; centre = assignment-weighted mean of the tokens."""
    (h, w), (ch, cw) = grid, cgrid
    n, m, r = h * w, ch * cw, window // 2
    centres = []
    for i in range(ch):
        for j in range(cw):
            cell = [x[a * w + c] for a in range(i * h // ch, -(-(i + 1) * h // ch))
                    for c in range(j * w // cw, -(-(j + 1) * w // cw))]
            centres.append(sum(cell) / len(cell))
    centres = torch.stack(centres)
    home = [((t // w) * ch // h, (t % w) * cw // w) for t in range(n)]
    for _ in range(iterations):
        assign = torch.zeros(n, m, dtype=x.dtype)
        for t in range(n):
            seen = [c for c in range(m) if abs(c // cw - home[t][0]) <= r and abs(c % cw - home[t][1]) <= r]
            logits = torch.stack([-((x[t] - centres[c]) ** 2).sum() / temperature for c in seen])
            for c, a in zip(seen, logits.softmax(0)):
                assign[t, c] = a
        centres = torch.stack([sum(assign[t, c] * x[t] for t in range(n))
                               / assign[:, c].sum().clamp_min(1e-16) for c in range(m)])
    return centres


def slow_reconstruction(x, centres_alpha, centres_final, k, temperature):
    """One image, loops: token n = sum over its k nearest centres (squared L2 at alpha)
    of softmax(-d / temperature) * final centre."""
    out = []
    for t in range(x.shape[0]):
        d = [((x[t] - c) ** 2).sum() for c in centres_alpha]
        order = sorted(range(len(d)), key=lambda c: float(d[c]))[:k]
        w = torch.stack([-d[c] / temperature for c in order]).softmax(0)
        out.append(sum(wi * centres_final[c] for wi, c in zip(w, order)))
    return torch.stack(out)


@pytest.mark.parametrize("grid,cgrid,window", [((5, 7), (3, 4), 3), ((6, 6), (4, 4), 5),
                                               ((4, 9), (2, 5), 1), ((5, 7), (5, 7), 3)])
def test_clustering_equals_slow_local_soft_kmeans(grid, cgrid, window):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, grid[0] * grid[1], 6, generator=g, dtype=torch.float64)
    fast = soft_kmeans(x, grid, cgrid, window, iterations=3, temperature=4.0)
    for b in range(2):
        slow = slow_soft_kmeans(x[b], grid, cgrid, window, 3, 4.0)
        assert torch.allclose(fast[b], slow, atol=1e-10)


def test_zero_iterations_is_the_pooled_grid():
    x = torch.randn(1, 20, 3, dtype=torch.float64)
    pooled = F.adaptive_avg_pool2d(x.transpose(1, 2).reshape(1, 3, 4, 5), (3, 2)).flatten(2).transpose(1, 2)
    assert torch.allclose(soft_kmeans(x, (4, 5), (3, 2), 5, 0, 1.0), pooled)


def test_window_clips_at_the_border():
    index, valid = window_index((4, 4), (4, 4), 3, "cpu")
    assert index.shape == (16, 9)
    assert valid[0].tolist() == [False] * 4 + [True, True, False, True, True]  # top-left corner
    assert valid[5].all() and index[5].tolist() == [0, 1, 2, 4, 5, 6, 8, 9, 10]


def test_reconstruction_equals_slow_rule_and_weights_sum_to_one():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 12, 5, generator=g, dtype=torch.float64)
    alpha = torch.randn(2, 7, 5, generator=g, dtype=torch.float64)
    final = torch.randn(2, 7, 4, generator=g, dtype=torch.float64)
    index, weight = nearest_centres(x, alpha, k=3, temperature=2.0, norm="softmax")
    assert index.shape == weight.shape == (2, 12, 3)
    assert torch.allclose(weight.sum(-1), torch.ones(2, 12, dtype=torch.float64))
    assert (weight >= 0).all()
    out = reconstruct(final, index, weight)
    for b in range(2):
        assert torch.allclose(out[b], slow_reconstruction(x[b], alpha[b], final[b], 3, 2.0))
    # the authors' variant: the same exponentials, unit L2 norm instead of unit sum
    index2, w2 = nearest_centres(x, alpha, k=3, temperature=2.0, norm="l2")
    assert torch.equal(index2, index)
    assert torch.allclose(w2.norm(dim=-1), torch.ones(2, 12, dtype=torch.float64))
    assert torch.allclose(w2 / w2.sum(-1, keepdim=True), weight)
    # k is capped at the number of centres
    assert nearest_centres(x, alpha, k=50, temperature=2.0, norm="softmax")[0].shape == (2, 12, 7)


def test_full_grid_sharp_k1_is_the_identity():
    """Clusters = the token grid, a tiny temperature and k = 1: every centre stays its
    own token and every token reconstructs itself."""
    x = torch.randn(2, 20, 8, generator=torch.Generator().manual_seed(2))
    centres = soft_kmeans(x, (4, 5), (4, 5), 5, iterations=5, temperature=1e-4)
    assert torch.allclose(centres, x, atol=1e-6)
    index, weight = nearest_centres(x, centres, k=1, temperature=1e-4, norm="softmax")
    assert torch.equal(index[..., 0], torch.arange(20).expand(2, -1))
    assert torch.allclose(reconstruct(centres, index, weight), x, atol=1e-6)
    index, weight = nearest_centres(x, centres, k=4, temperature=1e-4, norm="softmax")
    assert torch.allclose(reconstruct(centres, index, weight), x, atol=1e-5)


# ------------------------------------------------------------------ contract


def final_state(model, x):
    with torch.no_grad():
        return model.encoder(x, model.method)


@pytest.mark.parametrize("reconstruction", ["softmax", "l2", "upsample"])
def test_index_map_sizes_and_token_counts(reconstruction):
    model = tiny(hourglass(reconstruction=reconstruction))
    x = images(3)
    state, alive = final_state(model, x)
    m = 3 * 4  # 0.7 of the 4 x 6 grid
    assert model.method.alpha == 2  # round(4 * 10 / 24)
    assert alive.tolist() == [[25, 1 + m, 1 + m, 1 + m]] * 3
    assert state.keep is None and state.num_tokens == 1 + m
    assert int(state.source.min()) >= 0 and int(state.source.max()) < m
    counts = torch.stack([torch.bincount(s, minlength=m) for s in state.source]).to(state.size.dtype)
    assert torch.equal(state.size[:, 1:], counts)
    assert torch.equal(state.size.sum(1), torch.full((3,), 1.0 + 24))
    assert torch.equal(model.method.token_map(state), state.source)
    dec = model.method.before_decoder(state)
    if reconstruction == "upsample":
        assert dec is state
    else:
        assert dec.num_tokens == 1 + 24 and dec.aux is None
        assert torch.equal(dec.source, torch.arange(24).expand(3, -1))
        assert torch.equal(dec.size, torch.ones(3, 25))
        assert torch.equal(dec.x[:, 0], state.x[:, 0])  # cls untouched
    with torch.no_grad():
        out = model.run(x)
    assert out.token_logits.shape == (3, 24, 5) and out.logits.shape == (3, 5, 64, 96)
    assert torch.isfinite(out.logits).all()


def test_upsample_restores_by_bilinear_resize():
    method = hourglass(reconstruction="upsample")
    state, _ = final_state(tiny(method), images(2))
    assert state.aux == Clustered((3, 4))
    per_centre = torch.randn(2, 12, 5)
    expected = F.interpolate(per_centre.transpose(1, 2).reshape(2, 5, 3, 4), size=(4, 6),
                             mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    assert torch.allclose(method.restore(per_centre, state), expected)


@pytest.mark.parametrize("reconstruction", ["softmax", "upsample"])
def test_images_do_not_depend_on_batch_neighbours(reconstruction):
    model = tiny(hourglass(reconstruction=reconstruction, clusters="2x3"))
    x = images(3, seed=4)
    with torch.no_grad():
        batched = model.run(x)
        for b in range(3):
            alone = model.run(x[b:b + 1])
            assert torch.allclose(batched.logits[b], alone.logits[0], atol=1e-5)
            assert torch.equal(batched.tokens[b], alone.tokens[0])


@pytest.mark.parametrize("decoder", ["mask", "linear"])
@pytest.mark.parametrize("clusters", ["1", "4x6", "1.0x1.0"])
def test_cluster_grid_equal_to_token_grid_equals_none(decoder, clusters):
    model = tiny(decoder=decoder)
    x = images()
    with torch.no_grad():
        ref = model.run(x)
        out = model.with_method(hourglass(clusters=clusters)).run(x)
    assert torch.equal(out.logits, ref.logits)
    assert torch.equal(out.token_logits, ref.token_logits)
    assert torch.equal(out.tokens, ref.tokens)


def test_gradients_flow_through_the_centres():
    model = tiny(hourglass())
    model.train()
    model.run(images(1)).logits.sum().backward()
    assert model.encoder.blocks[0].mlp.fc1.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------ GFLOPs


@pytest.mark.parametrize("reconstruction", ["softmax", "l2", "upsample"])
def test_flops_are_counted_and_reduced(reconstruction):
    model = tiny(hourglass(reconstruction=reconstruction, alpha=1))
    x = images(1)
    assert uncounted_ops(model, x) == {}
    assert count_flops(model, x) < count_flops(model.with_method(build_method("none", CFG, CAMVID)), x)


def test_flops_include_clustering_and_reconstruction():
    """The clustering (N K D per distance and per update) and the reconstruction search
    (N M D) and mix (N k D) are matmuls fvcore counts: more iterations, more FLOPs."""
    x = images(1)
    few = count_flops(tiny(hourglass(iterations=1)), x)
    many = count_flops(tiny(hourglass(iterations=3)), x)
    n, kw, d = 24, 25, 64
    assert math.isclose((many - few) * 1e9, 2 * 2 * n * kw * d, rel_tol=1e-6)


# ------------------------------------------------------------------ registry and options


def test_registry_defaults_and_settings():
    m = hourglass()
    assert m.settings() == {"alpha": 2, "clusters": "0.7", "iterations": 5, "window": 5,
                            "temperature": 50.0, "k": 20, "recon_temperature": 50.0,
                            "reconstruction": "softmax"}
    assert m.label() == "hourglass (alpha=2, clusters=0.7)"
    for name, alpha, temperature in (("vit-s16", 5, 50.0), ("vit-l16", 10, 50.0), ("vit-s14", 5, 0.05),
                                     ("vit-s16-dinov2", 5, 0.05)):
        m = build_method("hourglass", get_backbone(name), CAMVID)
        assert (m.alpha, m.temperature, m.recon_temperature) == (alpha, temperature, temperature)
    m = build_method("hourglass", get_backbone("vit-s14"), CAMVID, temperature=1.0)
    assert (m.temperature, m.recon_temperature) == (1.0, 0.05)
    assert hourglass(clusters=0.5).settings()["clusters"] == "0.5"  # a YAML number
    assert hourglass(clusters="20x20").cluster_spec == (20, 20)


def test_cluster_grid_parsing():
    assert parse_clusters("0.7") == (0.7, 0.7)
    assert parse_clusters("0.5x0.25") == (0.5, 0.25)
    assert parse_clusters("28x28") == (28, 28)
    assert cluster_grid(parse_clusters("0.7"), (24, 32)) == (17, 22)
    assert cluster_grid(parse_clusters("0.7"), (40, 40)) == (28, 28)
    assert cluster_grid(parse_clusters("0.01"), (24, 32)) == (1, 1)
    with pytest.raises(ValueError, match="exceed the 4x6 token grid"):
        cluster_grid((5, 5), (4, 6))


@pytest.mark.parametrize("opts,word", [
    ({"alpha": 0}, "alpha"), ({"alpha": 5}, "alpha"), ({"alpha": 1.5}, "alpha"),
    ({"clusters": "abc"}, "clusters"), ({"clusters": "0"}, "clusters"), ({"clusters": "1.5"}, "clusters"),
    ({"clusters": "3x0"}, "clusters"), ({"clusters": "2x3x4"}, "clusters"),
    ({"iterations": -1}, "iterations"), ({"iterations": "many"}, "iterations"),
    ({"window": 4}, "window"), ({"window": 0}, "window"), ({"k": 0}, "k"),
    ({"temperature": 0.0}, "temperature"), ({"recon_temperature": -1.0}, "recon_temperature"),
    ({"temperature": float("inf")}, "temperature"), ({"reconstruction": "dense"}, "reconstruction"),
    ({"tau": 0.9}, "tau"),
])
def test_option_errors_are_one_line_naming_the_option(opts, word):
    with pytest.raises(ValueError) as err:
        hourglass(**opts)
    assert word in str(err.value) and "\n" not in str(err.value)


def test_cluster_grid_larger_than_the_input_fails_in_one_line():
    model = tiny(hourglass(clusters="8x8"))
    with pytest.raises(ValueError, match="clusters 8x8 exceed"):
        model.run(images(1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_runs_on_cuda_like_on_cpu():
    model = tiny(hourglass())
    x = images(2)
    with torch.no_grad():
        cpu = model.run(x).logits
        gpu = model.cuda().run(x.cuda()).logits.cpu()
    assert torch.allclose(cpu, gpu, atol=1e-3)
