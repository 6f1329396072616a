"""DToP-style token pruning (baselines/prune.py): exactness, bookkeeping, batching, config."""

from __future__ import annotations

import argparse
import math
from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F

from algm import atomic
from algm.cli import build_parser
from algm.config import DatasetSpec, DecoderConfig, ViTConfig, get_backbone, get_dataset
from algm.data.windows import tiles
from algm.methods import build_method, required_training
from algm.model.segmenter import build_segmenter
from algm.reduction import NoReduction, TrainingContext
from algm.training.features import extract_layer_features, frozen_layer_features, layer_tokens
from baselines import prune_train
from baselines.prune import (HEADS_FORMAT, PruneAux, TokenPruning, class_rank, heads_path, new_heads, parse_layers,
                             train_heads)
from baselines.prune_train import fit_heads, patch_labels

CFG = ViTConfig("tiny", 64, 8, 2, 16, pos_grid=(4, 4))
SPEC = DatasetSpec("toy", 4, grid=(4, 4), ignore_index=4)
LAYERS = (3, 5)


def make_method(p0=0.9, k=2, std=0.5, seed=0, layers=LAYERS, cfg=CFG, n_cls=4) -> TokenPruning:
    """Random heads scaled to ``std`` (0.02: near-uniform, 0.5: a mix, 2: very confident)."""
    torch.manual_seed(seed)
    method = TokenPruning(cfg.embed_dim, n_cls, cfg.depth, p0=p0, exit_layers=layers, context_k=k)
    with torch.no_grad():
        for head in method.heads:
            head.linear.weight.normal_(0, std)
            head.linear.bias.normal_(0, std)
    return method.eval()


def make_model(decoder="mask", seed=0, cfg=CFG, n_cls=4):
    torch.manual_seed(seed)
    return build_segmenter(cfg, n_cls, DecoderConfig(decoder), NoReduction()).eval()


def images(n=4, size=(64, 64), seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, *size, generator=g)


def record(method: TokenPruning) -> list:
    """Make ``method`` log (state_in, head, block, state_out) of every head step."""
    log = []
    inner = method.prune

    def prune(state, head, block):
        out = inner(state, head, block)
        log.append((state, head, block, out))
        return out

    method.prune = prune
    return log


def live(state):
    b, t = state.x.shape[0], state.x.shape[1] - 1
    return state.keep[:, 1:] if state.keep is not None else torch.ones(b, t, dtype=torch.bool)


# --------------------------------------------------------------------- exactness
@pytest.mark.parametrize("decoder", ["mask", "linear"])
@pytest.mark.parametrize("p0", [1.0, 1.5, 1e9])
def test_p0_at_least_one_equals_none_exactly(decoder, p0):
    model = make_model(decoder)
    pruned = model.with_method(make_method(p0=p0, std=5.0))  # heads would be very confident
    x = images(3)
    with torch.no_grad():
        a, b = model.run(x), pruned.run(x)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.token_logits, b.token_logits)
    assert torch.equal(a.tokens, b.tokens)


def test_no_exit_below_one_equals_none_exactly():
    model = make_model()
    method = make_method(p0=0.99, std=0.02)  # near-uniform heads: nobody reaches 0.99
    log = record(method)
    with torch.no_grad():
        a, b = model.run(images(3)), model.with_method(method).run(images(3))
    assert len(log) == len(LAYERS) and all(s_in is s_out for s_in, _, _, s_out in log)
    assert torch.equal(a.logits, b.logits)


# --------------------------------------------------------------------- bookkeeping
def test_pruning_removes_tokens_and_reports_them():
    model = make_model()
    method = make_method(p0=0.9, std=1.0)
    with torch.no_grad():
        out = model.with_method(method).run(images(4))
        state, _ = model.encoder(images(4), method)
    n = 16
    assert isinstance(state.aux, PruneAux)
    assert state.aux.exited.any()
    assert (out.tokens[:, : LAYERS[0] - 1] == n + 1).all()  # nothing before the first head
    assert (out.tokens[:, -1] < n + 1).any()
    exited = state.aux.exited.sum(1)
    assert torch.equal(out.tokens[:, -1], n + 1 - exited)
    assert set(state.aux.exit_layer[state.aux.exited].tolist()) <= set(LAYERS)
    assert (state.aux.exit_layer[~state.aux.exited] == 0).all()
    assert torch.allclose(TokenPruning.exit_fraction(state), exited.float() / n)


