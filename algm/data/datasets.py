"""Segmentation datasets on disk (SPEC section 6), one loader per layout.

``build_dataset(name, split)`` returns a :class:`SegDataset` whose items are
:class:`Sample` tuples: ``image`` (3, H, W) uint8 RGB, ``label`` (H, W) int64 with class
indices ``0..n_cls-1`` and ``ignore_index`` for pixels no metric counts, ``name`` the
frame id. Labels are remapped on load (ADE20K and Pascal Context 59 reduce the zero
label, mmsegmentation's convention), so every consumer sees the same convention.

Where the data lives: the ``root`` argument, else ``$DATA_ROOT``, else
``<data home>/<dataset>`` (:func:`default_root`), the data home being ``$ALGM_BENCH_DATA``,
else ``data/`` in the cache folder (``$ALGM_BENCH_CACHE``, ``~/.cache/algm-bench``): where
``algm-bench fetch --data`` puts it. For the fixed layouts the root is the
folder that *contains* the layout's top folder (e.g. the one holding
``ADEChallengeData2016``); for CamVid and Cityscapes it is the dataset folder itself.
A missing or malformed root fails at construction with the expected tree; a label value
that is neither a class nor ignore, or a file that does not decode (truncated, damaged),
fails when that sample is loaded, naming the file. :func:`check_files` finds unreadable
files up front, cheaply, before a run's expensive passes.

Class names and palettes (:mod:`algm.data.classes`) are those of mmsegmentation 1.2.2's
dataset classes (CamVid, which mmseg lacks: the SegNet tutorial's 11-class palette).
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from algm.cache import cache_dir
from algm.config import get_dataset
from algm.files import read_text, regular_file
from algm.data.classes import (
    CAMVID_CLASSES, CAMVID_PALETTE, ADE20K_CLASSES, ADE20K_PALETTE, CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, PASCAL_CONTEXT_CLASSES, PASCAL_CONTEXT_PALETTE, COCO_STUFF_CLASSES, COCO_STUFF_PALETTE,
)

DATA_ENV = "ALGM_BENCH_DATA"

Files = list[tuple[Path, Path, str]]  # (image path, label path, frame name)
LABEL_CHANNELS = "a label must be a single-channel image of class indices"
ADE20K_FOLDERS = {"train": "training", "val": "validation"}  # split -> folder
MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # per image: Pillow's warning threshold, about 89 megapixels


class Sample(NamedTuple):
    """image: (3, H, W) uint8 RGB; label: (H, W) int64 (ignore = the dataset's
    ``ignore_index``); name: frame id. A NamedTuple, so ``default_collate`` batches it."""

    image: Tensor
    label: Tensor
    name: str


class SegDataset(Dataset):
    """Image/label pairs of one split, labels remapped through ``lut`` on load.

    ``lut[raw] = class index | ignore_index | -1`` for every raw label value 0..255;
    -1 marks a value the dataset does not define (an error when it occurs).
    """

    def __init__(self, name: str, split: str, root: Path, files: Files, classes: Sequence[str],
                 palette: Sequence[tuple[int, int, int]], ignore_index: int, lut: np.ndarray):
        self.name = name
        self.split = split
        self.root = root
        self.files = files
        self.classes = tuple(classes)
        self.palette = tuple(palette)
        self.ignore_index = ignore_index
        self.lut = lut

    @property
    def n_cls(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Sample:
        image_path, label_path, name = self.files[index]
        _, pixels = _decode(image_path, "RGB")
        image = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
        label = self.read_label(label_path)
        if tuple(label.shape) != tuple(image.shape[1:]):
            raise _size_mismatch(label_path, tuple(label.shape), image_path, tuple(image.shape[1:]))
        return Sample(image, label, name)

    def read_label(self, path: Path) -> Tensor:
        """The (H, W) int64 label of one file, remapped; fails naming the file on bad values."""
        mode, raw = _decode(path)
        if raw.ndim != 2:
            raise ValueError(f"{path}: {LABEL_CHANNELS}, got mode {mode} with shape {raw.shape}")
        raw = raw.astype(np.int64)
        inside = (raw >= 0) & (raw < len(self.lut))
        mapped = np.full(raw.shape, -1, dtype=np.int64)
        mapped[inside] = self.lut[raw[inside]]
        bad = mapped < 0
        if bad.any():
            values = np.unique(raw[bad])
            shown = ", ".join(str(v) for v in values[:10]) + (", ..." if len(values) > 10 else "")
            raise ValueError(f"{path}: label values {shown} are not defined for {self.name} "
                             f"(expected {_ranges(np.flatnonzero(self.lut >= 0))})")
        return torch.from_numpy(mapped)


def check_files(dataset: SegDataset) -> None:
    """Open every image and label of ``dataset`` once, cheaply; a ValueError names the first
    file that is unreadable, truncated or damaged, a label that is not single-channel, or
    a label whose size differs from its image's.

    ``Image.verify()`` checks a PNG's chunks and checksums without decompressing, but
    reads none of a JPEG's compressed data, so JPEGs are decoded, at 1/8 scale (libjpeg
    still reads the whole stream: a truncated one fails as in a full decode). Label
    values are checked when a sample loads. Measured on CamVid val (101 frames of
    480x360, JPEG images, PNG labels): 0.25 s, against 2.9 s to load every sample.
    """
    for image_path, label_path, _ in dataset.files:
        _, image_hw = check_image_file(image_path)
        mode, label_hw = check_image_file(label_path)
        if Image.getmodebands(mode) != 1:
            raise ValueError(f"{label_path}: {LABEL_CHANNELS}, got mode {mode}")
        if label_hw != image_hw:
            raise _size_mismatch(label_path, label_hw, image_path, image_hw)


def check_image_file(path: str | Path) -> tuple[str, tuple[int, int]]:
    """(mode, (H, W)) of one image file, after checking that its data is complete, as
    :func:`check_files` does; errors as :func:`open_image`."""
    with open_image(path) as im:
        try:
            mode, hw = im.mode, (im.height, im.width)
            if im.format in ("JPEG", "MPO"):
                im.draft(im.mode, (max(1, im.width // 8), max(1, im.height // 8)))
                im.load()
            else:
                im.verify()
        except (OSError, SyntaxError) as err:  # PIL reports some broken files as SyntaxError
            raise _unreadable(path, err) from None
    return mode, hw


def open_image(path: str | Path) -> Image.Image:
    """``Image.open`` of an image file, refused before any pixel is decoded (one line
    naming the file) if it is missing or not a regular file (a FIFO would block),
    unreadable, or larger than :data:`MAX_PIXELS` (Pillow's decompression-bomb limit,
    whose own error is a traceback)."""
    regular_file(path, "image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        pixels = re.search(r"\((\d+) pixels\)", str(err))
        size = f"{int(pixels[1]) / 1e6:.0f} megapixels, " if pixels else ""
        raise ValueError(f"{path}: image too large ({size}over the limit of {MAX_PIXELS / 1e6:.0f} "
                         f"megapixels); refusing to decode it") from None
    except (OSError, SyntaxError) as err:
        raise _unreadable(path, err) from None


def _decode(path: Path, mode: str | None = None) -> tuple[str, np.ndarray]:
    """(the file's mode, its pixels as an array, converted to ``mode`` if given)."""
    with open_image(path) as im:
        try:
            return im.mode, np.array(im.convert(mode) if mode else im)
        except (OSError, SyntaxError) as err:
            raise _unreadable(path, err) from None


def _unreadable(path: Path, err: BaseException) -> ValueError:
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return ValueError(f"{path}: cannot read this image (truncated or damaged?): {reason}")


def _size_mismatch(label_path: Path, label_hw: tuple, image_path: Path, image_hw: tuple) -> ValueError:
    return ValueError(f"{label_path}: label is {label_hw} (H, W) but its image {image_path} is {image_hw}")


def build_dataset(name: str, split: str, root: str | Path | None = None, limit: int | None = None,
                  **options) -> SegDataset:
    """The ``split`` of dataset ``name``; with ``limit``, its first ``limit`` frames (split-list
    order for CamVid and Pascal Context, sorted file names otherwise).

    Options: ``pascal`` takes ``n_cls=60`` (background is class 0) or ``n_cls=59``
    (mmseg's PascalContext59: background ignored, classes shifted by -1).
    Raises ValueError for an unknown name/split/option, FileNotFoundError (with the
    expected layout) for a missing or malformed root.
    """
    spec = get_dataset(name)
    loader = _LOADERS[name]
    if split not in loader.splits:
        raise ValueError(f"{name} has no split {split!r}; choose one of: {', '.join(loader.splits)}")
    unknown = set(options) - set(loader.options)
    if unknown:
        allowed = ", ".join(loader.options) or "none"
        raise ValueError(f"unknown option(s) {', '.join(sorted(unknown))} for {name}; allowed: {allowed}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of frames, got {limit}")
    base = resolve_root(name, root)
    try:
        if not base.is_dir():
            raise _Missing(f"the root {base} does not exist or is not a folder")
        files, classes, palette, reduce_zero_label = loader.index(base, split, **options)
        if not files:
            raise _Missing(f"no {split} images found")
        files = files[:limit]
        _check_exist(files)
    except _Missing as missing:
        hint = ""
        if loader.top and base.name == loader.top:
            hint = f" (the root is the folder that contains {loader.top}: try {base.parent})"
        raise FileNotFoundError(f"{name} {split}: {missing}{hint}\nexpected layout under {base}: "
                                f"{one_line(loader.layout)}") from None
    lut = _lut(len(classes), spec.ignore_index, reduce_zero_label)
    return SegDataset(name, split, base, files, classes, palette, spec.ignore_index, lut)


def resolve_root(name: str, root: str | Path | None = None) -> Path:
    """``root`` if given, else ``$DATA_ROOT``, else :func:`default_root`."""
    root = root if root is not None else os.environ.get("DATA_ROOT") or None
    return Path(root).expanduser() if root is not None else default_root(name)


def data_home() -> Path:
    """The folder holding one root per dataset: ``$ALGM_BENCH_DATA``, else ``<cache>/data``
    (not created: only ``fetch --data`` writes there)."""
    home = os.environ.get(DATA_ENV) or None
    return Path(home).expanduser() if home is not None else cache_dir() / "data"


def default_root(name: str) -> Path:
    """Dataset ``name``'s root when none is given: ``<data home>/<name>``."""
    get_dataset(name)  # an unknown name fails here, listing the known ones
    return data_home() / name


def __getattr__(attr: str):
    """``DEFAULT_CAMVID_ROOT``: the CamVid default root, resolved when read (the
    environment may change after import)."""
    if attr == "DEFAULT_CAMVID_ROOT":
        return default_root("camvid")
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def one_line(layout: str) -> str:
    """A layout tree on one line: its entries joined with '; ', spacing collapsed."""
    return "; ".join(" ".join(line.split()) for line in layout.splitlines() if line.strip())


class _Missing(Exception):
    """A layout problem; build_dataset adds the expected tree to the message."""


class _Loader(NamedTuple):
    # index(root, split, **options) -> (files, classes, palette, reduce_zero_label)
    index: Callable[..., tuple[Files, Sequence[str], Sequence[tuple[int, int, int]], bool]]
    layout: str
    splits: tuple[str, ...]
    top: str | None = None  # the layout's top folder, when the root must contain it
    options: tuple[str, ...] = ()


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise _Missing(f"missing {what}: {path}")
    return path


def _check_exist(files: Files) -> None:
    """Every image and label of ``files`` exists (one directory listing per folder)."""
    listings: dict[Path, set[str]] = {}
    for image, label, _ in files:
        for path in (image, label):
            if path.parent not in listings:
                listings[path.parent] = set(os.listdir(path.parent)) if path.parent.is_dir() else set()
            if path.name not in listings[path.parent]:
                raise _Missing(f"missing file: {path}")


def _read_list(path: Path) -> list[str]:
    return [line.strip() for line in read_text(path, "frame list").splitlines() if line.strip()]


def _pair_dir(image_dir: Path, label_dir: Path, image_suffix: str, label_suffix: str,
              nested: bool = False) -> Files:
    """Images ``image_dir/[<sub>/]<stem><image_suffix>`` (sorted) paired with
    ``label_dir/[<sub>/]<stem><label_suffix>``."""
    _need(image_dir, "image folder")
    _need(label_dir, "label folder")
    pattern = ("*/" if nested else "") + "*" + image_suffix
    files = []
    for image in sorted(image_dir.glob(pattern)):
        stem = image.name[: -len(image_suffix)]
        files.append((image, label_dir / image.parent.relative_to(image_dir) / (stem + label_suffix), stem))
    return files


def _lut(n_cls: int, ignore_index: int, reduce_zero_label: bool) -> np.ndarray:
    """Raw value -> class: identity on 0..n_cls-1 (or 1..n_cls -> 0..n_cls-1 with 0
    ignored, mmseg's ``reduce_zero_label``), ``ignore_index`` kept, the rest -1."""
    lut = np.full(256, -1, dtype=np.int64)
    lut[ignore_index] = ignore_index
    if reduce_zero_label:
        lut[0] = ignore_index
        lut[1:n_cls + 1] = np.arange(n_cls)
    else:
        lut[:n_cls] = np.arange(n_cls)
    return lut


def _ranges(values: np.ndarray) -> str:
    """[0, 1, 2, 5, 255] -> '0..2, 5, 255'."""
    parts, start = [], None
    for i, v in enumerate(values):
        start = v if start is None else start
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(f"{start}..{v}" if v > start else f"{v}")
            start = None
    return ", ".join(parts)


def _camvid(root: Path, split: str):
    names = _read_list(_need(root / f"{split}.txt", "frame list"))
    image_dir = _need(root / split, "image folder")
    images = set(os.listdir(image_dir)) if image_dir.is_dir() else set()
    _need(root / f"{split}annot", "label folder")
    files = [(root / split / _camvid_image(n, images), root / f"{split}annot" / f"{n}.png", n)
             for n in names]
    return files, CAMVID_CLASSES, CAMVID_PALETTE, False


def _camvid_image(name: str, images: set[str]) -> str:
    """``<name>.jpg`` (our re-encoded copy), else ``<name>.png`` (the SegNet tutorial's, as
    ``fetch --data`` leaves it); with neither, ``<name>.jpg``, which the missing-file check names."""
    return f"{name}.png" if f"{name}.jpg" not in images and f"{name}.png" in images else f"{name}.jpg"


def _ade20k(root: Path, split: str):
    base = _need(root / "ADEChallengeData2016", "folder")
    folder = ADE20K_FOLDERS[split]  # build_dataset admits only these splits
    files = _pair_dir(base / "images" / folder, base / "annotations" / folder, ".jpg", ".png")
    return files, ADE20K_CLASSES, ADE20K_PALETTE, True


def _cityscapes(root: Path, split: str):
    files = _pair_dir(root / "leftImg8bit" / split, root / "gtFine" / split, "_leftImg8bit.png",
                      "_gtFine_labelTrainIds.png", nested=True)
    return files, CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, False


def _pascal(root: Path, split: str, n_cls: int = 60):
    if n_cls not in (59, 60):
        raise ValueError(f"pascal: n_cls must be 60 (with background) or 59, got {n_cls}")
    base = _need(root / "VOCdevkit" / "VOC2010", "folder")
    names = _read_list(_need(base / "ImageSets" / "SegmentationContext" / f"{split}.txt", "frame list"))
    _need(base / "JPEGImages", "image folder")
    _need(base / "SegmentationClassContext", "label folder")
    files = [(base / "JPEGImages" / f"{n}.jpg", base / "SegmentationClassContext" / f"{n}.png", n)
             for n in names]
    if n_cls == 59:
        return files, PASCAL_CONTEXT_CLASSES[1:], PASCAL_CONTEXT_PALETTE[1:], True
    return files, PASCAL_CONTEXT_CLASSES, PASCAL_CONTEXT_PALETTE, False


def _cocostuff(root: Path, split: str):
    base = _need(root / "coco_stuff164k", "folder")
    folder = f"{split}2017"
    files = _pair_dir(base / "images" / folder, base / "annotations" / folder, ".jpg", "_labelTrainIds.png")
    return files, COCO_STUFF_CLASSES, COCO_STUFF_PALETTE, False


_LOADERS: dict[str, _Loader] = {
    "camvid": _Loader(_camvid, """\
  <root>/                       (default: $ALGM_BENCH_DATA/camvid, else <cache>/data/camvid)
    {train,val,test}.txt        frame names, one a line, no extension
    {train,val,test}/<name>.jpg   (else <name>.png)
    {train,val,test}annot/<name>.png   uint8, 0..10 classes, 11 = ignore""", ("train", "val", "test")),
    "ade20k": _Loader(_ade20k, """\
  <root>/
    ADEChallengeData2016/
      images/{training,validation}/<name>.jpg
      annotations/{training,validation}/<name>.png   uint8, 0 = ignore, 1..150 classes""",
                      tuple(ADE20K_FOLDERS), top="ADEChallengeData2016"),
    "cityscapes": _Loader(_cityscapes, """\
  <root>/
    leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png
    gtFine/{train,val}/<city>/<name>_gtFine_labelTrainIds.png   uint8, 0..18 classes, 255 = ignore""",
                          ("train", "val")),
    "pascal": _Loader(_pascal, """\
  <root>/
    VOCdevkit/VOC2010/
      JPEGImages/<name>.jpg
      SegmentationClassContext/<name>.png   uint8, 0 = background, 1..59 classes, 255 = ignore
      ImageSets/SegmentationContext/{train,val}.txt   frame names, one a line""",
                      ("train", "val"), top="VOCdevkit", options=("n_cls",)),
    "cocostuff": _Loader(_cocostuff, """\
  <root>/
    coco_stuff164k/
      images/{train2017,val2017}/<name>.jpg
      annotations/{train2017,val2017}/<name>_labelTrainIds.png   uint8, 0..170 classes, 255 = ignore""",
                         ("train", "val"), top="coco_stuff164k"),
}
