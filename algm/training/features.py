"""The frozen-encoder feature cache: final token states of every training window, and
the tokens after chosen blocks for a method's own training.

The encoder (and the token-reduction method inside it) is frozen while a decoder head
trains, so its output for a training window never changes: :func:`extract_features`
runs it once per window (batch 1, i.e. per-image merging even for methods whose batched
merging couples the images of a batch) and stores the *final* token state on disk:
``x`` (T, D) fp16 with cls, ``size`` (T,), ``source`` (N,), ``keep`` (T,) or None, the
patch ``grid``, the method's ``aux`` payload and the window's ``label`` (h, w). For a
reducing method these are the *reduced* tokens, so the decoder trains on exactly what
it sees at test time ("trained with the method").

Windows are :func:`algm.data.windows.tiles`: the image at the test scale, padded to the
window, tiled with stride = window (CamVid: 480x360 -> 448x336 = exactly one window).

Fine-tuning with a frozen prefix (:mod:`algm.training.finetune`) caches instead the
state after the first ``blocks`` blocks (no final norm) of ``views`` random training
views per frame (:func:`algm.data.windows.random_view`, drawn from a generator seeded
by the frame's index and ``seed``). Frozen blocks without dropout are deterministic and
a method's merging decisions up to there are fixed per view, so the cached state is
what the frozen part computes (``x`` stored in fp16, as for the final states).

A method's own training reaches the frozen encoder's intermediate tokens through
:meth:`~algm.reduction.TrainingContext.layer_features` (:func:`frozen_layer_features`):
:func:`extract_layer_features` runs the encoder with nothing reduced once per frame
(``batch_frames`` frames per forward) and caches the patch tokens after the blocks
asked for, (L, N, D) fp16 per window, with the window's label, keyed by
:func:`layer_identity` (encoder config and weights, dataset, split, frames, window,
blocks, batch) and checked on read like the final states. What the method makes of
them (per-patch targets, the heads it fits) stays in the method.

The cache entry is keyed by :func:`feature_identity`: backbone config, a fingerprint of
the encoder and method weights, dataset, split, the frames used, window, the method's
``identity()`` (name, settings, trained parts), the flip copy and the storage format.
Another method setting (ALGM's tau, a merge count, ...) therefore never reuses stale
features. One file per frame, so an
interrupted extraction continues where it stopped.

``aux`` (e.g. early-exit predictions, needed by the method's ``restore``) is a
tensor or a dataclass of batch-first tensors. In memory an item holds it as is (CPU
tensors, batch 1) and :func:`collate` concatenates it into ``type(aux)``. On disk (read
with ``weights_only``) it is plain tensors plus the class's ``module:qualname``, which
is resolved among the classes beside the method's own class (its module or a base's):
nothing is imported by name, and a payload class the method does not own is refused.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from tqdm import tqdm

from algm import atomic
from algm.build import Setup
from algm.cache import move_aside
from algm.config import DatasetSpec, ViTConfig, check_window
from algm.files import read_text
from algm.safe_yaml import clip
from algm.data.windows import random_view, tiles
from algm.reduction import NoReduction, TokenReduction, TokenState, TrainingContext
from algm.training.keys import cache_folder, cache_label, digest, weights_fingerprint

FEATURES_FORMAT = "algm-bench/head-features/v1"
LAYERS_FORMAT = "algm-bench/layer-features/v1"


@dataclass
class FeatureCache:
    """Cached encoder outputs of one split: ``items`` (one dict per window) in memory."""

    path: Path
    items: list[dict]
    extract_seconds: float  # wall time of this call's encoding, 0 when all came from disk
    extract_cpu_seconds: float = 0.0  # process CPU time of the same
    index: dict = dataclasses.field(default_factory=dict)  # index.json: identity, n_items, first extraction's times


def open_split(setup: Setup, split: str, dataset=None, root: str | Path | None = None,
               limit: int | None = None):
    """``dataset`` (its first ``limit`` samples), else ``build_dataset(setup.dataset.name,
    split, root, limit)``; either way with ``n_cls`` and ``ignore_index``."""
    if dataset is not None:
        if limit is not None:
            from torch.utils.data import Subset

            sub = Subset(dataset, range(min(limit, len(dataset))))
            sub.n_cls, sub.ignore_index = dataset.n_cls, dataset.ignore_index
            return sub
        return dataset
    from algm.data.datasets import build_dataset

    return build_dataset(setup.dataset.name, split, root=root, limit=limit)


def frame_names(dataset) -> list[str]:
    """Names of the frames of ``dataset`` (from its file list where it has one)."""
    files = getattr(dataset, "files", None)
    if files is not None:
        return [str(f[2]) for f in files]
    return [str(dataset[i].name) for i in range(len(dataset))]


def feature_identity(setup: Setup, split: str, names: Sequence[str], flip: bool,
                     blocks: int | None = None, views: int = 0, seed: int = 0) -> dict:
    """Everything the cached encoder outputs depend on (hashed into the feature key;
    ``blocks`` / ``views`` only when set, so final-state keys stay as they were)."""
    method = setup.model.method
    prefix = {} if blocks is None else {"blocks": blocks, "views": views, "seed": seed}
    return {**prefix,
        "format": FEATURES_FORMAT,
        "backbone": asdict(setup.backbone),
        "weights": weights_fingerprint(setup.model.encoder, method),
        "dataset": setup.dataset.name,
        "split": split,
        "frames": digest(list(names)),
        "n_frames": len(names),
        "window": list(setup.window),
        "method": method.identity(),
        "flip": bool(flip),
    }


# ------------------------------------------------------------------ aux payload
def _cpu_aux(aux: Any) -> Any:
    """``state.aux`` of one window with its tensors on the CPU; refuses what cannot be cached."""
    if aux is None:
        return None
    if isinstance(aux, Tensor):
        return aux.detach().cpu()
    if dataclasses.is_dataclass(aux) and not isinstance(aux, type):
        fields = {f.name: getattr(aux, f.name) for f in dataclasses.fields(aux)}
        if all(isinstance(v, Tensor) for v in fields.values()):
            return type(aux)(**{k: v.detach().cpu() for k, v in fields.items()})
    raise ValueError(
        f"cannot cache the method's state.aux of type {type(aux).__name__}: train_head caches a "
        f"tensor or a dataclass of batch-first tensors; train this method's head off-the-shelf "
        f"(with method 'none') instead")


def _aux_record(aux: Any) -> dict | None:
    """An in-memory aux as plain tensors for ``torch.save`` (loadable with weights_only)."""
    if aux is None:
        return None
    if isinstance(aux, Tensor):
        return {"type": "tensor", "fields": {"value": aux}}
    cls = type(aux)
    return {"type": f"{cls.__module__}:{cls.__qualname__}",
            "fields": {f.name: getattr(aux, f.name) for f in dataclasses.fields(aux)}}


def _aux_class(method: TokenReduction, name: str) -> type:
    """The dataclass called ``name`` (``module:qualname``) in the module of the method's
    class or of one of its bases."""
    module_name, qualname = name.split(":")
    for klass in type(method).__mro__:
        module = inspect.getmodule(klass)
        if module is None or module.__name__ != module_name:
            continue
        obj: Any = module
        for part in qualname.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, type) and dataclasses.is_dataclass(obj):
            return obj
    raise ValueError(f"cached aux payload {name} is not a dataclass beside method "
                     f"{type(method).__qualname__}; delete the feature cache")


def _aux_from_record(record: dict | None, method: TokenReduction) -> Any:
    if record is None:
        return None
    if record["type"] == "tensor":
        return record["fields"]["value"]
    return _aux_class(method, record["type"])(**record["fields"])


def _batch_aux(auxes: list[Any], device: torch.device) -> Any:
    """The aux payloads of several windows concatenated on dim 0 (same type for all)."""
    if all(a is None for a in auxes):
        return None
    if len({type(a) for a in auxes}) != 1:
        raise ValueError("cached windows disagree on the method's aux payload")
    if isinstance(auxes[0], Tensor):
        return torch.cat(auxes).to(device)
    names = [f.name for f in dataclasses.fields(auxes[0])]
    return type(auxes[0])(**{k: torch.cat([getattr(a, k) for a in auxes]).to(device) for k in names})


# ------------------------------------------------------------------ extraction
def _label_dtype(n_cls: int, ignore_index: int) -> torch.dtype:
    return torch.uint8 if max(n_cls - 1, ignore_index) <= 255 and ignore_index >= 0 else torch.long


@torch.no_grad()
def _encode(setup: Setup, image: Tensor, label: Tensor, label_dtype: torch.dtype,
            blocks: int | None = None) -> dict:
    """One window (1, 3, h, w) with its label (1, h, w) -> a cache item (see module doc):
    the final state, or the state after the first ``blocks`` blocks."""
    encoder, method = setup.model.encoder, setup.model.method
    device = encoder.cls_token.device  # the model's device (fine-tuning extracts on the GPU)
    image, label = image.to(device), label.to(device)
    if blocks is None:
        state, _ = encoder(image, method, label)
    else:
        state, _ = encoder.run_blocks(encoder.start(image, method, label), method, range(blocks))
    n = state.grid[0] * state.grid[1]
    return {
        "x": state.x[0].to(torch.float16).cpu(),
        "size": state.size[0].float().cpu(),
        "source": state.source[0].to(torch.int32 if n < 2 ** 31 else torch.long).cpu(),
        "keep": None if state.keep is None else state.keep[0].cpu(),
        "grid": list(state.grid),
        "aux": _cpu_aux(state.aux),
        "label": label[0].to(label_dtype).cpu(),
    }


def _encode_frame(setup: Setup, sample, index: int, ignore_index: int, label_dtype: torch.dtype,
                  flip: bool, blocks: int | None, views: int, seed: int) -> list[dict]:
    """Cache items of one frame: every training window (and its flipped copy), or with
    ``views`` that many random views."""
    mean, std = setup.backbone.mean, setup.backbone.std
    if views:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        windows = [random_view(sample.image, sample.label, setup.window, mean, std, generator, ignore_index)
                   for _ in range(views)]
    else:
        windows = []
        for image, label in tiles(sample.image, setup.window, mean, std, sample.label, ignore_index):
            windows += [(image, label), (image.flip(-1), label.flip(-1))] if flip else [(image, label)]
    return [_encode(setup, image, label, label_dtype, blocks) for image, label in windows]


def _read_frame(file: Path, method: TokenReduction, dim: int, window: tuple[int, int]) -> list[dict] | None:
    """The items of a frame file, or None if it is missing; a damaged one (truncated by a
    full disk, or of another shape) is moved aside (:func:`~algm.cache.move_aside`) and
    None returned, so the frame is encoded again."""
    if not file.is_file():
        return None
    try:
        items = torch.load(file, map_location="cpu", weights_only=True)["items"]
        check_items(items, dim, window)
        return [{**it, "aux": _aux_from_record(it["aux"], method)} for it in items]
    except Exception as err:  # torch.load fails on junk with any type of error
        move_aside(file, clip(f"{type(err).__name__}: {err}"))
        return None


def check_items(items: object, dim: int, window: tuple[int, int]) -> None:
    """A ValueError naming the first cached item that is not what :func:`_encode` writes
    for a ``dim``-wide encoder and this ``window``: x (T, dim), size and keep (T,),
    source (gh * gw,) indexing the T tokens, label (h, w)."""
    if not isinstance(items, list) or not items:
        raise ValueError("no items")
    for it in items:
        x, size, source, keep, grid, label = (it[k] for k in ("x", "size", "source", "keep", "grid", "label"))
        if x.dim() != 2 or x.shape[1] != dim or not bool(torch.isfinite(x).all()):
            raise ValueError(f"x of shape {tuple(x.shape)} (expected (T, {dim}), finite)")
        t = x.shape[0]
        if tuple(size.shape) != (t,) or (keep is not None and tuple(keep.shape) != (t,)):
            raise ValueError(f"size / keep do not have the {t} tokens of x")
        if len(grid) != 2 or tuple(source.shape) != (grid[0] * grid[1],) or tuple(label.shape) != tuple(window):
            raise ValueError(f"source {tuple(source.shape)} / label {tuple(label.shape)} do not fit the "
                             f"grid {grid} and window {tuple(window)}")
        if source.numel() and (int(source.min()) < 0 or int(source.max()) >= t):
            raise ValueError(f"source indexes tokens outside the {t} of x")


def _index(path: Path, identity: dict, n_items: int, seconds: float, cpu_seconds: float) -> dict:
    """``index.json`` of a complete cache: read back if it describes this cache (its
    identity and item count), else (missing, or damaged: moved aside) written with this
    call's extraction times."""
    done = path / "index.json"
    if done.exists():
        try:
            index = json.loads(read_text(done, "feature index"))
            if not isinstance(index, dict) or any(index.get(k) != v for k, v in identity.items()):
                raise ValueError("another cache's identity")
            if index.get("n_items") != n_items or not all(
                    isinstance(index.get(k), (int, float)) and math.isfinite(index[k]) and index[k] >= 0
                    for k in ("extract_seconds", "extract_cpu_seconds")):
                raise ValueError("item count or times missing or wrong")
            return index
        except ValueError as err:  # JSONDecodeError is a ValueError
            move_aside(done, clip(err))
    index = {**identity, "n_items": n_items, "extract_seconds": seconds, "extract_cpu_seconds": cpu_seconds}
    atomic.write_json(done, index)
    return index