def test_exited_patch_keeps_exit_stage_prediction():
    model = make_model()
    method = make_method(p0=0.8, std=1.0)
    log = record(method)
    x = images(4)
    with torch.no_grad():
        out = model.with_method(method).run(x)
        checked = 0
        done = torch.zeros(4, 16, dtype=torch.bool)
        for s_in, head, block, s_out in log:
            logp = head(s_in.x[:, 1:]).log_softmax(-1)
            per_patch = torch.gather(logp, 1, s_in.source.unsqueeze(-1).expand(-1, -1, logp.shape[-1]))
            now = s_out.aux.exited & ~done
            assert (s_out.aux.exit_layer[now] == block).all()
            assert torch.allclose(out.token_logits[now], per_patch[now], atol=1e-6)
            assert torch.equal(out.token_logits[now].argmax(-1), per_patch[now].argmax(-1))
            assert (per_patch[now].exp().max(-1).values > 0.8).all()  # only confident tokens exit
            checked += int(now.sum())
            done |= now
    assert checked > 0


@pytest.mark.parametrize("k", [1, 2, 5])
def test_context_tokens_stay_per_present_class(k):
    model = make_model()
    method = make_method(p0=0.6, k=k, std=2.0)  # most tokens are confident
    log = record(method)
    with torch.no_grad():
        model.with_method(method).run(images(4, size=(96, 96)))
    assert log and any(s_out is not s_in for s_in, _, _, s_out in log)
    for s_in, head, _, s_out in log:
        if s_out is s_in:
            continue
        alive_in, alive_out = live(s_in), live(s_out)
        with torch.no_grad():
            pred_in = head(s_in.x[:, 1:]).argmax(-1)
            pred_out = head(s_out.x[:, 1:]).argmax(-1)
        for b in range(s_in.x.shape[0]):
            before = pred_in[b][alive_in[b]]
            after = pred_out[b][alive_out[b]]
            for c in before.unique().tolist():
                assert int((after == c).sum()) >= min(k, int((before == c).sum())), (b, c)


def test_every_patch_maps_to_exactly_one_output():
    model = make_model()
    method = make_method(p0=0.8, std=1.0)
    with torch.no_grad():
        state, _ = model.encoder(images(4), method)
        token_out = model.decoder(state.x[:, 1:], None if state.keep is None else state.keep[:, 1:])
        restored = method.restore(token_out, state)
    assert restored.shape == (4, 16, 4)
    alive = live(state)
    for b in range(4):
        exited = state.aux.exited[b]
        src = state.source[b][~exited]
        assert src.unique().numel() == src.numel()  # pruning never merges
        assert alive[b][src].all()  # every kept patch points at a live token ...
        assert int(alive[b].sum()) == src.numel()  # ... and every live token holds one patch
        assert int(exited.sum()) + src.numel() == 16
        # Restored rows: exit log-probs for exited patches, the token's output otherwise.
        assert torch.equal(restored[b][exited], state.aux.logits[b][exited])
        assert torch.equal(restored[b][~exited], token_out[b][src])


def test_batched_equals_one_image_at_a_time():
    model = make_model()
    method = make_method(p0=0.75, std=0.8)
    x = images(5, seed=3)
    with torch.no_grad():
        pruned = model.with_method(method)
        batched = pruned.run(x)
        state, _ = model.encoder(x, method)
        singles = [pruned.run(x[i:i + 1]) for i in range(5)]
    exits = state.aux.exited.sum(1)
    assert exits.unique().numel() > 1, exits  # images exit different numbers of tokens
    assert state.keep is not None  # so the batch is padded
    for i, single in enumerate(singles):
        assert torch.equal(batched.tokens[i], single.tokens[0])
        assert torch.allclose(batched.logits[i], single.logits[0], atol=1e-5, rtol=1e-4)


