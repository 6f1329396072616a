"""Decoder ("head") training on a frozen encoder, from cached encoder outputs.

:func:`train_head` decodes the cached final token states (:mod:`algm.training.features`)
with :meth:`algm.model.segmenter.Segmenter.decode`, exactly as ``Segmenter.run`` does at
test time: decoder on the patch tokens, the method's ``restore`` (on the cached state,
``aux`` included, so custom restores such as early-exit predictions work), bilinear
upsampling to the window; cross-entropy against the window's label with the dataset's
ignore index. The loop is :func:`algm.training.loop.fit`: AdamW, linear warm-up then
cosine (or poly) decay per step, seeded initialisation and per-epoch shuffling, a
checkpoint (``last.pt``) every epoch, so a resumed run is bit-identical to an
uninterrupted one. The finished decoder goes to ``head.pt`` beside it, in the folder
``cache_dir("heads", <key>)`` whose key adds decoder and hyper-parameters to the feature
key. :func:`train_head` is idempotent: it returns the finished head if there is one, in the
cache or shipped with the package (:mod:`algm.shipped`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from algm import atomic
from algm.build import Setup
from algm.cache import move_aside
from algm.files import read_text
from algm.safe_yaml import brief, clip
from algm.shipped import install
from algm.data.datasets import build_dataset
from algm.evaluate import evaluate
from algm.model.decoder import LinearDecoder, MaskTransformer
from algm.model.segmenter import Segmenter
from algm.precision import autocast_context, native_bf16
from algm.training.defaults import (HEAD_BATCH_SIZE, HEAD_EPOCHS, HEAD_LR, HEAD_PRECISION, HEAD_SCALE_LR_MULT,
                                    HEAD_SCHEDULE, HEAD_SEED, HEAD_WARMUP, HEAD_WEIGHT_DECAY, TRAIN_PRECISIONS)
from algm.training.features import collate, extract_features, feature_identity, frame_names, open_split
from algm.training.keys import cache_folder, cache_label, digest
from algm.training.loop import Schedule, StepResult, fit
from algm.weights.checkpoint import check_fits, strict_load
from algm.weights.torch_file import check_state_dict, load_torch_file

HEAD_FORMAT = "algm-bench/head/v1"
# bf16 kernels are prepared per input shape: padded batches rounded up to 64 tokens
# share a few shapes (measured: 15 % faster steps than exact lengths).
BF16_PAD_MULTIPLE = 64


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one head training (all part of the head's cache key).

    lr: AdamW peak learning rate (None: per decoder, mask 4e-4, linear 3e-3);
    schedule: ``cosine`` or ``poly`` (power 0.9) decay to 0 after ``warmup`` steps
    (a fraction of all steps if < 1, else a count) of linear warm-up; ``flip``: also
    train on the horizontally flipped copy of every window (encoded once and cached as
    a second item, doubling extraction and epoch cost); ``scale_lr_mult``: learning-rate
    multiplier of the mask decoder's ``mask_norm`` (see :func:`param_groups`);
    ``precision``: ``fp32``, ``bf16`` autocast of the decoder's forward (mixed precision:
    weights, optimizer and loss stay fp32), or ``auto``: bf16 where the CPU computes it
    natively (:func:`native_bf16`), else fp32. Measured on a 2-core AMX CPU (ViT-S/14 mask
    head, CamVid): 1.8x faster epochs, CamVid val mIoU 52.2 (bf16) vs 52.1 (fp32).

    Batches are drawn at random. Batching windows of similar token counts (to save
    padding) was tried and dropped: on CamVid such batches hold near-identical frames of
    one video, and the ALGM head lost 2.7 mIoU, while the padding it saved (7 % of the
    tokens) costs little.
    """

    epochs: int = HEAD_EPOCHS
    lr: float | None = None
    weight_decay: float = HEAD_WEIGHT_DECAY
    batch_size: int = HEAD_BATCH_SIZE
    schedule: str = HEAD_SCHEDULE
    warmup: float = HEAD_WARMUP
    seed: int = HEAD_SEED
    flip: bool = False
    scale_lr_mult: float = HEAD_SCALE_LR_MULT
    precision: str = HEAD_PRECISION

    def __post_init__(self):
        for name in ("lr", "weight_decay", "warmup", "scale_lr_mult"):  # NaN or inf trains a NaN head
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name.replace('_', ' ')} must be a finite number, got {value}")
        if self.weight_decay < 0 or self.scale_lr_mult <= 0:
            raise ValueError(f"weight decay must be >= 0 and the scale lr multiplier > 0, got "
                             f"{self.weight_decay} and {self.scale_lr_mult}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if self.precision not in TRAIN_PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(TRAIN_PRECISIONS)}, got {self.precision!r}")
        self.lr_schedule("mask")  # checks lr, schedule and warmup

    def resolved_lr(self, decoder_kind: str) -> float:
        if self.lr is not None:
            return self.lr
        return HEAD_LR[decoder_kind]

    def lr_schedule(self, decoder_kind: str) -> Schedule:
        return Schedule(self.resolved_lr(decoder_kind), self.schedule, self.warmup)

    def resolved_precision(self) -> str:
        if self.precision != "auto":
            return self.precision
        return "bf16" if native_bf16() else "fp32"