def extract_features(setup: Setup, split: str = "train", *, flip: bool = False, dataset=None,
                     root: str | Path | None = None, limit: int | None = None,
                     cache: str | Path | None = None, progress: bool = True,
                     blocks: int | None = None, views: int = 0, seed: int = 0) -> FeatureCache:
    """Run the frozen encoder (with ``setup.model.method``) once per training window and
    cache the final token states; later calls read them from disk. With ``blocks`` the
    states after that many blocks of ``views`` random views per frame (module doc).

    ``dataset``: samples (``.image`` uint8 (3,H,W), ``.label`` (H,W), ``.name``) with
    ``n_cls``/``ignore_index``, instead of ``build_dataset(setup.dataset.name, split,
    root, limit)``. ``cache``: root folder instead of ``cache_dir()`` (tests).
    """
    data = open_split(setup, split, dataset, root, limit)
    if blocks is not None and views < 1:
        raise ValueError(f"a frozen-prefix cache needs views >= 1, got {views}")
    identity = feature_identity(setup, split, frame_names(data), flip, blocks, views, seed)
    kind = "features" if blocks is None else "prefix"
    path = cache_folder(cache, kind, f"{cache_label(setup, split)}-{digest(identity)}")
    label_dtype = _label_dtype(data.n_cls, data.ignore_index)
    method = setup.model.method
    was_training = setup.model.training
    setup.model.eval()
    start, cpu = time.perf_counter(), time.process_time()
    encoded = 0
    items: list[dict] = []
    try:
        for i in tqdm(range(len(data)), desc=f"{kind} {split}", unit="img", disable=not progress):
            file = path / f"{i:06d}.pt"
            frame = _read_frame(file, method, setup.backbone.embed_dim, setup.window)
            if frame is None:
                sample = data[i]
                frame = _encode_frame(setup, sample, i, data.ignore_index, label_dtype, flip,
                                      blocks, views, seed)
                atomic.save_torch({"format": FEATURES_FORMAT, "name": str(sample.name),
                                   "items": [{**it, "aux": _aux_record(it["aux"])} for it in frame]}, file)
                encoded += 1
            items.extend(frame)
    finally:
        setup.model.train(was_training)
    seconds = time.perf_counter() - start if encoded else 0.0
    cpu_seconds = time.process_time() - cpu if encoded else 0.0
    index = _index(path, json.loads(json.dumps(identity, default=str)), len(items), seconds, cpu_seconds)
    return FeatureCache(path=path, items=items, extract_seconds=seconds, extract_cpu_seconds=cpu_seconds,
                        index=index)


