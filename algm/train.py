"""Decoder ("head") training on a frozen encoder, with cached encoder outputs.

The encoder (and the token-reduction method inside it) is frozen, so its output for a
training window never changes: :func:`extract_features` runs it once per window and
stores the *final* token state on disk (``x`` including cls, ``size``, ``source``,
``keep``, the grid, the method's ``aux`` payload and the window's label). An epoch then
costs only the decoder. The cache entry is keyed by a hash of everything the encoder
output depends on: backbone config, a fingerprint of the encoder and method weights,
dataset, split, the frames used, window, method name + ``settings()``, the flip copy and
the storage format. Another method setting (ALGM's tau, ToMe's r, ...) therefore never
reuses stale features; for a reducing method the cached tokens are the *reduced* ones,
so the decoder trains on exactly what it sees at test time ("trained with the method").

Training (:func:`train_head`) mirrors :meth:`algm.model.segmenter.Segmenter.run`:
decoder on the patch tokens ``x[:, 1:]`` with ``keep[:, 1:]``, the method's ``restore``
(called on a :class:`~algm.reduction.TokenState` rebuilt from the cache, ``aux``
included, so custom restores such as pruning's exit predictions work) to the (h, w)
patch grid, bilinear upsampling to the window, cross-entropy against the window's label
(nearest-resized to the test scale) with the dataset's ignore index. AdamW, linear warm-up
then cosine (or poly) decay per step, seeded initialisation and per-epoch shuffling
(``seed``, ``epoch``), so a run resumed from an epoch checkpoint is bit-identical to an
uninterrupted one. Checkpoints (decoder + optimizer state) are written every epoch; the
finished decoder goes to ``head.pt`` beside them, in the folder
``cache_dir("heads", <key>)`` whose key adds decoder and hyper-parameters to the feature
key. :func:`train_head` is idempotent: it returns the finished head if there is one.

Windows of a training image: the image is resized to the test scale (short side = the
window's short side, as :func:`algm.evaluate.evaluate` does), padded if smaller than
the window (zeros = mean colour; label ignore), and cut into windows that cover it with
minimal overlap (one window for CamVid: 480x360 -> 448x336 = exactly the window).
Encoding is done one window at a time (batch 1), i.e. per-image merging even for
methods whose batched merging couples the images of a batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from algm.build import Setup
from algm.cache import cache_dir
from algm.data.transforms import preprocess
from algm.evaluate import window_starts
from algm.measure.throughput import autocast_context
from algm.model.decoder import LinearDecoder, MaskTransformer
from algm.reduction import TokenState

FEATURES_FORMAT = "algm-bench/head-features/v1"
CHECKPOINT_FORMAT = "algm-bench/head-checkpoint/v1"
HEAD_FORMAT = "algm-bench/head/v1"

# Defaults measured on a 2-core CPU with AMX (ViT-S/14, CamVid train, 367 windows of
# 336x448): mask head 6 epochs x 92 steps once the features are cached (about 2 min),
# about 40 s per epoch in bf16 (4 min in all; fp32: 72 s per epoch), 52.2 mIoU on
# CamVid val (fp32: 52.1; linear probe reference: 41.6); linear head 4 epochs: 47.4
# (cached-feature estimate).
DEFAULT_EPOCHS = 6


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

    epochs: int = DEFAULT_EPOCHS
    lr: float | None = None
    weight_decay: float = 0.01
    batch_size: int = 4
    schedule: str = "cosine"
    warmup: float = 0.05
    seed: int = 0
    flip: bool = False
    scale_lr_mult: float = 10.0
    precision: str = "auto"

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.schedule not in ("cosine", "poly"):
            raise ValueError(f"schedule must be 'cosine' or 'poly', got {self.schedule!r}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.precision not in TRAIN_PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(TRAIN_PRECISIONS)}, got {self.precision!r}")

    def resolved_lr(self, decoder_kind: str) -> float:
        if self.lr is not None:
            return self.lr
        return DEFAULT_LR[decoder_kind]

    def resolved_precision(self) -> str:
        if self.precision != "auto":
            return self.precision
        return "bf16" if native_bf16() else "fp32"


DEFAULT_LR = {"mask": 4e-4, "linear": 3e-3}
TRAIN_PRECISIONS = ("auto", "fp32", "bf16")
BF16_PAD_MULTIPLE = 64


def native_bf16() -> bool:
    """True if this CPU has bf16 matrix instructions (AMX or AVX512-BF16); elsewhere bf16
    autocast is emulated and slower than fp32."""
    return any(getattr(torch.cpu, probe, lambda: False)()
               for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


# ====================================================================== keys
def _digest(obj: Any, n: int = 16) -> str:
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def weights_fingerprint(*modules: nn.Module) -> str:
    """sha256 over the state dicts (names, dtypes, shapes, values) of ``modules``."""
    h = hashlib.sha256()
    for i, module in enumerate(modules):
        for name, tensor in sorted(module.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            h.update(f"{i}:{name}:{t.dtype}:{tuple(t.shape)}".encode())
            if t.dtype == torch.bfloat16:
                t = t.float()
            h.update(t.numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def decoder_spec(decoder: nn.Module) -> dict:
    """What kind of decoder this is (part of the head key; checked when loading)."""
    if isinstance(decoder, MaskTransformer):
        return {"name": "mask", "n_layers": len(decoder.blocks), "n_cls": decoder.n_cls,
                "dim": decoder.proj_dec.in_features}
    if isinstance(decoder, LinearDecoder):
        return {"name": "linear", "n_cls": decoder.n_cls, "dim": decoder.head.in_features}
    raise ValueError(f"cannot train decoder of type {type(decoder).__name__}; "
                     f"expected MaskTransformer or LinearDecoder")


def _sample_names(dataset) -> list[str]:
    files = getattr(dataset, "files", None)
    if files is not None:
        return [str(f[2]) for f in files]
    return [str(dataset[i].name) for i in range(len(dataset))]


def feature_identity(setup: Setup, split: str, names: Sequence[str], flip: bool) -> dict:
    """Everything the cached encoder outputs depend on (hashed into the feature key)."""
    method = setup.model.method
    return {
        "format": FEATURES_FORMAT,
        "backbone": asdict(setup.backbone),
        "weights": weights_fingerprint(setup.model.encoder, method),
        "dataset": setup.dataset.name,
        "split": split,
        "frames": _digest(list(names)),
        "n_frames": len(names),
        "window": list(setup.window),
        "method": method.name,
        "settings": method.settings(),
        "flip": bool(flip),
    }


def _label(setup: Setup, split: str) -> str:
    """Readable prefix of cache folder names (the hash after it is the real key)."""
    return f"{setup.backbone.name}-{setup.dataset.name}-{split}-{setup.model.method.name}"


def _root(cache: str | Path | None, *parts: str) -> Path:
    if cache is None:
        return cache_dir(*parts)
    path = Path(cache).joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _open_dataset(setup: Setup, split: str, dataset, root, limit):
    if dataset is not None:
        if limit is not None:
            from torch.utils.data import Subset

            sub = Subset(dataset, range(min(limit, len(dataset))))
            sub.n_cls, sub.ignore_index = dataset.n_cls, dataset.ignore_index
            return sub
        return dataset
    from algm.data.datasets import build_dataset

    return build_dataset(setup.dataset.name, split, root=root, limit=limit)


# ====================================================================== feature cache
@dataclass
class FeatureCache:
    """Cached encoder outputs of one split: ``items`` (one dict per window) in memory."""

    path: Path
    identity: dict
    items: list[dict]
    extract_seconds: float  # wall time of this call's encoding, 0 when all came from disk
    extract_cpu_seconds: float = 0.0  # process CPU time of the same


def _pack_aux(aux: Any) -> dict | None:
    """A method's ``state.aux`` as plain tensors (frozen dataclass of tensors or a tensor)."""
    if aux is None:
        return None
    if isinstance(aux, Tensor):
        return {"type": "tensor", "fields": {"value": aux.detach().cpu()}}
    if dataclasses.is_dataclass(aux) and not isinstance(aux, type):
        fields = {f.name: getattr(aux, f.name) for f in dataclasses.fields(aux)}
        if all(isinstance(v, Tensor) for v in fields.values()):
            cls = type(aux)
            return {"type": f"{cls.__module__}:{cls.__qualname__}",
                    "fields": {k: v.detach().cpu() for k, v in fields.items()}}
    raise ValueError(
        f"cannot cache the method's state.aux of type {type(aux).__name__}: train_head caches a "
        f"tensor or a dataclass of batch-first tensors; train this method's head off-the-shelf "
        f"(with method 'none') instead")


