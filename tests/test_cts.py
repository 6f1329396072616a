"""CTS baseline: token sharing, policies (variance, oracle, learned), index map, errors."""

import pytest
import torch
import torch.nn.functional as F

from algm.config import DecoderConfig, ViTConfig, get_dataset
from algm.data.datasets import DEFAULT_CAMVID_ROOT, Sample
from algm.data.windows import tiles
from algm.methods import build_method, required_training
from algm.model.segmenter import build_segmenter
from algm.reduction import TokenState, TrainingContext
from baselines.cts import CTS, default_k_ratio
from baselines.cts_policy import PolicyNet, majority_fraction, policy_path, variance_scores
from baselines.cts_train import prepare_windows, superpatch_targets, train_policy
from tiny_inputs import noise_images

CAMVID = get_dataset("camvid")
P = 16
GRID = (4, 6)  # 64 x 96 input: 2 x 3 = 6 superpatches, 24 patches


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ALGM_BENCH_CACHE", str(tmp_path))
    return tmp_path


def cfg(depth=4):
    return ViTConfig("tiny", 64, depth, 2, P, pos_grid=GRID)


def tiny(method=None, decoder="mask"):
    torch.manual_seed(0)
    return build_segmenter(cfg(), 5, DecoderConfig(decoder), method).eval()


images = noise_images


def cts(**opts):
    return build_method("cts", cfg(), CAMVID, **opts)