# ------------------------------------------------------------------ frozen layers
@torch.no_grad()
def layer_tokens(encoder: nn.Module, images: Tensor, layers: Sequence[int]) -> Tensor:
    """(B, len(layers), N, D) patch tokens after the 1-based blocks ``layers``.

    images: (B, 3, H, W) normalised. The encoder's own path with nothing reduced
    (``start``, then ``run_blocks`` one block at a time, only up to the last block asked
    for): the tokens a method's ``after_block`` sees while it has reduced nothing.
    """
    method = NoReduction()
    state = encoder.start(images, method)
    wanted, out = set(layers), []
    for block in range(max(layers)):
        state, _ = encoder.run_blocks(state, method, range(block, block + 1))
        if block + 1 in wanted:
            out.append(state.patches)
    return torch.stack(out, 1)


@dataclass
class LayerFeatures:
    """Frozen-encoder patch tokens at chosen blocks for every training window of a split,
    one row per window (frames in order, each frame's :func:`~algm.data.windows.tiles`
    in order)."""

    path: Path  # the cache folder (keyed by :func:`layer_identity`)
    features: Tensor  # (W, L, N, D) float16
    labels: Tensor  # (W, h, w) pixel labels of the windows (uint8 where they fit, else long)
    grid: tuple[int, int]  # (h / patch, w / patch): N = grid[0] * grid[1]
    n_frames: int
    extract_seconds: float  # wall time of this call's encoding, 0 when all came from disk