def _unpack_aux(packed: list[dict | None], device: torch.device) -> Any:
    """Batch the packed aux payloads of several windows (concatenated on dim 0)."""
    if all(p is None for p in packed):
        return None
    if any(p is None for p in packed) or len({p["type"] for p in packed}) != 1:
        raise ValueError("cached windows disagree on the method's aux payload")
    kind = packed[0]["type"]
    fields = {k: torch.cat([p["fields"][k] for p in packed]).to(device) for k in packed[0]["fields"]}
    if kind == "tensor":
        return fields["value"]
    module, qualname = kind.split(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj(**fields)


def _windows(setup: Setup, image: Tensor, label: Tensor, ignore_index: int):
    """(window image (1,3,h,w), window label (1,h,w)) pairs covering the test-scale image."""
    x = preprocess(image, min(setup.window), setup.backbone.mean, setup.backbone.std)
    size = tuple(x.shape[-2:])
    y = label.long()
    if tuple(y.shape) != size:
        y = F.interpolate(y[None, None].float(), size=size, mode="nearest")[0, 0].long()
    h, w = setup.window
    ph, pw = max(h - size[0], 0), max(w - size[1], 0)
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph))
        y = F.pad(y, (0, pw, 0, ph), value=ignore_index)
    H, W = x.shape[-2:]
    for top in window_starts(H, h, h):
        for left in window_starts(W, w, w):
            yield x[..., top:top + h, left:left + w], y[None, top:top + h, left:left + w]


