"""Head training on cached encoder features (algm.training, algm.commands.train_head)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import pytest
import torch

import algm.atomic
import algm.data.datasets
import algm.training.head as head_mod
from algm.build import Setup, make_setup
from algm.config import DatasetSpec, DecoderConfig, ViTConfig
from algm.data.datasets import DEFAULT_CAMVID_ROOT, Sample, build_dataset
from algm.data.windows import tiles
from algm.model.segmenter import build_segmenter
from algm.reduction import TokenReduction, TrainingContext
from algm.training.features import (collate, extract_features, extract_layer_features, frozen_layer_features,
                                    layer_tokens)
from algm.training.head import TrainConfig, load_head, train_head, trained_head_path
from algm.training.loop import Schedule

N_CLS, IGNORE = 3, 3
WINDOW = (32, 48)  # patch 8 -> 4 x 6 tokens
TINY = ViTConfig("tiny", 32, 2, 2, 8, pos_grid=(4, 6))
SPEC = DatasetSpec("fake", N_CLS, grid=(4, 6), ignore_index=IGNORE)


pytestmark = pytest.mark.usefixtures("one_thread")


class FakeData:
    """Frames whose colour tells the class: class c paints channel c bright."""

    n_cls, ignore_index = N_CLS, IGNORE

    def __init__(self, n: int = 6, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.samples = []
        for i in range(n):
            label = torch.randint(0, N_CLS, (4, 6), generator=g).repeat_interleave(8, 0).repeat_interleave(8, 1)
            label[0, :5] = IGNORE
            image = torch.randint(0, 60, (3, *WINDOW), generator=g, dtype=torch.uint8)
            for c in range(N_CLS):
                image[c][label == c] += 150
            self.samples.append(Sample(image, label, f"frame{i}"))

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


@dataclass(frozen=True)
class Offset:
    """A method-owned aux payload (batch-first tensors), like pruning's exit logits."""

    value: torch.Tensor  # (B, N)


class PairMerge(TokenReduction):
    """After block 0, merges the first m horizontal patch pairs, m depending on the image
    (so cached windows have different token counts); stores an aux payload that its
    custom restore adds to the output. Batch 1 only (tests)."""

    name = "pairmerge"

    def __init__(self, most: int = 3, shift: float = 0.0):
        super().__init__()
        self.most, self.shift = most, shift

    def settings(self):
        return {"most": self.most, "shift": self.shift}

    def after_block(self, state, layer):
        if layer != 0:
            return state
        x = state.x[:, 1:]
        n = x.shape[1]
        m = 1 + int(x[0, 0].sum() > 0) * (self.most - 1)
        merged = 0.5 * (x[:, 0:2 * m:2] + x[:, 1:2 * m:2])
        new_x = torch.cat([state.x[:, :1], merged, x[:, 2 * m:]], 1)
        size = torch.cat([state.size[:, :1], state.size[:, 1:2 * m + 1].reshape(1, m, 2).sum(-1),
                          state.size[:, 2 * m + 1:]], 1)
        p = torch.arange(n)
        source = torch.where(p < 2 * m, p // 2, p - m).unsqueeze(0)
        aux = Offset(torch.full((1, n), self.shift))
        return state.replace(x=new_x, size=size, source=source, aux=aux)

    def restore(self, token_out, state):
        return super().restore(token_out, state) + state.aux.value.unsqueeze(-1)


def tiny_setup(method=None, decoder="mask", seed=0) -> Setup:
    torch.manual_seed(seed)
    model = build_segmenter(TINY, N_CLS, DecoderConfig(decoder), method)
    return Setup(model=model, backbone=TINY, dataset=SPEC, window=WINDOW)


def count_encoder_calls(setup):
    """The list of the images (1, 3, h, w) the encoder is called with from now on."""
    calls = []
    forward = setup.model.encoder.forward

    def counted(images, *args, **kwargs):
        calls.append(images)
        return forward(images, *args, **kwargs)

    setup.model.encoder.forward = counted
    return calls


def test_feature_cache_is_keyed_by_config_and_reused(tmp_path):
    data = FakeData(4)
    setup = tiny_setup(PairMerge(3))
    calls = count_encoder_calls(setup)
    first = extract_features(setup, dataset=data, cache=tmp_path, progress=False)
    assert len(calls) == 4 and len(first.items) == 4 and first.extract_seconds > 0
    again = extract_features(setup, dataset=data, cache=tmp_path, progress=False)
    assert len(calls) == 4, "second run must read the cache, not run the encoder"
    assert again.path == first.path and again.extract_seconds == 0
    for a, b in zip(first.items, again.items):
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["source"], b["source"])
    # another method setting, method, flip, frame set or encoder weights: another entry
    other = tiny_setup(PairMerge(2))
    assert extract_features(other, dataset=data, cache=tmp_path, progress=False).path != first.path
    assert extract_features(tiny_setup(), dataset=data, cache=tmp_path, progress=False).path != first.path
    flipped = extract_features(setup, dataset=data, flip=True, cache=tmp_path, progress=False)
    assert flipped.path != first.path and len(flipped.items) == 8
    assert torch.equal(flipped.items[1]["label"], flipped.items[0]["label"].flip(-1))
    assert extract_features(setup, dataset=data, limit=3, cache=tmp_path, progress=False).path != first.path
    reseeded = tiny_setup(PairMerge(3), seed=1)
    assert extract_features(reseeded, dataset=data, cache=tmp_path, progress=False).path != first.path