def layer_identity(encoder: nn.Module, dataset: str, split: str, names: Sequence[str],
                   window: tuple[int, int], layers: Sequence[int], batch_frames: int) -> dict:
    """Everything the cached layer tokens depend on (hashed into their cache key). The
    batch is part of it: a kernel may round differently for another batch size."""
    return {"format": LAYERS_FORMAT, "backbone": asdict(encoder.cfg), "weights": weights_fingerprint(encoder),
            "dataset": dataset, "split": split, "frames": digest(list(names)), "n_frames": len(names),
            "window": list(window), "layers": list(layers), "batch_frames": batch_frames}


def check_layer_items(items: object, shape: tuple[int, int, int], window: tuple[int, int]) -> None:
    """A ValueError naming the first cached window that is not what
    :func:`extract_layer_features` writes: x (L, N, D) finite, label (h, w)."""
    if not isinstance(items, list) or not items:
        raise ValueError("no items")
    for it in items:
        x, label = it["x"], it["label"]
        if tuple(x.shape) != shape:
            raise ValueError(f"x of shape {tuple(x.shape)} (expected {shape})")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x holds non-finite values")
        if tuple(label.shape) != tuple(window):
            raise ValueError(f"label {tuple(label.shape)} does not fit the window {tuple(window)}")