def _label_dtype(n_cls: int, ignore_index: int) -> torch.dtype:
    return torch.uint8 if max(n_cls - 1, ignore_index) <= 255 and ignore_index >= 0 else torch.long


@torch.no_grad()
def _encode(setup: Setup, image: Tensor, label: Tensor, label_dtype: torch.dtype) -> dict:
    state, _ = setup.model.encoder(image, setup.model.method, label)
    n = state.grid[0] * state.grid[1]
    return {
        "x": state.x[0].to(torch.float16).cpu(),
        "size": state.size[0].float().cpu(),
        "source": state.source[0].to(torch.int32 if n < 2 ** 31 else torch.long).cpu(),
        "keep": None if state.keep is None else state.keep[0].cpu(),
        "grid": list(state.grid),
        "aux": _pack_aux(state.aux),
        "label": label[0].to(label_dtype).cpu(),
    }


def extract_features(setup: Setup, split: str = "train", *, flip: bool = False, dataset=None,
                     root: str | Path | None = None, limit: int | None = None,
                     cache: str | Path | None = None, progress: bool = True) -> FeatureCache:
    """Run the frozen encoder (with ``setup.model.method``) once per training window and
    cache the final token states; later calls read them from disk.

    ``dataset``: samples (``.image`` uint8 (3,H,W), ``.label`` (H,W), ``.name``) with
    ``n_cls``/``ignore_index``, instead of ``build_dataset(setup.dataset.name, split,
    root, limit)``. ``cache``: root folder instead of ``cache_dir()`` (tests).
    Interrupted extractions continue where they stopped (one file per frame).
    """
    data = _open_dataset(setup, split, dataset, root, limit)
    names = _sample_names(data)
    identity = feature_identity(setup, split, names, flip)
    key = _digest(identity)
    path = _root(cache, "features", f"{_label(setup, split)}-{key}")
    done = path / "index.json"
    ignore = data.ignore_index
    label_dtype = _label_dtype(data.n_cls, ignore)
    encoder_was_training = setup.model.training
    setup.model.eval()
    start, cpu = time.perf_counter(), time.process_time()
    encoded = 0
    items: list[dict] = []
    try:
        todo = range(len(data))
        bar = tqdm(todo, desc=f"features {split}", unit="img", disable=not progress)
        for i in bar:
            file = path / f"{i:06d}.pt"
            if file.is_file():
                try:
                    items.extend(torch.load(file, map_location="cpu", weights_only=True)["items"])
                    continue
                except Exception:  # a truncated file from an interrupted run: redo it
                    file.unlink()
            sample = data[i]
            out = []
            for image, label in _windows(setup, sample.image, sample.label, ignore):
                out.append(_encode(setup, image, label, label_dtype))
                if flip:
                    out.append(_encode(setup, image.flip(-1), label.flip(-1), label_dtype))
            _atomic_save({"format": FEATURES_FORMAT, "name": str(sample.name), "items": out}, file)
            items.extend(out)
            encoded += 1
    finally:
        setup.model.train(encoder_was_training)
    seconds = time.perf_counter() - start if encoded else 0.0
    cpu_seconds = time.process_time() - cpu if encoded else 0.0
    if not done.is_file():
        done.write_text(json.dumps({**identity, "n_items": len(items), "extract_seconds": seconds,
                                    "extract_cpu_seconds": cpu_seconds}, indent=1, default=str))
    return FeatureCache(path=path, identity=identity, items=items, extract_seconds=seconds,
                        extract_cpu_seconds=cpu_seconds)


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ====================================================================== training
def collate(items: Sequence[dict], device: torch.device | str = "cpu",
            multiple: int = 1) -> tuple[TokenState, Tensor]:
    """Cached windows -> one padded :class:`TokenState` (B, T, D) and labels (B, h, w).

    Shorter token sequences are padded at the end and marked ``keep=False`` (the mask
    decoder ignores them; ``source`` never points at them). T is the longest length,
    rounded up to ``multiple`` when the batch needs padding at all."""
    b = len(items)
    lengths = [it["x"].shape[0] for it in items]
    t_max = max(lengths)
    if min(lengths) < t_max:
        t_max = -(-t_max // multiple) * multiple
    d = items[0]["x"].shape[1]
    grids = {tuple(it["grid"]) for it in items}
    if len(grids) != 1:
        raise ValueError(f"cached windows have different grids {sorted(grids)}")
    x = torch.zeros(b, t_max, d)
    size = torch.zeros(b, t_max)
    keep = torch.zeros(b, t_max, dtype=torch.bool)
    for i, it in enumerate(items):
        t = it["x"].shape[0]
        x[i, :t] = it["x"].float()
        size[i, :t] = it["size"]
        keep[i, :t] = True if it["keep"] is None else it["keep"]
    source = torch.stack([it["source"].long() for it in items])
    labels = torch.stack([it["label"].long() for it in items])
    state = TokenState(x=x.to(device), size=size.to(device), source=source.to(device),
                       grid=grids.pop(), keep=None if bool(keep.all()) else keep.to(device),
                       aux=_unpack_aux([it["aux"] for it in items], torch.device(device)))
    return state, labels.to(device)


def decode(setup: Setup, decoder: nn.Module, state: TokenState, size: tuple[int, int]) -> Tensor:
    """Logits (B, n_cls, *size) from a final encoder state, exactly as ``Segmenter.run``."""
    keep = None if state.keep is None else state.keep[:, 1:]
    token_out = decoder(state.x[:, 1:], keep)
    per_patch = setup.model.method.restore(token_out, state)
    h, w = state.grid
    masks = per_patch.transpose(1, 2).reshape(per_patch.shape[0], -1, h, w)
    return F.interpolate(masks, size=size, mode="bilinear", align_corners=False)


def lr_at(step: int, total: int, peak: float, config: TrainConfig) -> float:
    """Learning rate for 0-based optimizer ``step`` of ``total``."""
    warm = int(config.warmup * total) if config.warmup < 1 else int(config.warmup)
    warm = min(warm, total - 1) if total > 1 else 0
    if step < warm:
        return peak * (step + 1) / (warm + 1)
    progress = (step - warm) / max(total - warm, 1)
    if config.schedule == "poly":
        return peak * (1 - progress) ** 0.9
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


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


def head_identity(setup: Setup, split: str, config: TrainConfig, features_key: str) -> dict:
    spec = decoder_spec(setup.model.decoder)
    return {"format": HEAD_FORMAT, "features": features_key, "decoder": spec,
            "train": {**asdict(config), "lr": config.resolved_lr(spec["name"]),
                      "precision": config.resolved_precision()},
            "ignore_index": setup.dataset.ignore_index}


def head_dir(setup: Setup, split: str = "train", config: TrainConfig = TrainConfig(), *,
             dataset=None, root: str | Path | None = None, limit: int | None = None,
             cache: str | Path | None = None) -> Path:
    """The folder of the head this config trains (checkpoints, ``head.pt``, eval results)."""
    data = _open_dataset(setup, split, dataset, root, limit)
    identity = feature_identity(setup, split, _sample_names(data), config.flip)
    return _head_dir(setup, split, config, _digest(identity), cache)


def _head_dir(setup: Setup, split: str, config: TrainConfig, features_key: str, cache) -> Path:
    ident = head_identity(setup, split, config, features_key)
    spec = ident["decoder"]["name"]
    name = f"{_label(setup, split)}-{spec}-e{config.epochs}-{_digest(ident)}"
    return _root(cache, "heads", name)


def trained_head_path(setup: Setup, split: str = "train", config: TrainConfig = TrainConfig(), **kwargs) -> Path | None:
    """``head.pt`` of this config if it was trained already, else None (nothing is run).

    kwargs: ``dataset``, ``root``, ``limit``, ``cache`` as for :func:`train_head`."""
    path = head_dir(setup, split, config, **kwargs) / "head.pt"
    return path if path.is_file() else None


def load_head(setup: Setup, path: str | Path) -> dict:
    """Load a ``head.pt`` into ``setup.model.decoder`` (strict); returns its metadata.

    Fails if the file holds another kind of decoder, width or class count."""
    path = Path(path)
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != HEAD_FORMAT:
        raise ValueError(f"{path} is not a trained head (format {HEAD_FORMAT})")
    meta = json.loads(blob["meta"])
    want = decoder_spec(setup.model.decoder)
    if meta["decoder"] != want:
        raise ValueError(f"{path} holds a {meta['decoder']} decoder; this model has {want}")
    setup.model.decoder.load_state_dict(blob["state_dict"], strict=True)
    return meta


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
    config = config if config is not None else TrainConfig()
    changes = dict(overrides)
    if epochs is not None:
        changes["epochs"] = epochs
    config = dataclasses.replace(config, **changes) if changes else config
    spec = decoder_spec(setup.model.decoder)
    lr = config.resolved_lr(spec["name"])
    precision = config.resolved_precision()
    # bf16 kernels are prepared per input shape: padded batches rounded up to 64 tokens
    # share a few shapes (measured: 15 % faster steps than exact lengths).
    pad_multiple = BF16_PAD_MULTIPLE if precision == "bf16" else 1

    data = _open_dataset(setup, split, dataset, root, limit)
    identity = feature_identity(setup, split, _sample_names(data), config.flip)
    folder = _head_dir(setup, split, config, _digest(identity), cache)
    head_file, ckpt_file = folder / "head.pt", folder / "last.pt"
    if restart:
        for f in (head_file, ckpt_file, *folder.glob("eval-*.json")):
            f.unlink(missing_ok=True)
    if head_file.is_file():
        if load:
            load_head(setup, head_file)
        return head_file

    feats = extract_features(setup, split, flip=config.flip, dataset=data, cache=cache, progress=progress)
    items = feats.items
    if not items:
        raise ValueError(f"no training windows in {setup.dataset.name} {split}")

    decoder = fresh_decoder(setup, config.seed)
    decoder.train()
    optimizer = torch.optim.AdamW(param_groups(decoder, config.weight_decay, config.scale_lr_mult), lr=lr)
    steps_per_epoch = math.ceil(len(items) / config.batch_size)
    total = steps_per_epoch * config.epochs
    history: list[dict] = []
    first = 0
    if ckpt_file.is_file():
        ckpt = torch.load(ckpt_file, map_location="cpu", weights_only=True)
        if ckpt.get("format") != CHECKPOINT_FORMAT or ckpt.get("key") != folder.name:
            raise ValueError(f"{ckpt_file} belongs to another training; rerun with restart")
        decoder.load_state_dict(ckpt["decoder"])
        optimizer.load_state_dict(ckpt["optimizer"])
        history = json.loads(ckpt["history"])
        first = int(ckpt["epoch"])

    ignore = setup.dataset.ignore_index
    for epoch in range(first, config.epochs):
        start, cpu = time.perf_counter(), time.process_time()
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(
            config.seed * 1_000_003 + epoch)).tolist()
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{config.epochs}", unit="step",
                   disable=not progress)
        loss_sum, pixels, padded, tokens = 0.0, 0, 0, 0
        for s in bar:
            step = epoch * steps_per_epoch + s
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, lr, config) * group["lr_mult"]
            batch = order[s * config.batch_size:(s + 1) * config.batch_size]
            state, labels = collate([items[j] for j in batch], multiple=pad_multiple)
            tokens += state.x.shape[0] * state.x.shape[1]
            padded += 0 if state.keep is None else int((~state.keep).sum())
            valid = int((labels != ignore).sum())
            if not valid:  # nothing labelled: the mean loss would be NaN
                continue
            with autocast_context(torch.device("cpu"), precision):
                logits = decode(setup, decoder, state, tuple(labels.shape[-2:]))
            loss = F.cross_entropy(logits.float(), labels, ignore_index=ignore)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * valid
            pixels += valid
            bar.set_postfix(loss=f"{loss.item():.3f}")
        history.append({"epoch": epoch + 1, "loss": loss_sum / max(pixels, 1),
                        "padding": padded / tokens,
                        "seconds": time.perf_counter() - start,
                        "cpu_seconds": time.process_time() - cpu})
        _atomic_save({"format": CHECKPOINT_FORMAT, "key": folder.name, "epoch": epoch + 1,
                      "decoder": decoder.state_dict(), "optimizer": optimizer.state_dict(),
                      "history": json.dumps(history)}, ckpt_file)
        if on_epoch is not None:
            on_epoch(epoch + 1, decoder)

    meta = {
        **head_identity(setup, split, config, _digest(identity)),
        "backbone": setup.backbone.name, "dataset": setup.dataset.name, "split": split,
        "window": list(setup.window), "method": setup.model.method.name,
        "settings": setup.model.method.settings(), "features_dir": str(feats.path),
        "n_windows": len(items), "steps": total, "history": history,
        "extract_seconds": feats.extract_seconds, "extract_cpu_seconds": feats.extract_cpu_seconds,
        "train_seconds": sum(h["seconds"] for h in history),
        "train_cpu_seconds": sum(h.get("cpu_seconds", 0.0) for h in history),
    }
    _atomic_save({"format": HEAD_FORMAT, "meta": json.dumps(meta, default=str),
                  "state_dict": decoder.state_dict()}, head_file)
    (folder / "train.json").write_text(json.dumps(meta, indent=1, default=str))
    if load:
        load_head(setup, head_file)
    return head_file