# ------------------------------------------------------------------ decoders
def decoder_spec(decoder: nn.Module) -> dict:
    """What kind of decoder this is (part of the head key; checked when loading)."""
    if isinstance(decoder, MaskTransformer):
        return {"name": "mask", "n_layers": len(decoder.blocks), "n_cls": decoder.n_cls,
                "dim": decoder.proj_dec.in_features}
    if isinstance(decoder, LinearDecoder):
        return {"name": "linear", "n_cls": decoder.n_cls, "dim": decoder.head.in_features}
    raise ValueError(f"cannot train decoder of type {type(decoder).__name__}; "
                     f"expected MaskTransformer or LinearDecoder")


def fresh_decoder(setup: Setup, seed: int) -> nn.Module:
    """A newly initialised decoder of the setup's kind, seeded (global RNG untouched)."""
    spec = decoder_spec(setup.model.decoder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if spec["name"] == "mask":
            old = setup.model.decoder
            return MaskTransformer(spec["n_cls"], spec["dim"], spec["n_layers"], old.decoder_norm.eps)
        return LinearDecoder(spec["n_cls"], spec["dim"])


def param_groups(decoder: nn.Module, weight_decay: float, scale_lr_mult: float = 1.0) -> list[dict]:
    """AdamW groups (each with an ``lr_mult``): weight decay on weight matrices only, none
    on norms, biases and class embeddings; the mask decoder's ``mask_norm`` (its scale is
    the temperature of the logits: LayerNorm'ed cosine similarities are bounded by
    sqrt(n_cls - 1) times it) learns ``scale_lr_mult`` times faster, as a short schedule
    otherwise leaves the logits too soft."""
    decay, no_decay, scale = [], [], []
    for name, p in decoder.named_parameters():
        if name.startswith("mask_norm."):
            scale.append(p)
        elif p.ndim >= 2 and name != "cls_emb":
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "lr_mult": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0}]
    if scale:
        groups.append({"params": scale, "weight_decay": 0.0, "lr_mult": scale_lr_mult})
    return groups


# ------------------------------------------------------------------ where heads live
def head_identity(setup: Setup, config: TrainConfig, features_key: str) -> dict:
    """Everything a trained head depends on (hashed into its folder name)."""
    spec = decoder_spec(setup.model.decoder)
    return {"format": HEAD_FORMAT, "features": features_key, "decoder": spec,
            "train": {**asdict(config), "lr": config.resolved_lr(spec["name"]),
                      "precision": config.resolved_precision()},
            "ignore_index": setup.dataset.ignore_index}


def _features_key(setup: Setup, split: str, data, flip: bool) -> str:
    return digest(feature_identity(setup, split, frame_names(data), flip))


def _head_folder(setup: Setup, split: str, config: TrainConfig, features_key: str, cache) -> Path:
    ident = head_identity(setup, config, features_key)
    name = f"{cache_label(setup, split)}-{ident['decoder']['name']}-e{config.epochs}-{digest(ident)}"
    return cache_folder(cache, "heads", name)


def trained_head_path(setup: Setup, split: str = "train", config: TrainConfig = TrainConfig(), *,
                      dataset=None, root: str | Path | None = None, limit: int | None = None,
                      cache: str | Path | None = None) -> Path | None:
    """``head.pt`` of this config if it was trained already or the package ships it
    (:func:`finished_head`), else None (nothing is trained). Arguments as for
    :func:`train_head`."""
    data = open_split(setup, split, dataset, root, limit)
    return finished_head(setup, split, config, _features_key(setup, split, data, config.flip), cache)


def finished_head(setup: Setup, split: str, config: TrainConfig, features_key: str,
                  cache: str | Path | None = None) -> Path | None:
    """The usable ``head.pt`` of this config in the cache, else the one the package ships
    (:func:`algm.shipped.install` copies it into the cache), else None. With precision
    ``auto`` a head of the other precision counts too, so that a machine without native
    bf16 uses a shipped bf16 head rather than train one (their mIoU differ by ~0.1). A
    cached head that does not load (:func:`read_head`) is moved aside."""
    precisions = [config.resolved_precision()]
    if config.precision == "auto":
        precisions += [p for p in ("bf16", "fp32") if p not in precisions]
    for precision in precisions:
        folder = _head_folder(setup, split, dataclasses.replace(config, precision=precision), features_key, cache)
        path = folder / "head.pt"
        if path.is_file() and _usable(setup, path) or install(path) and _usable(setup, path):
            return path
    return None