def _read_layer_frame(file: Path, shape: tuple[int, int, int], window: tuple[int, int]) -> list[dict] | None:
    """The windows of a frame file, or None if it is missing; a damaged one is moved aside
    (as :func:`_read_frame` does) and None returned, so its frames are encoded again."""
    if not file.is_file():
        return None
    try:
        items = torch.load(file, map_location="cpu", weights_only=True)["items"]
        check_layer_items(items, shape, window)
        return items
    except Exception as err:  # torch.load fails on junk with any type of error
        move_aside(file, clip(f"{type(err).__name__}: {err}"))
        return None


def extract_layer_features(encoder: nn.Module, data, layers: Sequence[int], window: tuple[int, int], *,
                           dataset: str, split: str, cache: str | Path | None = None,
                           batch_frames: int = 4, progress: bool = True) -> LayerFeatures:
    """Patch tokens of the frozen ``encoder`` after the 1-based ``layers`` for every
    training window of ``data`` (``dataset``'s ``split``), cached: one file per frame,
    reused while :func:`layer_identity` holds, checked on read.

    data: samples (``.image`` uint8 (3, H, W), ``.label`` (H, W), ``.name``) with
    ``ignore_index``. The windows of ``batch_frames`` consecutive frames go through the
    encoder in one forward (a group with any frame missing is encoded again whole, so
    every frame's numbers come from the same batch as in an uninterrupted run).
    ``cache``: root folder instead of ``cache_dir()`` (tests).
    """
    cfg = encoder.cfg
    layers = sorted(set(layers))
    grid = check_window(tuple(window), cfg.patch_size)
    shape = (len(layers), grid[0] * grid[1], cfg.embed_dim)
    identity = layer_identity(encoder, dataset, split, frame_names(data), window, layers, batch_frames)
    tag = f"{cfg.name}-{dataset}-{split}-L{'-'.join(map(str, layers))}-{digest(identity)}"
    path = cache_folder(cache, "layers", tag)
    label_dtype = _label_dtype(data.n_cls, data.ignore_index)
    device = next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    start, cpu = time.perf_counter(), time.process_time()
    encoded = False
    frames: list[list[dict]] = []
    try:
        with tqdm(total=len(data), desc=f"layer features {split}", unit="img", disable=not progress) as bar:
            for first in range(0, len(data), batch_frames):
                group = range(first, min(len(data), first + batch_frames))
                read = [_read_layer_frame(path / f"{i:06d}.pt", shape, window) for i in group]
                if any(items is None for items in read):
                    read = _encode_layer_group(encoder, data, group, layers, window, label_dtype, device,
                                               path, read)
                    encoded = True
                frames += read
                bar.update(len(group))
    finally:
        encoder.train(was_training)
    seconds = time.perf_counter() - start if encoded else 0.0
    cpu_seconds = time.process_time() - cpu if encoded else 0.0
    items = [it for frame in frames for it in frame]
    _index(path, json.loads(json.dumps(identity, default=str)), len(items), seconds, cpu_seconds)
    return LayerFeatures(path=path, features=torch.stack([it["x"] for it in items]),
                         labels=torch.stack([it["label"] for it in items]), grid=grid,
                         n_frames=len(data), extract_seconds=seconds)