def test_cached_state_reproduces_segmenter_run(tmp_path):
    """Decoding the cached, padded batch equals Segmenter.run image by image."""
    data = FakeData(4)
    setup = tiny_setup(PairMerge(3, shift=0.25))
    feats = extract_features(setup, dataset=data, cache=tmp_path, progress=False)
    counts = {it["x"].shape[0] for it in feats.items}
    assert len(counts) == 2, "the test method should give different token counts"
    state, labels = collate(feats.items)
    assert state.keep is not None and state.aux.value.shape == (4, 24)
    # read back from disk, the aux payload is the method's dataclass again
    from_disk, _ = collate(extract_features(setup, dataset=data, cache=tmp_path, progress=False).items)
    assert type(from_disk.aux) is Offset and torch.equal(from_disk.aux.value, state.aux.value)
    with torch.no_grad():
        batched = setup.model.eval().decode(state, WINDOW)
        for i, sample in enumerate(data.samples):
            image = (sample.image.float()[None] / 255 - 0.5) / 0.5
            ref = setup.model.eval().run(image).logits
            assert torch.allclose(batched[i:i + 1], ref, atol=2e-2), (batched[i:i + 1] - ref).abs().max()
            assert torch.equal(labels[i], sample.label)


@pytest.mark.parametrize("decoder", ["mask", "linear"])
def test_loss_decreases_and_head_api(tmp_path, decoder):
    data = FakeData(6)
    setup = tiny_setup(decoder=decoder)
    config = TrainConfig(epochs=6, batch_size=2, lr=3e-3 if decoder == "mask" else 3e-2, warmup=0)
    assert trained_head_path(setup, config=config, dataset=data, cache=tmp_path) is None
    path = train_head(setup, config=config, dataset=data, cache=tmp_path, progress=False)
    assert path.name == "head.pt" and trained_head_path(setup, config=config, dataset=data, cache=tmp_path) == path
    meta = load_head(setup, path)
    losses = [h["loss"] for h in meta["history"]]
    assert len(losses) == 6 and losses[-1] < 0.7 * losses[0], losses
    # the trained decoder is in the model; a fresh setup loads it from the file
    fresh = tiny_setup(decoder=decoder, seed=5)
    load_head(fresh, path)
    for (k, a), b in zip(setup.model.decoder.state_dict().items(), fresh.model.decoder.state_dict().values()):
        assert torch.equal(a, b), k
    # idempotent: the finished head is returned without touching the encoder
    calls = count_encoder_calls(setup)
    mtime = path.stat().st_mtime_ns
    assert train_head(setup, config=config, dataset=data, cache=tmp_path, progress=False) == path
    assert calls == [] and path.stat().st_mtime_ns == mtime
    # a head of the other kind does not load
    other = tiny_setup(decoder="linear" if decoder == "mask" else "mask")
    with pytest.raises(ValueError, match="decoder"):
        load_head(other, path)