def _usable(setup: Setup, path: Path) -> bool:
    """True if the cached head ``path`` loads into ``setup``; else it is moved aside."""
    try:
        read_head(setup, path)
        return True
    except ValueError as err:
        move_aside(path, clip(err))
        return False


def load_head(setup: Setup, path: str | Path) -> dict:
    """Load a ``head.pt`` into ``setup.model.decoder`` (strict); returns its metadata.

    Fails (ValueError, one line naming the file) if it is not a readable head, holds
    another kind of decoder, width or class count, or a tensor with NaN/inf."""
    meta, state = read_head(setup, path)
    strict_load(setup.model.decoder, state, f"head {path}")
    return meta


def read_head(setup: Setup, path: str | Path) -> tuple[dict, dict]:
    """(metadata, state dict) of a ``head.pt`` checked against ``setup``'s decoder
    (kind, width, class count, every tensor's name and shape, finite values)."""
    path = Path(path)
    blob = load_torch_file(path, what="head")
    if not isinstance(blob, dict) or blob.get("format") != HEAD_FORMAT or "state_dict" not in blob:
        raise ValueError(f"{path} is not a trained head (format {HEAD_FORMAT})")
    try:
        meta = json.loads(blob["meta"])
        theirs = meta["decoder"]
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{path}: damaged head metadata (no readable decoder description)") from None
    want = decoder_spec(setup.model.decoder)
    if theirs != want:
        raise ValueError(f"{path} holds a decoder that does not fit this model: {_spec_difference(theirs, want)}")
    state = check_state_dict(blob["state_dict"], path)
    check_fits(setup.model.decoder, state, f"head {path}")
    return meta, state


def _spec_difference(theirs, want: dict) -> str:
    """'n_cls 150 (model 11), ...' for the decoder-spec fields that differ."""
    if not isinstance(theirs, dict):
        return f"{theirs!r} (model {want})"
    return ", ".join(f"{k} {theirs.get(k)!r} (model {want.get(k)!r})"
                     for k in sorted(set(theirs) | set(want)) if theirs.get(k) != want.get(k))


# ------------------------------------------------------------------ training
def _fit_decoder(setup: Setup, decoder: nn.Module, items: list[dict], config: TrainConfig,
                 checkpoint: Path, key: str, progress: bool,
                 on_epoch: Callable[[int, nn.Module], None] | None) -> list[dict]:
    """Train ``decoder`` on the cached windows ``items`` with :func:`fit`; its history
    entries also hold ``padding``, the share of padded tokens in the epoch's batches."""
    kind = decoder_spec(decoder)["name"]
    precision = config.resolved_precision()
    pad_multiple = BF16_PAD_MULTIPLE if precision == "bf16" else 1
    ignore = setup.dataset.ignore_index
    model = Segmenter(setup.model.encoder, decoder, setup.model.method)  # decodes with this decoder
    optimizer = torch.optim.AdamW(param_groups(decoder, config.weight_decay, config.scale_lr_mult),
                                  lr=config.resolved_lr(kind))
    tokens = {"padded": 0, "all": 0}  # of this epoch's batches, skipped ones included

    def step(batch: Tensor, _generator: torch.Generator) -> StepResult | None:
        state, labels = collate([items[j] for j in batch.tolist()], multiple=pad_multiple)
        tokens["all"] += state.x.shape[0] * state.x.shape[1]
        tokens["padded"] += 0 if state.keep is None else int((~state.keep).sum())
        valid = int((labels != ignore).sum())
        if not valid:  # nothing labelled: the mean loss would be NaN
            return None
        with autocast_context(torch.device("cpu"), precision):
            logits = model.decode(state, tuple(labels.shape[-2:]))
        return StepResult(F.cross_entropy(logits.float(), labels, ignore_index=ignore), weight=valid)

    def epoch_done(epoch: int, entry: dict) -> None:
        entry["padding"] = tokens["padded"] / tokens["all"]
        tokens.update(padded=0, all=0)
        if on_epoch is not None:
            on_epoch(epoch, decoder)

    return fit(decoder, optimizer, step, n_items=len(items), batch_size=config.batch_size,
               epochs=config.epochs, schedule=config.lr_schedule(kind), seed=config.seed,
               checkpoint=checkpoint, key=key, progress=progress, desc="head", on_epoch=epoch_done)