def test_restore_is_log_prob_consistent():
    """Raw decoder logits next to exit log-probs give the same per-pixel softmax and
    argmax as normalising the decoder logits too (per-token constants wash out)."""
    model = make_model()
    method = make_method(p0=0.8, std=1.0)
    x = images(3)
    with torch.no_grad():
        state, _ = model.encoder(x, method)
        out = model.with_method(method).run(x)
    exited = state.aux.exited.unsqueeze(-1)
    normalised = torch.where(exited, out.token_logits, out.token_logits.log_softmax(-1))
    assert not torch.allclose(normalised, out.token_logits)

    def up(per_patch):
        masks = per_patch.transpose(1, 2).reshape(3, -1, 4, 4)
        return F.interpolate(masks, size=(64, 64), mode="bilinear", align_corners=False)

    assert torch.allclose(up(out.token_logits), out.logits)
    assert torch.allclose(out.logits.softmax(1), up(normalised).softmax(1), atol=1e-5)
    assert torch.equal(out.logits.argmax(1), up(normalised).argmax(1))


def test_class_rank_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    b, t, c = 3, 40, 5
    conf = torch.rand(b, t, generator=g).round(decimals=1)  # plenty of ties
    pred = torch.randint(0, c, (b, t), generator=g)
    alive = torch.rand(b, t, generator=g) > 0.2
    rank = class_rank(conf, pred, alive, c)
    for i in range(b):
        for j in range(t):
            if not alive[i, j]:
                assert rank[i, j] == t
                continue
            same = alive[i] & (pred[i] == pred[i, j])
            ahead = same & ((conf[i] > conf[i, j]) | ((conf[i] == conf[i, j]) & (torch.arange(t) < j)))
            assert rank[i, j] == int(ahead.sum())


def test_fewer_flops_when_tokens_exit():
    from algm.measure.flops import count_flops

    model = make_model()
    x = images(1)
    base = count_flops(model, x)
    off = count_flops(model.with_method(make_method(p0=2.0, std=1.0)), x)
    on = count_flops(model.with_method(make_method(p0=0.6, std=2.0)), x)
    assert off == pytest.approx(base, rel=1e-9)
    assert on < base


# --------------------------------------------------------------------- configuration
@pytest.mark.parametrize("p0", [0, -0.5, math.inf, math.nan])
def test_bad_p0(p0):
    with pytest.raises(ValueError, match="p0"):
        build_method("prune", CFG, SPEC, p0=p0, random_heads=True)


@pytest.mark.parametrize("layers", [(0, 3), (3, 8), (5, 3), (4, 4), ()])
def test_bad_layers(layers):
    with pytest.raises(ValueError, match="exit_layers"):
        build_method("prune", CFG, SPEC, exit_layers=layers, random_heads=True)


def test_bad_context_k():
    with pytest.raises(ValueError, match="context_k"):
        build_method("prune", CFG, SPEC, context_k=0, random_heads=True)


def test_defaults():
    m = build_method("prune", CFG, SPEC, random_heads=True)
    assert m.exit_layers == (4, 5) and m.p0 == 0.9 and m.context_k == 5
    b = ViTConfig("b", 64, 12, 2, 16)
    l = ViTConfig("l", 64, 24, 2, 16)
    assert build_method("prune", b, SPEC, random_heads=True).exit_layers == (6, 8)
    ml = build_method("prune", l, SPEC, random_heads=True)
    assert ml.exit_layers == (8, 16) and ml.p0 == 0.95
    assert m.settings() == {"p0": 0.9, "exit_layers": "4,5", "context_k": 5, "heads": "random"}