def test_resume_is_identical_to_uninterrupted_run(tmp_path, monkeypatch):
    data = FakeData(5)
    config = TrainConfig(epochs=3, batch_size=2, lr=2e-3)
    straight = train_head(tiny_setup(PairMerge(2)), config=config, dataset=data,
                          cache=tmp_path / "a", progress=False)

    save = algm.atomic.save_torch
    saved = []

    def interrupt_after_first_epoch(obj, path):
        save(obj, path)
        if path.name == "last.pt":
            saved.append(obj["epoch"])
            raise KeyboardInterrupt

    monkeypatch.setattr(algm.atomic, "save_torch", interrupt_after_first_epoch)
    setup = tiny_setup(PairMerge(2))
    with pytest.raises(KeyboardInterrupt):
        train_head(setup, config=config, dataset=data, cache=tmp_path / "b", progress=False)
    monkeypatch.setattr(algm.atomic, "save_torch", save)
    assert saved == [1]
    assert trained_head_path(setup, config=config, dataset=data, cache=tmp_path / "b") is None
    resumed = train_head(setup, config=config, dataset=data, cache=tmp_path / "b", progress=False)

    a = torch.load(straight, weights_only=True)
    b = torch.load(resumed, weights_only=True)
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    meta = load_head(setup, resumed)
    assert [h["epoch"] for h in meta["history"]] == [1, 2, 3]
    # restart trains anew (same seed: the same weights again)
    again = train_head(setup, config=config, dataset=data, cache=tmp_path / "b", restart=True, progress=False)
    c = torch.load(again, weights_only=True)
    assert all(torch.equal(a["state_dict"][k], c["state_dict"][k]) for k in a["state_dict"])


def test_training_with_a_reducing_method(tmp_path):
    """Decoder trained on reduced tokens; another setting of the method is another head."""
    data = FakeData(6)
    config = TrainConfig(epochs=4, batch_size=3, lr=3e-3, warmup=0)
    setup = tiny_setup(PairMerge(3, shift=0.1))
    path = train_head(setup, config=config, dataset=data, cache=tmp_path, progress=False)
    meta = load_head(setup, path)
    assert meta["method"] == "pairmerge" and meta["settings"] == {"most": 3, "shift": 0.1}
    assert meta["history"][-1]["loss"] < meta["history"][0]["loss"]
    other = train_head(tiny_setup(PairMerge(2, shift=0.1)), config=config, dataset=data,
                       cache=tmp_path, progress=False)
    assert other.parent != path.parent
    assert len(list((tmp_path / "features").iterdir())) == 2


def test_fully_ignored_window_is_skipped(tmp_path):
    data = FakeData(3)
    first = data.samples[0]
    data.samples[0] = Sample(first.image, torch.full_like(first.label, IGNORE), first.name)
    setup = tiny_setup(decoder="linear")
    path = train_head(setup, epochs=1, batch_size=1, dataset=data, cache=tmp_path, progress=False)
    meta = load_head(setup, path)
    assert all(torch.isfinite(p).all() for p in setup.model.decoder.parameters())
    assert meta["history"][0]["loss"] > 0


def test_training_windows_are_the_tiles_of_the_test_scale_image(tmp_path):
    """640x480 with a 512 window: test scale 683x512, two tiles; the encoder sees exactly
    ``algm.data.windows.tiles`` and the cache holds their labels."""
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 480, 640), generator=g, dtype=torch.uint8)
    label = torch.randint(0, N_CLS + 1, (480, 640), generator=g)
    data = FakeData(0)
    data.samples = [Sample(image, label, "wide")]
    setup = dataclasses.replace(tiny_setup(), window=(512, 512))
    seen = count_encoder_calls(setup)
    feats = extract_features(setup, dataset=data, cache=tmp_path, progress=False)
    expected = list(tiles(image, (512, 512), TINY.mean, TINY.std, label, IGNORE))
    assert len(expected) == 2 and len(feats.items) == len(seen) == 2
    for (x, y), item, images in zip(expected, feats.items, seen):
        assert torch.equal(images, x) and torch.equal(item["label"].long(), y[0])