def train_head(setup: Setup, split: str = "train", epochs: int | None = None, *,
               config: TrainConfig | None = None, dataset=None, root: str | Path | None = None,
               limit: int | None = None, restart: bool = False, cache: str | Path | None = None,
               progress: bool = True, load: bool = True,
               on_epoch: Callable[[int, nn.Module], None] | None = None, **overrides) -> Path:
    """Train ``setup.model.decoder`` on the frozen encoder + method; returns ``head.pt``.

    ``config`` (or ``epochs`` and :class:`TrainConfig` field ``overrides`` such as
    ``lr=``, ``batch_size=``, ``flip=``) sets the hyper-parameters. Idempotent: a finished
    head is returned as is; an interrupted one resumes from its last epoch checkpoint
    (``restart=True`` discards checkpoints and head and trains from scratch). With
    ``load`` the trained weights end up in ``setup.model.decoder``. Training and timing
    facts are in the head's metadata (``load_head`` returns them) and ``train.json``;
    ``on_epoch(epoch, decoder)`` is called after every epoch (1-based; monitoring).
    """
    if epochs is not None:
        overrides["epochs"] = epochs
    config = dataclasses.replace(config if config is not None else TrainConfig(), **overrides)
    data = open_split(setup, split, dataset, root, limit)
    features_key = _features_key(setup, split, data, config.flip)
    folder = _head_folder(setup, split, config, features_key, cache)
    head_file, checkpoint = folder / "head.pt", folder / "last.pt"
    if restart:
        for f in (head_file, checkpoint, *folder.glob("eval-*.json")):
            f.unlink(missing_ok=True)
    found = None if restart else finished_head(setup, split, config, features_key, cache)
    if found is not None:
        head_file = found
    else:  # none yet (a damaged one was moved aside): train it
        feats = extract_features(setup, split, flip=config.flip, dataset=data, cache=cache, progress=progress)
        decoder = fresh_decoder(setup, config.seed)
        history = _fit_decoder(setup, decoder, feats.items, config, checkpoint, folder.name, progress, on_epoch)
        meta = {
            **head_identity(setup, config, features_key),
            "backbone": setup.backbone.name, "dataset": setup.dataset.name, "split": split,
            "window": list(setup.window), "method": setup.model.method.name,
            "settings": setup.model.method.settings(), "features_dir": str(feats.path),
            "n_windows": len(feats.items), "steps": -(-len(feats.items) // config.batch_size) * config.epochs,
            "history": history,
            "extract_seconds": feats.extract_seconds, "extract_cpu_seconds": feats.extract_cpu_seconds,
            "train_seconds": sum(h["seconds"] for h in history),
            "train_cpu_seconds": sum(h.get("cpu_seconds", 0.0) for h in history),
        }
        atomic.save_torch({"format": HEAD_FORMAT, "meta": json.dumps(meta, default=str),
                           "state_dict": decoder.state_dict()}, head_file)
        atomic.write_json(folder / "train.json", meta)
    if load:
        load_head(setup, head_file)
    return head_file


# ------------------------------------------------------------------ evaluation
def evaluate_head(setup: Setup, split: str = "val", *, root: str | Path | None = None,
                  limit: int | None = None, folder: Path | None = None, progress: bool = True) -> dict:
    """mIoU of ``setup.model`` (with its current decoder) on a split via
    :func:`algm.evaluate.evaluate`; cached as ``eval-pct-<split>[-n<limit>].json`` in
    ``folder`` (a head's folder) if given."""
    out = None
    if folder is not None:
        # "pct": figures in percent (files of fractions, named eval-<split>, are not read)
        out = Path(folder) / (f"eval-pct-{split}" + (f"-n{limit}" if limit else "") + ".json")
        cached = _cached_eval(out, split)
        if cached is not None:
            return cached
    data = build_dataset(setup.dataset.name, split, root=root, limit=limit)
    start = time.perf_counter()
    result = evaluate(setup.model, data, setup.window, progress=progress)
    row = {**result.to_dict(data.classes), "split": split, "seconds": time.perf_counter() - start}
    if out is not None:
        atomic.write_json(out, row)
    return row


def _cached_eval(path: Path, split: str) -> dict | None:
    """The evaluation cached in ``path``, or None: missing, or damaged (not JSON, another
    split, mIoU / accuracy not a percentage, no image count), then moved aside."""
    if not path.exists():
        return None
    try:
        row = json.loads(read_text(path, "cached evaluation"))
        if not isinstance(row, dict) or row.get("split") != split:
            raise ValueError(f"not an evaluation of the {split} split")
        for name in ("miou", "acc"):
            value = row.get(name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
                raise ValueError(f"{name} is {brief(value)}, not a number within 0-100")
        if isinstance(row.get("n_images"), bool) or not isinstance(row.get("n_images"), int) or row["n_images"] < 1:
            raise ValueError(f"n_images is {brief(row.get('n_images'))}")
        if not isinstance(row.get("per_class_iou"), dict):
            raise ValueError("no per-class IoU")
        return row
    except ValueError as err:  # JSONDecodeError is a ValueError
        move_aside(path, clip(err))
        return None