def _encode_layer_group(encoder: nn.Module, data, group: range, layers: Sequence[int], window: tuple[int, int],
                        label_dtype: torch.dtype, device: torch.device, path: Path,
                        read: list[list[dict] | None]) -> list[list[dict]]:
    """The windows of frames ``group`` in one forward; the files of those not ``read``
    from disk are written."""
    cfg = encoder.cfg
    images, labels, counts, samples = [], [], [], []
    for i in group:
        sample = data[i]
        pairs = list(tiles(sample.image, window, cfg.mean, cfg.std, sample.label, data.ignore_index))
        images += [x for x, _ in pairs]
        labels += [y[0].to(label_dtype) for _, y in pairs]
        counts.append(len(pairs))
        samples.append(sample)
    x = layer_tokens(encoder, torch.cat(images).to(device), layers).to(torch.float16).cpu()
    out, at = [], 0
    for i, sample, count, cached in zip(group, samples, counts, read):
        items = [{"x": x[j].clone(), "label": labels[j]} for j in range(at, at + count)]  # own storage: saved alone
        at += count
        if cached is None:
            atomic.save_torch({"format": LAYERS_FORMAT, "name": str(sample.name), "items": items},
                              path / f"{i:06d}.pt")
        out.append(items if cached is None else cached)
    return out


def frozen_layer_features(context: TrainingContext, backbone: ViTConfig, dataset: DatasetSpec,
                          layers: Sequence[int], split: str = "train", limit: int | None = None) -> LayerFeatures:
    """:meth:`~algm.reduction.TrainingContext.layer_features`: the frozen encoder of
    ``backbone`` (``context.frozen_encoder``) at ``context.window`` (None: the dataset's)
    over ``dataset``'s ``split`` (its first ``limit`` frames, from ``context.data_root``),
    through :func:`extract_layer_features`. The data is opened first: a missing root
    fails before any weights are converted."""
    from algm.data.datasets import build_dataset

    window = tuple(context.window) if context.window is not None else dataset.window(backbone.patch_size)
    data = build_dataset(dataset.name, split, root=context.data_root, limit=limit)
    encoder = context.frozen_encoder(backbone.name, window)
    return extract_layer_features(encoder, data, layers, window, dataset=dataset.name, split=split,
                                  progress=context.progress)


def training_context(data_root: str | None = None, window: tuple[int, int] | None = None,
                     progress: bool = True) -> TrainingContext:
    """The :class:`~algm.reduction.TrainingContext` the framework hands a method's
    training: its frozen encoder and this module's cache of that encoder's tokens."""
    from algm.build import frozen_encoder

    return TrainingContext(data_root=data_root, window=window, progress=progress,
                           frozen_encoder=frozen_encoder, layer_cache=frozen_layer_features)


# ------------------------------------------------------------------ batching
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
    device = torch.device(device)
    state = TokenState(x=x.to(device), size=size.to(device), source=source.to(device),
                       grid=grids.pop(), keep=None if bool(keep.all()) else keep.to(device),
                       aux=_batch_aux([it["aux"] for it in items], device))
    return state, labels.to(device)