def test_collate_rounds_padded_lengths_up():
    def item(t):
        return {"x": torch.ones(t, 2), "size": torch.ones(t), "source": torch.zeros(6, dtype=torch.int32),
                "keep": None, "grid": [2, 3], "aux": None, "label": torch.zeros(4, 6, dtype=torch.uint8)}

    state, _ = collate([item(5), item(7)], multiple=4)
    assert state.x.shape == (2, 8, 2) and state.keep.sum(1).tolist() == [5, 7]
    assert state.x[0, 5:].abs().sum() == 0 and state.size[1, 7:].sum() == 0
    state, _ = collate([item(7), item(7)], multiple=4)  # nothing to pad: no mask, no rounding
    assert state.x.shape == (2, 7, 2) and state.keep is None


def test_padding_is_recorded(tmp_path):
    data = FakeData(6)
    setup = tiny_setup(PairMerge(3))
    path = train_head(setup, config=TrainConfig(epochs=2, batch_size=3, warmup=0, precision="fp32"),
                      dataset=data, cache=tmp_path, progress=False)
    padding = [h["padding"] for h in load_head(setup, path)["history"]]
    assert len(padding) == 2 and all(0 <= p < 0.5 for p in padding) and max(padding) > 0


def test_precision_resolves_per_cpu_and_keys_the_head(tmp_path, monkeypatch):
    monkeypatch.setattr(head_mod, "native_bf16", lambda: True)
    assert TrainConfig().resolved_precision() == "bf16"
    monkeypatch.setattr(head_mod, "native_bf16", lambda: False)
    assert TrainConfig().resolved_precision() == "fp32"
    assert TrainConfig(precision="bf16").resolved_precision() == "bf16"
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16"):
        TrainConfig(precision="fp16")
    data = FakeData(4)
    config = TrainConfig(epochs=3, batch_size=2, lr=3e-3, warmup=0)
    auto = train_head(tiny_setup(), config=config, dataset=data, cache=tmp_path, progress=False)
    fp32 = dataclasses.replace(config, precision="fp32")
    assert train_head(tiny_setup(), config=fp32, dataset=data, cache=tmp_path, progress=False) == auto
    setup = tiny_setup()
    bf16 = train_head(setup, config=dataclasses.replace(config, precision="bf16"), dataset=data,
                      cache=tmp_path, progress=False)
    meta = load_head(setup, bf16)
    assert bf16 != auto and meta["train"]["precision"] == "bf16"
    assert meta["history"][-1]["loss"] < meta["history"][0]["loss"]


def test_algm_method_trains_a_head(tmp_path):
    method = make_setup("vit-s16", "camvid", "algm", window=(64, 64)).model.method
    data = FakeData(4)
    setup = tiny_setup(method)
    path = train_head(setup, epochs=2, dataset=data, cache=tmp_path, progress=False, batch_size=2)
    assert load_head(setup, path)["method"] == "algm"


def _head_file(path, setup, edit=None, **meta):
    """A head.pt as train_head writes it, for ``setup``'s decoder; ``edit(state)`` may
    corrupt the weights, ``meta`` overrides metadata entries."""
    state = dict(setup.model.decoder.state_dict())
    if edit is not None:
        edit(state)
    meta = {"decoder": head_mod.decoder_spec(setup.model.decoder), **meta}
    torch.save({"format": head_mod.HEAD_FORMAT, "meta": json.dumps(meta), "state_dict": state}, path)
    return path


@pytest.mark.parametrize("damage", [
    lambda p: p.write_text("a --head that is not a torch file\n"),  # torch.load: KeyError
    lambda p: p.write_bytes(p.read_bytes()[:-100]),  # truncated: RuntimeError
])
def test_unreadable_head_is_one_line_naming_the_file(tmp_path, damage):
    setup = tiny_setup()
    path = _head_file(tmp_path / "head.pt", setup)
    damage(path)
    before = sorted(tmp_path.iterdir())
    with pytest.raises(ValueError, match=f"^{path}: not a readable torch file") as err:
        load_head(setup, path)
    assert "\n" not in str(err.value) and sorted(tmp_path.iterdir()) == before


