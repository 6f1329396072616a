"""ALGM's merging kernels on hand-built and random tensors (no model)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from algm.merging.bipartite import (adaptive_threshold, bipartite_plan, bipartite_scores,
                                    global_merge, merge_counts, top_r_mask)
from algm.merging.index_map import (apply_token_map, compose_source, inverse_permutation, keep_mask,
                                    merge_by_index)
from algm.merging.local import gather_windows, local_merge, select_windows, window_index, window_scores
from algm.reduction import TokenState, prepend_cls

D = 8
HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


def make_state(patches: torch.Tensor, grid, cls: torch.Tensor | None = None) -> TokenState:
    """Unreduced state from (B, N, D) patches; cls defaults to a fixed vector."""
    if cls is None:
        cls = torch.full((1, 1, patches.shape[-1]), 0.5)
    return prepend_cls(TokenState.identity(patches, grid), cls)


def e(i: int, d: int = D) -> torch.Tensor:
    v = torch.zeros(d)
    v[i] = 1.0
    return v


def hand_built(similar_w0: bool = True) -> torch.Tensor:
    """(16, D) patches of a 4x4 grid.

    windows (raster): w0 = patches 0,1,4,5; w1 = 2,3,6,7; w2 = 8,9,12,13; w3 = 10,11,14,15.
    w3: parallel tokens (score 1); w0: e1 +- small (score ~0.89) or orthogonal;
    w1: orthogonal (score 0); w2: two opposite pairs (score -1/3).
    """
    p = torch.zeros(16, D)
    for k, i in enumerate((10, 11, 14, 15)):
        p[i] = (k + 1) * e(0)
    if similar_w0:
        for i, v in zip((0, 1, 4, 5), (e(2), -e(2), e(3), -e(3))):
            p[i] = e(1) + 0.3 * v
    else:
        for i, j in zip((0, 1, 4, 5), (1, 2, 3, 5)):
            p[i] = e(j)
    for i, j in zip((2, 3, 6, 7), (4, 5, 6, 7)):
        p[i] = e(j)
    for i, v in zip((8, 9, 12, 13), (e(4), -e(4), e(5), -e(5))):
        p[i] = v
    return p


def check_source(state: TokenState) -> None:
    """Every patch maps to exactly one real token and sizes count the patches."""
    b, t, _ = state.x.shape
    assert state.source.shape == (b, state.grid[0] * state.grid[1])
    assert state.source.min() >= 0 and state.source.max() < t - 1
    counts = torch.zeros(b, t - 1).scatter_add_(1, state.source, torch.ones(state.source.shape))
    assert torch.equal(counts, state.size[:, 1:].float())
    assert torch.equal(state.size[:, 0], torch.ones(b))
    if state.keep is not None:
        # padding holds no patch and sits behind the real tokens
        assert not (counts > 0)[~state.keep[:, 1:]].any()
        assert torch.equal(state.keep, torch.sort(state.keep.int(), 1, descending=True).values.bool())


@pytest.fixture
def host_reads(monkeypatch):
    """Records every tensor value read back to the host (a sync on an accelerator)."""
    calls = []
    for name in HOST_READS:
        def counted(self, *args, _original=getattr(torch.Tensor, name), _name=name, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


# ---------------------------------------------------------------- local stage


def test_window_index_raster_order():
    assert window_index((4, 4)).tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    assert window_index((2, 6)).tolist() == [[0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10, 11]]
    # odd sides: the last row / column belongs to no window
    assert window_index((3, 5)).tolist() == [[0, 1, 5, 6], [2, 3, 7, 8]]
    assert window_index((1, 4)).shape == (0, 4)
    for grid in ((4, 6), (3, 5), (5, 2)):
        p = torch.randn(2, grid[0] * grid[1], 3)
        assert torch.equal(gather_windows(p, grid), p[:, window_index(grid)])


def test_window_score_is_mean_of_six_pair_cosines():
    torch.manual_seed(0)
    xw = torch.randn(2, 3, 4, 16)
    pairs = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    direct = torch.stack([F.cosine_similarity(xw[:, :, i], xw[:, :, j], dim=-1) for i, j in pairs]).mean(0)
    torch.testing.assert_close(window_scores(xw), direct)
    scores = window_scores(hand_built()[window_index((4, 4))].unsqueeze(0))[0]
    torch.testing.assert_close(scores, torch.tensor([(2 * 0.91 + 4 * 1.0) / 6 / 1.09, 0.0, -1 / 3, 1.0]))


def test_hand_built_grid_merges_the_similar_windows_in_score_order():
    p = hand_built()
    cls = torch.full((1, 1, D), 0.5)
    out = local_merge(make_state(p[None], (4, 4), cls), tau=0.8)
    unmerged = [2, 3, 6, 7, 8, 9, 12, 13]
    expected = torch.cat([cls[0], 2.5 * e(0)[None], e(1)[None], p[unmerged]])
    torch.testing.assert_close(out.x[0], expected)
    assert out.size[0].tolist() == [1, 4, 4] + [1] * 8
    assert out.keep is None
    source = [1, 1, 2, 3, 1, 1, 4, 5, 6, 7, 0, 0, 8, 9, 0, 0]
    assert out.source[0].tolist() == source
    check_source(out)
    # a stricter tau keeps only the perfect window
    out = local_merge(make_state(p[None], (4, 4), cls), tau=0.95)
    assert out.x.shape[1] == 1 + 1 + 12
    torch.testing.assert_close(out.x[0, 1], 2.5 * e(0))
    check_source(out)


def test_tau_above_one_merges_nothing_and_minus_one_merges_every_window():
    torch.manual_seed(0)
    state = make_state(torch.randn(3, 24, D), (4, 6))
    assert local_merge(state, tau=1.000001) is state
    out = local_merge(state, tau=-1.0)
    assert out.x.shape[1] == 1 + 6 and out.keep is None
    assert torch.equal(out.size[:, 1:], torch.full((3, 6), 4.0))
    check_source(out)
    # identical tokens score exactly 1 (up to rounding): tau = 1 merges them
    same = make_state(torch.ones(1, 16, D), (4, 4))
    assert local_merge(same, tau=1.0 - 1e-6).x.shape[1] == 1 + 4


def test_hand_built_order_with_tau_minus_one():
    out = local_merge(make_state(hand_built()[None], (4, 4)), tau=-1.0)
    # windows in descending score: w3 (1), w0 (0.89), w1 (0), w2 (-1/3)
    assert out.source[0].reshape(2, 2, 2, 2).permute(0, 2, 1, 3).reshape(4, 4)[:, 0].tolist() == [1, 2, 3, 0]


def test_batch_policies_on_hand_built_batch():
    p1, p2 = hand_built(True), hand_built(False)  # image 1: two windows >= 0.8, image 2: one
    state = make_state(torch.stack([p1, p2]), (4, 4))
    scores = window_scores(state.x[:, 1:][:, window_index((4, 4))])
    assert select_windows(scores, 0.8, per_image=True).sum(1).tolist() == [2, 1]
    assert select_windows(scores, 0.8, per_image=False).sum(1).tolist() == [1, 1]

    authors = local_merge(state, 0.8, per_image=False)
    assert authors.x.shape[1] == 14 and authors.keep is None
    own = local_merge(state, 0.8, per_image=True)
    assert own.x.shape[1] == 14
    assert own.keep.sum(1).tolist() == [11, 14]
    check_source(own)
    # padding is zero with size 0; each image equals its own unbatched merge
    assert torch.equal(own.x[0, 11:], torch.zeros(3, D)) and torch.equal(own.size[0, 11:], torch.zeros(3))
    for i, p in enumerate((p1, p2)):
        alone = local_merge(make_state(p[None], (4, 4)), 0.8)
        n = alone.x.shape[1]
        assert torch.equal(own.x[i, :n], alone.x[0])
        assert torch.equal(own.source[i], alone.source[0])


@pytest.mark.parametrize("grid", [(3, 5), (5, 4), (1, 3)])
def test_odd_grid_leaves_last_row_and_column_unmerged(grid):
    h, w = grid
    n = h * w
    state = make_state(torch.ones(2, n, D) + 0.01 * torch.randn(2, n, D), grid)
    out = local_merge(state, tau=-1.0)
    windows = (h // 2) * (w // 2)
    assert out.x.shape[1] == 1 + n - 3 * windows
    check_source(out)
    edge = [i for i in range(n) if i // w >= 2 * (h // 2) or i % w >= 2 * (w // 2)]
    assert torch.equal(out.size[:, 1 + windows:], torch.ones(2, len(edge)))
    # edge patches are the last tokens, in raster order
    assert out.source[:, edge].tolist() == [list(range(windows, windows + len(edge)))] * 2


def authors_local(x: torch.Tensor, tau: float, ws: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' conditional_pooling + merge_wavg (square grid), ported to CPU."""
    x_cls, feat = x[:, :1], x[:, 1:]
    b, n, d = feat.shape
    h = int(n ** 0.5)
    g = feat.reshape(b, h, h, d).permute(0, 3, 1, 2)
    g = g.reshape(b, d, h // ws, ws, h // ws, ws).permute(0, 2, 4, 1, 3, 5)
    flat = g.reshape(b, h // ws, h // ws, d, -1)
    sims = F.cosine_similarity(flat.unsqueeze(-1), flat.unsqueeze(-2), dim=3)
    sims = sims * (1 - torch.eye(ws * ws))
    sim_map = (sims.sum(-1).sum(-1) / (ws * ws * (ws * ws - 1))).reshape(b, -1)
    r = int(torch.ge(sim_map, tau).sum(1).min())
    _, top = sim_map.topk(r, dim=-1)
    grid = torch.arange(n).reshape(h, h).unsqueeze(0).repeat(b, 1, 1)
    win = grid.unfold(1, ws, ws).unfold(2, ws, ws).reshape(b, -1, ws * ws)
    gathered = torch.gather(win, 1, top.unsqueeze(-1).expand(-1, -1, ws * ws))
    mask = torch.ones(b, win.shape[1], dtype=torch.bool)
    mask.scatter_(1, top, False)
    unm_idx = win[mask.unsqueeze(-1).expand(-1, -1, ws * ws)].reshape(b, -1).sort(-1).values.unsqueeze(-1)
    k = ws * ws - 1
    src_idx = gathered[:, :, :k].reshape(b, -1).unsqueeze(-1)
    dst_idx = gathered[:, :, k].reshape(b, -1).unsqueeze(-1)
    merge_idx = torch.arange(r).repeat_interleave(k).repeat(b, 1).unsqueeze(-1)

    def merge(t):
        t_cls, t_feat = t[:, :1], t[:, 1:]
        c = t_feat.shape[-1]
        src = t_feat.gather(1, src_idx.expand(b, r * k, c))
        dst = t_feat.gather(1, dst_idx.expand(b, r, c))
        unm = t_feat.gather(1, unm_idx.expand(b, n - r * (k + 1), c))
        dst = dst.scatter_reduce(1, merge_idx.expand(b, r * k, c), src, reduce="sum")
        return torch.cat([t_cls, dst, unm], 1)

    size = torch.ones_like(x[..., :1])
    return merge(x * size) / merge(size), merge(size)[..., 0]


@pytest.mark.parametrize("tau", [0.3, 0.6, 2.0])
def test_local_stage_matches_authors_code(tau):
    torch.manual_seed(1)
    base = torch.randn(3, 1, 1, D)
    noise = torch.tensor([0.5, 0.8, 1.1]).view(3, 1, 1, 1)  # images differ: r = min < counts
    patches = (base + noise * torch.randn(3, 8, 8, D)).reshape(3, 64, D)
    state = make_state(patches, (8, 8))
    ref_x, ref_size = authors_local(state.x, tau)
    out = local_merge(state, tau, per_image=False)
    torch.testing.assert_close(out.x, ref_x)
    assert torch.equal(out.size, ref_size)


# ---------------------------------------------------------------- global stage


def direct_threshold(x: torch.Tensor, g: int):
    """The formula of SPEC section 2 written out on an unpadded (B, T, D) tensor."""
    xn = x / x.norm(dim=-1, keepdim=True)
    a, b = xn[:, ::2], xn[:, 1::2]
    node_max = (a @ b.transpose(1, 2)).max(-1).values[:, 1:]
    pooled = node_max.mean(1).mean() + node_max.std(1).mean() / g
    own = node_max.mean(1) + node_max.std(1) / g
    return (pooled, (node_max >= pooled).sum(1).min(), own, (node_max >= own[:, None]).sum(1))


@pytest.mark.parametrize("t", [24, 25])
def test_global_threshold_and_r_match_the_formula(t):
    torch.manual_seed(2)
    x = torch.randn(4, 1, D) + 0.7 * torch.randn(4, t, D)
    g = 5
    pooled, r_min, own, r_own = direct_threshold(x, g)
    node_max, _ = bipartite_scores(x)
    assert torch.isinf(node_max[:, 0]).all()  # cls is never a candidate
    thr = adaptive_threshold(node_max, g, pooled=True)
    torch.testing.assert_close(thr.float(), pooled.expand(4))
    assert merge_counts(node_max, thr).min() == r_min
    thr = adaptive_threshold(node_max, g, pooled=False)
    torch.testing.assert_close(thr.float(), own)
    assert torch.equal(merge_counts(node_max, thr), r_own)
    assert r_own.min() > 0 and (r_own != r_own[0]).any()  # a meaningful, mixed case
    for per_image, r in ((False, r_min.expand(4)), (True, r_own)):
        out = global_merge(make_state(x[:, 1:], (1, t - 1), x[:1, :1]).replace(x=x), g, per_image)
        if per_image:  # front-packed, padded to the longest image
            assert out.keep.sum(1).tolist() == (t - r).tolist() and out.x.shape[1] == t - r.min()
        else:
            assert out.keep is None and out.x.shape[1] == t - r_min
        check_source(out)


def authors_global(x: torch.Tensor, size: torch.Tensor, r: int):
    """The authors' turbo_matching (fixed r) + merge_wavg, ported."""
    metric = x / x.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    scores[..., 0, :] = -float("inf")
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx = edge_idx[..., r:, :].sort(dim=1)[0]
    src_idx = edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)

    def merge(t):
        src, dst = t[..., ::2, :], t[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(-2, unm_idx.expand(n, t1 - r, c))
        src = src.gather(-2, src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce="sum")
        return torch.cat([unm, dst], 1)

    s = size[..., None]
    return merge(x * s) / merge(s), merge(s)[..., 0]


@pytest.mark.parametrize("t", [17, 30])
def test_bipartite_merge_matches_authors_code(t):
    torch.manual_seed(3)
    x = torch.randn(2, 1, D) + 0.6 * torch.randn(2, t, D)
    size = torch.randint(1, 5, (2, t)).float()
    size[:, 0] = 1
    r = 5
    node_max, node_idx = bipartite_scores(x)
    lengths = torch.full((2,), t)
    dest, new_lengths = bipartite_plan(node_max, node_idx, torch.full((2,), r), lengths, t)
    assert new_lengths.tolist() == [t - r] * 2
    got_x, got_size = merge_by_index(x, size, dest, t - r)
    ref_x, ref_size = authors_global(x, size, r)
    torch.testing.assert_close(got_x, ref_x)
    torch.testing.assert_close(got_size, ref_size)


def test_top_r_mask_equals_a_stable_descending_sort():
    """Ties at the r-th value go to the lower index, for an int r and a per-image r."""
    g = torch.Generator().manual_seed(8)
    node_max = torch.randint(0, 4, (5, 13), generator=g).float()  # many ties
    node_max[:, 0] = float("-inf")  # cls: 12 candidates
    rank = inverse_permutation(node_max.argsort(dim=1, descending=True, stable=True))
    for r in range(13):
        if r:
            assert torch.equal(top_r_mask(node_max, r), rank < r)
        assert torch.equal(top_r_mask(node_max, torch.full((5,), r)), rank < r)
    per_image = torch.tensor([0, 3, 12, 1, 7])
    assert torch.equal(top_r_mask(node_max, per_image), rank < per_image[:, None])


def test_global_per_image_with_padding_equals_each_image_alone():
    torch.manual_seed(4)
    lengths = [21, 14, 18]
    states = []
    for n in lengths:
        x = torch.randn(1, 1, D) + 0.7 * torch.randn(1, n, D)
        states.append(make_state(x[:, 1:], (1, n - 1), x[:, :1]).replace(x=x))
    t = max(lengths)
    keep = keep_mask(torch.tensor(lengths), t)
    x = torch.zeros(3, t, D)
    size = torch.zeros(3, t)
    source = torch.zeros(3, t - 1, dtype=torch.long)
    for i, s in enumerate(states):
        x[i, : lengths[i]] = s.x[0]
        size[i, : lengths[i]] = 1
        # give padded images a valid source over their own patches, pad patches point at 0
        source[i, : lengths[i] - 1] = s.source[0]
    batch = TokenState(x=x, size=size, source=source, grid=(1, t - 1), keep=keep)
    out = global_merge(batch, 5, per_image=True)
    for i, s in enumerate(states):
        alone = global_merge(s, 5, per_image=True)
        n = alone.x.shape[1]
        assert int(out.keep[i].sum()) == n
        torch.testing.assert_close(out.x[i, :n], alone.x[0])
        assert torch.equal(out.size[i, :n], alone.size[0])
        assert torch.equal(out.source[i, : lengths[i] - 1], alone.source[0])
        assert (out.size[i, n:] == 0).all() and (out.x[i, n:] == 0).all()


def test_gradients_flow_through_the_averaging():
    torch.manual_seed(5)
    x = (torch.randn(2, 1, 1, D) + 0.3 * torch.randn(2, 4, 6, D)).reshape(2, 24, D).requires_grad_()
    state = make_state(x, (4, 6))
    out = global_merge(local_merge(state, 0.5, per_image=True), 2, per_image=True)
    assert out.x.shape[1] < 25
    out.x.sum().backward()
    # each final token is the plain mean of its patches: d sum / d patch = 1 / size
    expected = 1 / out.size[:, 1:].gather(1, out.source)
    torch.testing.assert_close(x.grad, expected.unsqueeze(-1).expand_as(x))


def test_one_host_read_per_algm_step_none_with_a_fixed_r(host_reads):
    """A step reads back only what sizes its output: one small tensor per ALGM stage
    (both policies, padded or not), nothing for a fixed r (ToMe's path)."""
    torch.manual_seed(6)
    noise = torch.tensor([0.5, 0.8, 1.1]).view(3, 1, 1)  # images merge different amounts
    state = make_state((torch.randn(3, 1, D) + noise * torch.randn(3, 64, D)), (8, 8))
    for per_image in (False, True):
        host_reads.clear()
        local = local_merge(state, 0.4, per_image)
        assert host_reads == ["tolist"]
        host_reads.clear()
        out = global_merge(local, 2, per_image)
        assert host_reads == ["tolist"]
        assert (local.keep is not None) == per_image
        assert out.num_tokens < local.num_tokens < state.num_tokens
    host_reads.clear()
    node_max, node_idx = bipartite_scores(state.x)
    dest, _ = bipartite_plan(node_max, node_idx, 5, None, 65)
    out = apply_token_map(state, dest, 60)
    assert host_reads == []
    assert out.num_tokens == 60


# ---------------------------------------------------------------- index map


def test_merge_by_index_and_compose_source():
    x = torch.tensor([[[1.0], [2.0], [4.0], [8.0], [9.0]]])
    size = torch.tensor([[1.0, 1.0, 3.0, 1.0, 0.0]])
    dest = torch.tensor([[0, 1, 1, 2, 3]])  # token 4 is padding -> trash slot 3
    out, new_size = merge_by_index(x, size, dest, 3)
    assert out[0, :, 0].tolist() == [1.0, (2 + 12) / 4, 8.0]
    assert new_size.tolist() == [[1.0, 4.0, 1.0]]
    source = torch.tensor([[2, 0, 1, 1, 1]])  # 5 patches over the 4 patch tokens
    assert compose_source(source, dest).tolist() == [[1, 0, 0, 0, 0]]
    assert keep_mask(torch.tensor([3, 3]), 3) is None
    assert keep_mask(torch.tensor([3, 1]), 3).tolist() == [[True] * 3, [True, False, False]]