def evaluate_head(setup: Setup, split: str = "val", *, root: str | Path | None = None,
                  limit: int | None = None, folder: Path | None = None, progress: bool = True) -> dict:
    """mIoU of ``setup.model`` (with its current decoder) on a split via
    :func:`algm.evaluate.evaluate`; cached as ``eval-<split>[-n<limit>].json`` in
    ``folder`` (a head's folder) if given."""
    from algm.data.datasets import build_dataset
    from algm.evaluate import evaluate

    out = None
    if folder is not None:
        out = Path(folder) / (f"eval-{split}" + (f"-n{limit}" if limit else "") + ".json")
        if out.is_file():
            return json.loads(out.read_text())
    data = build_dataset(setup.dataset.name, split, root=root, limit=limit)
    start = time.perf_counter()
    result = evaluate(setup.model, data, setup.window, progress=progress)
    row = {**result.to_dict(data.classes), "split": split, "seconds": time.perf_counter() - start}
    if out is not None:
        out.write_text(json.dumps(row, indent=1))
    return row


__all__ = [
    "DEFAULT_EPOCHS", "FeatureCache", "TrainConfig", "collate", "decode", "decoder_spec",
    "evaluate_head", "extract_features", "feature_identity", "fresh_decoder", "head_dir",
    "load_head", "lr_at", "train_head", "trained_head_path", "weights_fingerprint",
]