def test_head_with_non_finite_weights_is_refused_by_name(tmp_path):
    setup = tiny_setup()
    weights = {k: v.clone() for k, v in setup.model.decoder.state_dict().items()}

    def poison(state):
        state["cls_emb"] = torch.full_like(state["cls_emb"], float("nan"))

    path = _head_file(tmp_path / "head.pt", setup, edit=poison)
    n = setup.model.decoder.cls_emb.numel()
    with pytest.raises(ValueError, match=rf"^{path}: tensor cls_emb holds NaN/inf \({n} of {n} values\)"):
        load_head(setup, path)
    for k, v in setup.model.decoder.state_dict().items():  # the model is left as it was
        assert torch.equal(v, weights[k]), k


def test_head_of_another_class_count_says_so(tmp_path):
    other = Setup(model=build_segmenter(TINY, 5, DecoderConfig("mask")), backbone=TINY, dataset=SPEC,
                  window=WINDOW)
    path = _head_file(tmp_path / "head.pt", other)
    with pytest.raises(ValueError, match=r"does not fit this model: n_cls 5 \(model 3\)$"):
        load_head(tiny_setup(), path)
    damaged = tmp_path / "damaged.pt"
    torch.save({"format": head_mod.HEAD_FORMAT, "meta": "{not json", "state_dict": {}}, damaged)
    with pytest.raises(ValueError, match=f"^{damaged}: damaged head metadata"):
        load_head(tiny_setup(), damaged)


def test_command_parses_and_rejects_random_backbones():
    import argparse

    from algm.cli import main
    from algm.commands import train_head as cmd
    from algm.commands.train_head import config_from_args

    parser = argparse.ArgumentParser()
    cmd.register(parser.add_subparsers())
    args = parser.parse_args(["train-head", "--epochs", "2", "--lr", "1e-3", "--batch-size", "3",
                              "--lr-schedule", "poly", "--flip", "--decoder", "linear", "--restart",
                              "--precision", "fp32"])
    assert config_from_args(args) == TrainConfig(epochs=2, lr=1e-3, batch_size=3, schedule="poly", flip=True,
                                                 precision="fp32")
    assert args.restart and args.decoder == "linear" and args.split == "train"
    assert main(["train-head", "--backbone", "vit-s16", "--no-eval"]) == 2


# ---------------------------------------------------------------- a short real run
def _miou_on(setup, frames) -> float:
    from algm.evaluate import evaluate

    return evaluate(setup.model, frames, setup.window, progress=False).miou


@pytest.mark.skipif(not (DEFAULT_CAMVID_ROOT / "train.txt").is_file(),
                    reason=f"CamVid is not at {DEFAULT_CAMVID_ROOT} (see SPEC section 6)")
def test_real_vit_s14_head_beats_random_weights(tmp_path):
    """3 CamVid frames: real ViT-S/14 + a linear head trained on them beats the same
    recipe on a randomly initialised ViT-S/14 (evaluated on the same frames with
    algm.evaluate). Half the CamVid window (168 x 224 = 12 x 16 tokens) keeps it short."""
    frames = build_dataset("camvid", "train", limit=3)
    config = TrainConfig(epochs=15, batch_size=1, lr=1e-2, warmup=0)
    scores = {}
    for pretrained in (True, False):
        torch.manual_seed(0)
        setup = make_setup("vit-s14", "camvid", window=(168, 224), decoder=DecoderConfig("linear"),
                           pretrained=pretrained)
        train_head(setup, config=config, dataset=frames, cache=tmp_path, progress=False)
        scores[pretrained] = _miou_on(setup, frames)
    print(f"3-frame mIoU: real {scores[True]:.3f}, random weights {scores[False]:.3f}")
    assert scores[True] > scores[False] + 0.1, scores
    assert scores[True] > 0.4, scores