def test_missing_trained_heads_say_how_to_train(tmp_path, monkeypatch):
    monkeypatch.setenv("ALGM_BENCH_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="algm-bench train --method prune") as err:
        build_method("prune", CFG, SPEC)
    assert "--random-heads" in str(err.value) and "tiny" in str(err.value)


def test_trained_heads_load_from_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ALGM_BENCH_CACHE", str(tmp_path))
    trained = make_method(layers=(4, 5), std=1.0, seed=7)
    meta = {"backbone": "tiny", "dataset": "toy", "exit_layers": [4, 5], "embed_dim": 64, "n_cls": 4}
    torch.save({"format": HEADS_FORMAT, "meta": meta, "state_dict": trained.heads.state_dict()},
               heads_path("tiny", "toy", (4, 5)))
    loaded = build_method("prune", CFG, SPEC)
    for a, b in zip(trained.heads.parameters(), loaded.heads.parameters()):
        assert torch.equal(a, b)
    assert loaded.settings()["heads"].startswith("trained:tiny/toy:")
    with pytest.raises(ValueError, match="n_cls"):
        build_method("prune", CFG, DatasetSpec("toy", 7, grid=(4, 4)))


def test_required_training_only_when_heads_are_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("ALGM_BENCH_CACHE", str(tmp_path))
    (task,) = required_training("prune", CFG, SPEC)
    assert task.path == heads_path("tiny", "toy", (4, 5)) and "tiny" in task.name
    assert required_training("prune", CFG, SPEC, exit_layers="3,5")[0].path == heads_path("tiny", "toy", (3, 5))
    assert required_training("prune", CFG, SPEC, random_heads=True) == []
    assert required_training("prune", CFG, SPEC, heads_file=str(tmp_path / "mine.pt")) == []

    # The task trains heads for this backbone / dataset / layers into its path ...
    calls = []

    def train(heads, backbone, dataset, layers, out, **options):
        calls.append((backbone, dataset, layers, out, options))
        meta = {"backbone": backbone.name, "dataset": dataset.name, "exit_layers": list(layers),
                "embed_dim": 64, "n_cls": 4}
        torch.save({"format": options["file_format"], "meta": meta, "state_dict": heads.state_dict()}, out)

    monkeypatch.setattr(prune_train, "train_aux_heads", train)
    context = TrainingContext(data_root="/data", window=(64, 96), progress=False)
    task.run(context)
    (backbone, dataset, layers, out, options), = calls
    assert (backbone, dataset, layers, out) == (CFG, SPEC, (4, 5), task.path)
    assert options["context"] is context  # the framework's encoder and features: the method builds no model
    # ... after which nothing is left to train and the method builds from that file.
    assert required_training("prune", CFG, SPEC) == []
    assert build_method("prune", CFG, SPEC).settings()["heads"].startswith("trained:tiny/toy:")


def test_label_and_token_map():
    method = make_method(p0=0.9, std=1.0)
    assert method.label() == "prune (p0=0.9, exit_layers=3,5, heads=RANDOM)"
    method.heads_source = "trained:tiny/toy:0123abcd"
    assert method.label() == "prune (p0=0.9, exit_layers=3,5)"
    with torch.no_grad():
        state, _ = make_model().encoder(images(4), method)
    token_map = method.token_map(state)
    assert state.aux.exited.any()
    assert (token_map[state.aux.exited] == -1).all()
    assert torch.equal(token_map[~state.aux.exited], state.source[~state.aux.exited])


def test_cli_pieces():
    assert parse_layers("6, 8") == (6, 8)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_layers("six")
    args = build_parser(["train", "--method", "prune"]).parse_args(
        ["train", "--method", "prune", "--exit-layers", "6,8", "--retrain"])
    assert args.exit_layers == (6, 8) and args.retrain and callable(args.func)


def test_train_lists_missing_heads_and_retrain_lists_them_all(tmp_path, monkeypatch):
    """``train`` runs what ``required_training`` lists; a trained part is skipped unless
    ``--retrain`` (the task list comes from the method, the command names none)."""
    monkeypatch.setenv("ALGM_BENCH_CACHE", str(tmp_path))
    cls, backbone, dataset = TokenPruning, get_backbone("vit-s14"), get_dataset("camvid")
    config = cls.Config()
    tasks = cls.required_training(config, backbone, dataset)
    assert [t.path for t in tasks] == [heads_path("vit-s14", "camvid", (6, 8))]
    tasks[0].path.parent.mkdir(parents=True, exist_ok=True)
    tasks[0].path.write_bytes(b"trained")
    assert cls.required_training(config, backbone, dataset) == []
    assert [t.path for t in cls.training_tasks(config, backbone, dataset)] == [tasks[0].path]


# --------------------------------------------------------------------- training pieces
Item = namedtuple("Item", "image label name")


def test_patch_labels_majority_and_ignore():
    label = torch.full((8, 8), 4)
    label[:4, :4] = 1  # cell 0: all class 1
    label[:4, 4:] = 2
    label[:1, 4:] = 4  # cell 1: 12 of 16 class 2
    label[4:, :4] = 3
    label[4:, :3] = 4  # cell 2: 12 of 16 ignored -> ignore
    label[4:, 4:] = 0
    assert patch_labels(label, (2, 2), 4, 4).tolist() == [1, 2, 4, 0]


def old_encoder_features(encoder, images, layers):
    """The pruning heads' own feature extraction before the framework's took its place
    (the reference: heads already trained on it stay valid)."""
    grid = (images.shape[-2] // encoder.cfg.patch_size, images.shape[-1] // encoder.cfg.patch_size)
    patches = encoder.patch_embed(images) + encoder.patch_pos(grid)
    cls = (encoder.cls_token + encoder.pos_embed[:, :1]).expand(images.shape[0], -1, -1)
    x = torch.cat([cls, patches], 1)
    features = []
    for block, blk in enumerate(encoder.blocks[:max(layers)], start=1):
        x = blk(x)
        if block in layers:
            features.append(x[:, 1:])
    return torch.stack(features, 1)


def samples(n, size=(64, 64), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Item(torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=g),
                 torch.randint(0, 5, size, generator=g), f"f{i}") for i in range(n)]


class Frames(list):
    """Samples as a dataset (what ``build_dataset`` returns)."""

    n_cls, ignore_index = SPEC.n_cls, SPEC.ignore_index


def old_extraction(encoder, items, layers, window, batch=4):
    """Features (W, L, N, D) fp16 and patch labels (W, N) as the heads' extraction made
    them: the windows of ``batch`` images per forward."""
    cfg, grid = encoder.cfg, (window[0] // encoder.cfg.patch_size, window[1] // encoder.cfg.patch_size)
    feats, labels = [], []
    with torch.no_grad():
        for first in range(0, len(items), batch):
            pairs = [p for item in items[first:first + batch]
                     for p in tiles(item.image, window, cfg.mean, cfg.std, label=item.label, ignore_index=4)]
            feats.append(old_encoder_features(encoder, torch.cat([x for x, _ in pairs]), layers).half())
            labels += [patch_labels(y[0], grid, 4, 4) for _, y in pairs]
    return torch.cat(feats), torch.stack(labels)


def test_framework_layer_tokens_are_the_old_features_and_the_hook_s():
    model = make_model()
    x = images(2)
    with torch.no_grad():
        feats = layer_tokens(model.encoder, x, (2, 5))
        assert torch.equal(feats, old_encoder_features(model.encoder, x, (2, 5)))
    assert feats.shape == (2, 2, 16, 64)
    method = make_method(p0=2.0)
    seen = {}

    def tap(state, layer):
        seen[layer] = state.x[:, 1:].clone()
        return state

    method.after_block = tap
    with torch.no_grad():
        model.encoder(x, method)
    assert torch.equal(feats[:, 0], seen[1]) and torch.equal(feats[:, 1], seen[4])


@pytest.mark.usefixtures("one_thread")
def test_framework_features_are_the_old_extraction_including_wide_frames(tmp_path):
    """160 x 120 images with a 128 window: test scale 171 x 128, two tiles each (no resize
    to the window's shape), 5 frames: batches of 4 and 1. The features and per-patch
    labels the heads get are bit for bit those of the old extraction."""
    model = make_model()
    data = Frames(samples(5, (120, 160)))
    got = extract_layer_features(model.encoder, data, (2, 5), (128, 128), dataset="toy", split="train",
                                 cache=tmp_path, progress=False)
    feats, labels = old_extraction(model.encoder, data, (2, 5), (128, 128))
    assert got.features.shape == (10, 2, 8 * 8, 64) and got.grid == (8, 8) and got.n_frames == 5
    assert torch.equal(got.features, feats)
    assert torch.equal(torch.stack([patch_labels(y, got.grid, 4, 4) for y in got.labels]), labels)


@pytest.mark.usefixtures("one_thread")
def test_heads_trained_through_the_framework_equal_a_direct_fit(tmp_path, monkeypatch):
    """The task's path (framework features, its cache, the checkpoint) trains exactly the
    heads of a direct fit on directly computed features, into the same file and format."""
    import algm.data.datasets

    monkeypatch.setenv("ALGM_BENCH_CACHE", str(tmp_path))
    model = make_model()
    data = Frames(samples(6))
    opened = []

    def build_dataset(name, split, root=None, limit=None):
        opened.append((name, split, root, limit))
        return Frames(data[:limit])

    monkeypatch.setattr(algm.data.datasets, "build_dataset", build_dataset)
    encoders = []

    def frozen_encoder(backbone, window):
        encoders.append((backbone, window))
        return model.encoder

    context = TrainingContext(data_root="/data", window=(64, 64), progress=False, frozen_encoder=frozen_encoder,
                              layer_cache=frozen_layer_features)
    options = dict(epochs=2, lr=1e-2, batch_tokens=16)
    result = train_heads(CFG, SPEC, LAYERS, context=context, limit=5, **options)
    assert opened == [("toy", "train", "/data", 5)] and encoders == [("tiny", (64, 64))]
    assert result.path == heads_path("tiny", "toy", LAYERS)

    torch.manual_seed(0)
    direct = new_heads(CFG.embed_dim, SPEC.n_cls, len(LAYERS), CFG.norm_eps)
    feats, labels = old_extraction(model.encoder, data[:5], LAYERS, (64, 64))
    loss, _ = fit_heads(direct, feats, labels, SPEC.ignore_index, progress=False, **options)
    blob = torch.load(result.path, weights_only=True)
    assert blob["format"] == HEADS_FORMAT and blob["meta"]["train_loss"] == loss
    assert set(blob["meta"]) == {"backbone", "weights", "dataset", "split", "exit_layers", "embed_dim", "n_cls",
                                 "window", "epochs", "seed", "lr", "images", "windows", "train_loss", "train_acc"}
    assert (blob["meta"]["images"], blob["meta"]["windows"], blob["meta"]["window"]) == (5, 5, [64, 64])
    assert blob["state_dict"].keys() == direct.state_dict().keys()
    assert all(torch.equal(v, direct.state_dict()[k]) for k, v in blob["state_dict"].items())
    assert build_method("prune", CFG, SPEC, exit_layers="3,5").settings()["heads"].startswith("trained:tiny/toy:")

    # Again: the features come from the framework's cache (no encoder built, none run).
    context = TrainingContext(data_root="/data", window=(64, 64), progress=False,
                              frozen_encoder=lambda backbone, window: _NoCall(model.encoder),
                              layer_cache=frozen_layer_features)
    again = train_heads(CFG, SPEC, LAYERS, context=context, limit=5, out=tmp_path / "again.pt", restart=True,
                        **options)
    assert again.train_loss == loss


class _NoCall(torch.nn.Module):
    """An encoder with the real one's config and weights whose forward must not run."""

    def __init__(self, encoder):
        super().__init__()
        self.cfg = encoder.cfg
        self.inner = encoder

    def state_dict(self, *args, **kwargs):
        return self.inner.state_dict(*args, **kwargs)

    def start(self, *args, **kwargs):
        raise AssertionError("features should come from the cache")


def test_fit_heads_learns_and_resumes_exactly(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    s, n, d, c = 6, 16, 64, 4
    centers = torch.randn(c, d, generator=g) * 3
    labels = torch.randint(0, c + 1, (s, n), generator=g)  # c = ignore
    feats = centers[labels.clamp_max(c - 1)].unsqueeze(1).repeat(1, 2, 1, 1)
    feats = (feats + torch.randn(feats.shape, generator=g)).half()

    def heads(seed=0):
        torch.manual_seed(seed)
        return make_method(layers=(3, 5), std=0.02).heads

    full = heads()
    loss, acc = fit_heads(full, feats, labels, c, epochs=4, lr=1e-2, batch_tokens=32, progress=False)
    assert loss[-1] < loss[0] and acc[-1] > 0.9

    ckpt = tmp_path / "run.ckpt"
    # An interrupted run: killed right after its 2nd epoch's checkpoint is in place ...
    _killed_after_checkpoints(2, monkeypatch, lambda: fit_heads(
        heads(), feats, labels, c, epochs=4, lr=1e-2, batch_tokens=32, progress=False, checkpoint=ckpt))
    assert torch.load(ckpt, weights_only=True)["epoch"] == 2
    # ... rerun with the same arguments: it resumes and ends where the full run did.
    resumed = heads()
    loss2, _ = fit_heads(resumed, feats, labels, c, epochs=4, lr=1e-2, batch_tokens=32,
                         progress=False, checkpoint=ckpt)
    assert loss2 == pytest.approx(loss, rel=1e-5)
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def _killed_after_checkpoints(n, monkeypatch, run):
    class Killed(Exception):
        pass

    real = atomic.write_with
    done = []

    def write_with(path, write):
        out = real(path, write)
        done.append(path)
        if len(done) == n:
            raise Killed
        return out

    with monkeypatch.context() as m:
        m.setattr(atomic, "write_with", write_with)
        with pytest.raises(Killed):
            run()