def shared_superpatches(state: TokenState, with_cls: bool = True) -> list[list[int]]:
    """Superpatch ids (raster) whose 4 patches share one token, per image."""
    h, w = state.grid
    out = []
    for src, size in zip(state.source, state.size[:, 1:] if with_cls else state.size):
        grid = src.view(h, w)
        ids = []
        for i in range(h // 2):
            for j in range(w // 2):
                block = grid[2 * i: 2 * i + 2, 2 * j: 2 * j + 2]
                if (block == block[0, 0]).all() and size[block[0, 0]] == 4:
                    ids.append(i * (w // 2) + j)
        out.append(ids)
    return out


def check_index_map(state: TokenState, n: int):
    t = state.num_tokens - 1
    assert state.source.shape[1] == n
    assert int(state.source.min()) >= 0 and int(state.source.max()) < t
    counts = torch.stack([torch.bincount(s, minlength=t) for s in state.source]).to(state.size.dtype)
    assert torch.equal(state.size[:, 1:], counts)


# ------------------------------------------------------------------ no reduction


@pytest.mark.parametrize("decoder", ["mask", "linear"])
@pytest.mark.parametrize("opts", [{"k": 0}, {"k_ratio": 0.0}, {"k": 0, "policy": "oracle"}])
def test_no_sharing_equals_none(decoder, opts):
    model = tiny(decoder=decoder)
    x = images()
    labels = torch.randint(0, 5, (2, 64, 96))
    with torch.no_grad():
        ref = model.run(x)
        out = model.with_method(cts(**opts)).run(x, labels)
    assert torch.equal(out.logits, ref.logits)
    assert torch.equal(out.token_logits, ref.token_logits)
    assert torch.equal(out.tokens, ref.tokens)


# ------------------------------------------------------------------ sharing


def test_shared_superpatch_logits_identical_at_its_four_positions():
    model = tiny(cts(k=2))
    x = images()
    with torch.no_grad():
        state, alive = model.encoder(x, model.method)
        out = model.run(x)
    grid = out.token_logits.view(2, *GRID, 5)
    ids = shared_superpatches(state)
    assert [len(i) for i in ids] == [2, 2]
    for b, chosen in enumerate(ids):
        for s in chosen:
            i, j = divmod(s, GRID[1] // 2)
            block = grid[b, 2 * i: 2 * i + 2, 2 * j: 2 * j + 2].reshape(4, 5)
            assert torch.equal(block, block[:1].expand(4, -1))
    assert alive.tolist() == [[24 - 3 * 2 + 1] * 4] * 2


@pytest.mark.parametrize("opts", [{"k": 1}, {"k": 4}, {"k": 6}, {}, {"k_ratio": 0.5}])
def test_every_patch_maps_to_one_token(opts):
    method = cts(**opts)
    model = tiny(method)
    x = images(b=3)
    with torch.no_grad():
        state, alive = model.encoder(x, method)
    k = method.k_for(6)
    check_index_map(state, 24)
    assert state.num_tokens == 1 + 24 - 3 * k
    assert (alive == state.num_tokens).all()
    # order: [cls, unshared (size 1), shared (size 4)]
    assert state.size[:, 1:].tolist() == [[1.0] * (24 - 4 * k) + [4.0] * k] * 3


def test_shared_token_embedding_and_order():
    """Shared token = patch conv of the 2x2-averaged pixels + mean of its 4 pos-embeds;
    unshared patches keep their embeddings, in raster order."""
    model = tiny()
    enc = model.encoder
    x = images(b=1)
    method = CTS("variance", k=1)
    with torch.no_grad():
        pos = enc.patch_pos(GRID)
        patches = enc.patch_embed(x) + pos
        from algm.reduction import EncoderContext
        ctx = EncoderContext(images=x, grid=GRID, patch_size=P, pos=pos,
                             embed=lambda px: enc.patch_embed(px)[:, 0], depth=4)
        state = method.begin(patches, ctx)
    s = shared_superpatches(state, with_cls=False)[0][0]
    i, j = divmod(s, 3)
    region = x[:, :, 32 * i: 32 * i + 32, 32 * j: 32 * j + 32]
    small = F.interpolate(region, scale_factor=0.5, mode="bilinear", align_corners=False)  # authors
    four = [(2 * i + di) * 6 + 2 * j + dj for di in (0, 1) for dj in (0, 1)]
    expected = enc.patch_embed(small)[0, 0] + pos[0, four].mean(0)
    assert torch.allclose(state.x[0, -1], expected, atol=1e-5)
    unshared = [n for n in range(24) if n not in four]
    assert torch.equal(state.x[0, :-1], patches[0, unshared])
    assert state.source[0, four].tolist() == [20] * 4
    assert state.source[0, unshared].tolist() == list(range(20))


def test_batch_equals_single_images():
    model = tiny(cts(k=3))
    x = images(b=3)
    with torch.no_grad():
        batch = model(x)
        single = torch.cat([model(x[i: i + 1]) for i in range(3)])
    assert torch.allclose(batch, single, atol=1e-5)


# ------------------------------------------------------------------ policies


def test_variance_policy_picks_constant_colour_superpatches():
    x = images(b=2)
    flat = {0: [1, 5], 1: [0, 3]}
    for b, ids in flat.items():
        for s in ids:
            i, j = divmod(s, 3)
            x[b, :, 32 * i: 32 * i + 32, 32 * j: 32 * j + 32] = torch.tensor([0.3, -0.2, 0.9]).view(3, 1, 1)
    model = tiny(cts(k=2, policy="variance"))
    with torch.no_grad():
        state, _ = model.encoder(x, model.method)
    assert shared_superpatches(state) == [flat[0], flat[1]]


def labels_with_uniform(uniform: dict[int, list[int]], b=2, ignore=11):
    """Every superpatch holds two classes except the listed ones (one class, or one
    class plus ignore pixels, which counts as uniform for the oracle)."""
    lab = torch.zeros(b, 64, 96, dtype=torch.long)
    for s in range(6):
        i, j = divmod(s, 3)
        lab[:, 32 * i: 32 * i + 32, 32 * j: 32 * j + 32] = s % 5
        lab[:, 32 * i + 5, 32 * j + 7] = (s + 1) % 5  # one odd pixel
    for img, ids in uniform.items():
        for s in ids:
            i, j = divmod(s, 3)
            lab[img, 32 * i: 32 * i + 32, 32 * j: 32 * j + 32] = 2
        if ids:
            i, j = divmod(ids[0], 3)
            lab[img, 32 * i, 32 * j: 32 * j + 4] = ignore
    return lab


def test_oracle_picks_exactly_the_uniform_superpatches():
    uniform = {0: [2, 4, 5], 1: [0, 1, 3]}
    labels = labels_with_uniform(uniform)
    model = tiny(cts(k=3, policy="oracle"))
    with torch.no_grad():
        state, _ = model.encoder(images(), model.method, labels)
        out = model.run(images(), labels)
    assert shared_superpatches(state) == [uniform[0], uniform[1]]
    assert out.logits.shape == (2, 5, 64, 96)


def test_majority_fraction_and_targets():
    lab = torch.full((1, 4, 6), 1, dtype=torch.long)  # cell 2: 2 x 3 superpatches
    lab[0, 0, 2] = 3          # superpatch 1: 3 of 4 -> 0.75, two classes
    lab[0, 0:2, 4:6] = 11     # superpatch 2: all ignore
    lab[0, 2, 0] = 11         # superpatch 3: one class + ignore (border)
    lab[0, 2:4, 2:4] = torch.tensor([[0, 1], [2, 3]])  # superpatch 4: four classes
    frac = majority_fraction(lab, 2, n_cls=11, ignore_index=11)
    assert frac.tolist() == [[1.0, 0.75, 1.0, 1.0, 0.25, 1.0]]
    target, valid = superpatch_targets(lab, 2, ignore_index=11)
    assert target.flatten().tolist() == [1, 0, 1, 0, 0, 1]
    assert valid.flatten().tolist() == [True, True, True, False, True, True]


def test_learned_policy_loads_and_ranks_by_the_net(cache):
    torch.manual_seed(0)
    net = PolicyNet("tiny")
    path = policy_path("camvid", P, "tiny")
    torch.save({"arch": "tiny", "state_dict": net.state_dict(), "meta": {}}, path)
    method = cts(k=2, policy="learned")
    assert method.settings()["policy_checkpoint"] == path.name
    model = tiny(method)
    x = images()
    with torch.no_grad():
        state, _ = model.encoder(x, method)
        net.eval()
        policy_in = x * 0.5 + 0.5  # tiny config: backbone mean/std are (0.5, 0.5, 0.5)
        scores = net((policy_in - 0.5) / 0.5, (2, 3))
    expected = scores.topk(2, dim=1).indices.sort(dim=1).values.tolist()
    assert shared_superpatches(state) == expected
    # the policy is a submodule: it moves with the model and shows in state_dict
    assert any(k.startswith("method.policy_net.") for k in model.state_dict())


# ------------------------------------------------------------------ defaults and errors


def test_defaults():
    method = cts()
    assert method.policy == "variance"
    assert method.k_ratio == pytest.approx(103 / 256)
    assert method.k_for(192) == 77  # CamVid 12 x 16 superpatches
    ade = build_method("cts", cfg(), get_dataset("ade20k"))
    assert ade.k_for(256) == 103
    assert build_method("cts", cfg(), get_dataset("pascal")).k_for(225) == 90
    assert build_method("cts", cfg(), get_dataset("cityscapes")).k_for(576) == 336
    assert default_k_ratio("camvid") == 103 / 256
    assert method.settings() == {"policy": "variance", "k": None, "k_ratio": 103 / 256}


def test_odd_grid_is_a_clear_error():
    model = tiny(cts(k=1))
    with pytest.raises(ValueError, match="even patch grid"):
        model(torch.randn(1, 3, 48, 96))  # 3 x 6 patches


def test_k_larger_than_superpatches():
    model = tiny(cts(k=7))
    with pytest.raises(ValueError, match="larger than the 6 superpatches"):
        model(images())


@pytest.mark.parametrize("opts, match", [
    ({"k": -1}, "non-negative"),
    ({"k_ratio": 1.5}, r"\[0, 1\]"),
    ({"k": 3, "k_ratio": 0.5}, "not both"),
])
def test_bad_options(opts, match):
    with pytest.raises(ValueError, match=match):
        cts(**opts)


def test_bad_policy_name():
    with pytest.raises(ValueError, match="unknown CTS policy"):
        CTS("random")


def test_oracle_without_labels():
    model = tiny(cts(k=1, policy="oracle"))
    with pytest.raises(ValueError, match="needs ground-truth labels"):
        model(images())


def test_missing_learned_checkpoint_says_how_to_train(cache):
    with pytest.raises(FileNotFoundError,
                       match="algm-bench train --method cts --policy learned --dataset camvid --backbone tiny"):
        cts(policy="learned")


def test_label_shows_policy_and_k():
    assert cts(k=3, policy="oracle").label() == "cts (policy=oracle, k=3)"
    assert cts().label() == "cts (policy=variance)"


# ------------------------------------------------------------------ training


def test_required_training_only_for_a_missing_learned_policy(cache, monkeypatch):
    import baselines.cts_train

    path = policy_path("camvid", P, "tiny")
    tasks = CTS.required_training(CTS.Config(policy="learned"), cfg(), CAMVID)
    assert [t.path for t in tasks] == [path]
    assert required_training("cts", cfg(), CAMVID, policy="learned")[0].path == path

    calls = []
    monkeypatch.setattr(baselines.cts_train, "train_policy", lambda *a, **kw: calls.append((a, kw)))
    tasks[0].run(TrainingContext(data_root="/data", progress=False))
    assert calls == [(("camvid", "tiny"), {"arch": "tiny", "root": "/data", "out": path, "progress": False})]

    assert required_training("cts", cfg(), CAMVID) == []  # variance
    assert required_training("cts", cfg(), CAMVID, policy="oracle") == []
    assert required_training("cts", cfg(), CAMVID, policy="learned", policy_checkpoint="mine.pt") == []
    assert required_training("cts", cfg(), CAMVID, policy="learned", policy_arch="lite0") != []
    torch.save({"arch": "tiny", "state_dict": PolicyNet("tiny").state_dict(), "meta": {}}, path)
    assert required_training("cts", cfg(), CAMVID, policy="learned") == []


def test_training_items_are_the_tiles_of_each_image():
    """A 640 x 480 frame with a 512 window: test scale 683 x 512, two tiles, each an item."""
    gen = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 480, 640), dtype=torch.uint8, generator=gen)
    label = torch.randint(0, 3, (480, 640), generator=gen)
    label[:50, :100] = 1  # uniform top-left corner: within the first tile only
    mean, std, cell = (0.4, 0.45, 0.5), (0.2, 0.25, 0.3), 32
    data = prepare_windows([Sample(image, label, "frame")], (512, 512), cell, (128, 128), mean, std,
                           ignore_index=11)
    windows = list(tiles(image, (512, 512), mean, std, label, ignore_index=11))
    assert len(windows) == len(data) == 2
    assert data.images.shape == (2, 3, 128, 128) and data.images.dtype == torch.uint8
    for i, (x, y) in enumerate(windows):
        target, valid = superpatch_targets(y, cell, 11)
        assert torch.equal(data.targets[i], target[0]) and torch.equal(data.valids[i], valid[0])
        assert torch.equal(data.variances[i], variance_scores(x, cell)[0])
        rgb = (x * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)) * 255
        small = F.interpolate(rgb, size=(128, 128), mode="bilinear", align_corners=False, antialias=True)
        assert (data.images[i].float() - small[0]).abs().max() <= 0.5 + 1e-3
    assert data.targets[0, 0, 0] == 1 and data.targets[1, 0, 0] == 0  # the uniform corner is in tile 0


def test_a_small_image_is_padded_not_refused():
    """Smaller than the window at test scale: padded with ignore labels, one item."""
    image = torch.full((3, 100, 300), 128, dtype=torch.uint8)
    label = torch.zeros(100, 300, dtype=torch.long)
    data = prepare_windows([Sample(image, label, "wide")], (128, 512), 32, (64, 256), (0.5,) * 3, (0.5,) * 3,
                           ignore_index=11)
    assert len(data) == 1
    assert data.targets.shape == (1, 4, 16)  # 128 x 384 at test scale, padded to 128 x 512
    assert bool(data.targets[0, :, 12:].eq(1).all())  # all-ignore padding: one "class"


def test_train_command_takes_the_policy_options():
    from algm.cli import build_parser

    argv = ["train", "--method", "cts", "--policy", "learned", "--policy-arch", "lite0"]
    args = build_parser(argv).parse_args(argv)
    assert args.policy == "learned" and args.policy_arch == "lite0" and args.dataset == "camvid"
    assert callable(args.func)


@pytest.mark.skipif(not (DEFAULT_CAMVID_ROOT / "train.txt").is_file(), reason="CamVid not available")
def test_train_policy_deterministic_and_resumes_after_interruption(cache, monkeypatch):
    import baselines.cts_train as policy

    kw = dict(limit=2, batch_size=1, progress=False)
    first = train_policy("camvid", "vit-s14", 2, **kw)
    path = policy_path("camvid", 14)
    assert first["path"] == str(path) and path.is_file()
    assert [h["epoch"] for h in first["history"]] == [1, 2]
    sd1 = torch.load(path, weights_only=True)["state_dict"]

    # interrupted after epoch 1 (the 2nd evaluation raises), then resumed: same weights
    real, calls = policy.evaluate_policy, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(policy, "evaluate_policy", flaky)
    with pytest.raises(KeyboardInterrupt):
        train_policy("camvid", "vit-s14", 2, resume=False, **kw)
    monkeypatch.setattr(policy, "evaluate_policy", real)
    resumed = train_policy("camvid", "vit-s14", 2, **kw)
    assert resumed["history"] == first["history"]
    sd2 = torch.load(path, weights_only=True)["state_dict"]
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)

    # the checkpoint drives CTS on the real backbone's grid
    from algm.build import make_setup

    setup = make_setup("vit-s14", "camvid", "cts", policy="learned")
    with torch.no_grad():
        out = setup.model.run(torch.randn(1, 3, *setup.window))
    assert out.tokens[0, 0].item() == 1 + 768 - 3 * 77