def test_poly_schedule_decays_from_lr_to_min_lr():
    schedule = Schedule(1e-3, "poly", 0.0, 1e-5)
    assert schedule.lr_at(0, 10) == pytest.approx(1e-3)
    assert schedule.lr_at(5, 10) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 ** 0.9)
    assert schedule.lr_at(9, 10) > 1e-5
    with pytest.raises(ValueError, match="min_lr must be between 0 and lr"):
        Schedule(1e-3, "poly", 0.0, 1e-2)


# ------------------------------------------------------------------ hostile caches (issue 27)
def test_a_feature_file_of_another_shape_is_moved_aside_and_encoded_again(tmp_path, capsys):
    data, setup = FakeData(2), tiny_setup()
    first = extract_features(setup, dataset=data, cache=tmp_path, progress=False)
    frame = first.path / "000001.pt"
    blob = torch.load(frame, weights_only=True)
    blob["items"][0]["x"] = blob["items"][0]["x"][:, :3]  # another encoder's width
    torch.save(blob, frame)
    calls = count_encoder_calls(setup)
    again = extract_features(setup, dataset=data, cache=tmp_path, progress=False)
    assert len(calls) == 1  # only the bad frame, encoded again
    assert torch.equal(again.items[1]["x"], first.items[1]["x"])
    assert (first.path / "000001.pt.bad").is_file()
    assert f"damaged cache entry {frame} (ValueError: x of shape" in capsys.readouterr().err


def test_a_damaged_feature_index_is_moved_aside_and_written_again(tmp_path):
    data, setup = FakeData(2), tiny_setup()
    first = extract_features(setup, dataset=data, cache=tmp_path, progress=False)
    index = first.path / "index.json"
    for damage in ("{not json", json.dumps({"n_items": 2})):
        index.write_text(damage)
        again = extract_features(setup, dataset=data, cache=tmp_path, progress=False)
        assert again.index["n_items"] == 2 and json.loads(index.read_text())["n_items"] == 2
    assert (first.path / "index.json.bad").is_file() and (first.path / "index.json.bad-2").is_file()


def test_a_damaged_cached_head_is_moved_aside_and_trained_again(tmp_path):
    data, setup = FakeData(2), tiny_setup()
    head = train_head(setup, dataset=data, cache=tmp_path, progress=False, epochs=1)
    head.write_bytes(head.read_bytes()[:-100])  # truncated
    assert trained_head_path(setup, config=TrainConfig(epochs=1), dataset=data, cache=tmp_path) is None
    assert head.with_name("head.pt.bad").is_file() and not head.exists()
    head.with_name("head.pt.bad").replace(head)
    assert train_head(setup, dataset=data, cache=tmp_path, progress=False, epochs=1) == head  # no error
    load_head(setup, head)
    assert head.with_name("head.pt.bad").is_file()


@pytest.mark.parametrize("cached", ["{broken", '{"split": "val", "miou": NaN, "acc": 0.5, "n_images": 2}'])
def test_a_damaged_cached_evaluation_is_moved_aside_and_recomputed(tmp_path, monkeypatch, cached):
    setup = tiny_setup()
    monkeypatch.setattr(head_mod, "build_dataset", lambda *a, **k: FakeData(2))
    monkeypatch.setattr(FakeData, "classes", tuple("abc"), raising=False)
    (tmp_path / "eval-pct-val.json").write_text(cached)
    row = head_mod.evaluate_head(setup, "val", folder=tmp_path, progress=False)
    assert 0 <= row["miou"] <= 100 and row["n_images"] == 2
    assert json.loads((tmp_path / "eval-pct-val.json").read_text())["miou"] == row["miou"]
    assert (tmp_path / "eval-pct-val.json.bad").read_text() == cached


@pytest.mark.parametrize("field", ["lr", "weight_decay", "scale_lr_mult", "warmup"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_hyper_parameters_are_refused_before_training(field, value):
    with pytest.raises(ValueError, match=f"^{field.replace('_', ' ')} must be a finite number, got {value}$"):
        TrainConfig(**{field: value})


# ------------------------------------------------------------------ tokens after chosen blocks
def count_layer_batches(encoder):
    """The list of the image batches (B, 3, h, w) ``encoder.start`` gets from now on."""
    calls = []
    start = encoder.start

    def counted(images, *args, **kwargs):
        calls.append(images)
        return start(images, *args, **kwargs)

    encoder.start = counted
    return calls


def test_layer_features_are_one_forward_per_frame_cached_and_keyed(tmp_path, capsys):
    data, encoder = FakeData(6), tiny_setup().model.encoder
    calls = count_layer_batches(encoder)

    def extract(layers=(1, 2), data=data, encoder=encoder):
        return extract_layer_features(encoder, data, layers, WINDOW, dataset="fake", split="train",
                                      cache=tmp_path, progress=False)

    first = extract()
    assert [len(c) for c in calls] == [4, 2]  # every frame once, 4 frames per forward
    assert first.features.shape == (6, 2, 24, 32) and first.features.dtype == torch.float16
    assert first.grid == (4, 6) and first.n_frames == 6 and first.extract_seconds > 0
    images = torch.cat([x for s in data.samples for x, _ in tiles(s.image, WINDOW, TINY.mean, TINY.std)])
    assert torch.equal(first.features, layer_tokens(encoder, images, (1, 2)).half())
    assert torch.equal(first.labels.long(), torch.stack([s.label for s in data.samples]))
    calls.clear()
    again = extract()
    assert calls == [] and again.extract_seconds == 0 and again.path == first.path
    assert torch.equal(again.features, first.features) and torch.equal(again.labels, first.labels)
    index = json.loads((first.path / "index.json").read_text())
    assert index["layers"] == [1, 2] and index["n_items"] == 6
    # other blocks, frames or encoder weights: another entry
    assert extract(layers=(2,)).path != first.path
    assert extract(data=FakeData(5)).path != first.path
    assert extract(encoder=tiny_setup(seed=1).model.encoder).path != first.path

    # A damaged frame (here: non-finite numbers) is moved aside; its whole batch of
    # frames is encoded again, so its numbers are those of the uninterrupted run.
    frame = first.path / "000005.pt"
    blob = torch.load(frame, weights_only=True)
    blob["items"][0]["x"][0, 0, 0] = float("nan")
    torch.save(blob, frame)
    (first.path / "000001.pt").unlink()
    calls.clear()
    healed = extract()
    assert [len(c) for c in calls] == [4, 2]
    assert torch.equal(healed.features, first.features)
    assert (first.path / "000005.pt.bad").is_file() and (first.path / "000001.pt").is_file()
    assert f"damaged cache entry {frame} (ValueError: x holds non-finite values)" in capsys.readouterr().err


def test_layer_features_through_the_context(tmp_path, monkeypatch):
    """What a method's training gets: the data opened first (from the context's root),
    then the framework's encoder for the context's window (None: the dataset's)."""
    monkeypatch.setenv("ALGM_BENCH_CACHE", str(tmp_path))
    order = []
    monkeypatch.setattr(algm.data.datasets, "build_dataset",
                        lambda name, split, root=None, limit=None: order.append(("data", name, split, root, limit))
                        or FakeData(limit))
    encoder = tiny_setup().model.encoder

    def frozen_encoder(backbone, window):
        order.append(("encoder", backbone, window))
        return encoder

    context = TrainingContext(data_root="/data", progress=False, frozen_encoder=frozen_encoder,
                              layer_cache=frozen_layer_features)
    feats = context.layer_features(TINY, SPEC, (2,), split="val", limit=3)
    assert order == [("data", "fake", "val", "/data", 3), ("encoder", "tiny", WINDOW)]
    assert feats.features.shape == (3, 1, 24, 32) and feats.path.is_relative_to(tmp_path / "layers")
    with pytest.raises(ValueError, match=r"^this training needs the framework's frozen encoder and its feature "
                                         r"cache \(TrainingContext.frozen_encoder and .layer_cache\)$"):
        TrainingContext(frozen_encoder=frozen_encoder).layer_features(TINY, SPEC, (2,))
