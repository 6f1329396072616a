"""Segmentation datasets on disk (SPEC section 6), one loader per layout.

``build_dataset(name, split)`` returns a :class:`SegDataset` whose items are
:class:`Sample` tuples: ``image`` (3, H, W) uint8 RGB, ``label`` (H, W) int64 with class
indices ``0..n_cls-1`` and ``ignore_index`` for pixels no metric counts, ``name`` the
frame id. Labels are remapped on load (ADE20K and Pascal Context 59 reduce the zero
label, mmsegmentation's convention), so every consumer sees the same convention.

Where the data lives: the ``root`` argument, else ``$DATA_ROOT``, else (CamVid only)
``../shared/data/camvid`` next to the repository. For the fixed layouts the root is the
folder that *contains* the layout's top folder (e.g. the one holding
``ADEChallengeData2016``); for CamVid and Cityscapes it is the dataset folder itself.
A missing or malformed root fails at construction with the expected tree; a label value
that is neither a class nor ignore fails when that sample is loaded, naming the file.

Class names and palettes are those of mmsegmentation 1.2.2's dataset classes (CamVid,
which mmseg lacks: the SegNet tutorial's 11-class palette).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

import algm
from algm.config import get_dataset

REPO_ROOT = Path(algm.__file__).resolve().parents[1]
DEFAULT_CAMVID_ROOT = (REPO_ROOT / ".." / "shared" / "data" / "camvid").resolve()

Files = list[tuple[Path, Path, str]]  # (image path, label path, frame name)


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
        with Image.open(image_path) as im:
            image = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()
        label = self.read_label(label_path)
        if tuple(label.shape) != tuple(image.shape[1:]):
            raise ValueError(f"{label_path}: label is {tuple(label.shape)} (H, W) but its image "
                             f"{image_path} is {tuple(image.shape[1:])}")
        return Sample(image, label, name)

    def read_label(self, path: Path) -> Tensor:
        """The (H, W) int64 label of one file, remapped; fails naming the file on bad values."""
        with Image.open(path) as im:
            mode = im.mode
            raw = np.array(im)
        if raw.ndim != 2:
            raise ValueError(f"{path}: a label must be a single-channel image of class indices, "
                             f"got mode {mode} with shape {raw.shape}")
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
            hint = f"\n(the root is the folder that contains {loader.top}: try {base.parent})"
        raise FileNotFoundError(f"{name} {split}: {missing}\nexpected layout under {base}:\n"
                                f"{loader.layout}{hint}") from None
    lut = _lut(len(classes), spec.ignore_index, reduce_zero_label)
    return SegDataset(name, split, base, files, classes, palette, spec.ignore_index, lut)


def resolve_root(name: str, root: str | Path | None = None) -> Path:
    """``root`` if given, else ``$DATA_ROOT``, else the CamVid default (other datasets: error)."""
    root = root if root is not None else os.environ.get("DATA_ROOT") or None
    if root is not None:
        return Path(root).expanduser()
    if name == "camvid":
        return DEFAULT_CAMVID_ROOT
    raise FileNotFoundError(f"{name}: no data root; pass --data-root (root=) or set DATA_ROOT to the "
                            f"folder with this layout:\n{_LOADERS[name].layout}")


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
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


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
    _need(root / split, "image folder")
    _need(root / f"{split}annot", "label folder")
    files = [(root / split / f"{n}.jpg", root / f"{split}annot" / f"{n}.png", n) for n in names]
    return files, CAMVID_CLASSES, CAMVID_PALETTE, False


def _ade20k(root: Path, split: str):
    base = _need(root / "ADEChallengeData2016", "folder")
    folder = {"train": "training", "val": "validation"}[split]
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
  <root>/                       (default: ../shared/data/camvid beside the repository)
    {train,val,test}.txt        frame names, one a line, no extension
    {train,val,test}/<name>.jpg
    {train,val,test}annot/<name>.png   uint8, 0..10 classes, 11 = ignore""", ("train", "val", "test")),
    "ade20k": _Loader(_ade20k, """\
  <root>/
    ADEChallengeData2016/
      images/{training,validation}/<name>.jpg
      annotations/{training,validation}/<name>.png   uint8, 0 = ignore, 1..150 classes""",
                      ("train", "val"), top="ADEChallengeData2016"),
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


# Class names and palettes. CamVid: SegNet tutorial order and colours (README of the data);
# the others copied verbatim from mmsegmentation 1.2.2's dataset METAINFO
# (tests/test_datasets.py checks they still match the installed mmseg).

CAMVID_CLASSES = (
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
    "Pedestrian", "Bicyclist",
)
CAMVID_PALETTE = (
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
)

ADE20K_CLASSES = (
    'wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed ', 'windowpane',
    'grass', 'cabinet', 'sidewalk', 'person', 'earth', 'door', 'table', 'mountain',
    'plant', 'curtain', 'chair', 'car', 'water', 'painting', 'sofa', 'shelf', 'house',
    'sea', 'mirror', 'rug', 'field', 'armchair', 'seat', 'fence', 'desk', 'rock',
    'wardrobe', 'lamp', 'bathtub', 'railing', 'cushion', 'base', 'box', 'column',
    'signboard', 'chest of drawers', 'counter', 'sand', 'sink', 'skyscraper', 'fireplace',
    'refrigerator', 'grandstand', 'path', 'stairs', 'runway', 'case', 'pool table',
    'pillow', 'screen door', 'stairway', 'river', 'bridge', 'bookcase', 'blind',
    'coffee table', 'toilet', 'flower', 'book', 'hill', 'bench', 'countertop', 'stove',
    'palm', 'kitchen island', 'computer', 'swivel chair', 'boat', 'bar', 'arcade machine',
    'hovel', 'bus', 'towel', 'light', 'truck', 'tower', 'chandelier', 'awning',
    'streetlight', 'booth', 'television receiver', 'airplane', 'dirt track', 'apparel',
    'pole', 'land', 'bannister', 'escalator', 'ottoman', 'bottle', 'buffet', 'poster',
    'stage', 'van', 'ship', 'fountain', 'conveyer belt', 'canopy', 'washer', 'plaything',
    'swimming pool', 'stool', 'barrel', 'basket', 'waterfall', 'tent', 'bag', 'minibike',
    'cradle', 'oven', 'ball', 'food', 'step', 'tank', 'trade name', 'microwave', 'pot',
    'animal', 'bicycle', 'lake', 'dishwasher', 'screen', 'blanket', 'sculpture', 'hood',
    'sconce', 'vase', 'traffic light', 'tray', 'ashcan', 'fan', 'pier', 'crt screen',
    'plate', 'monitor', 'bulletin board', 'shower', 'radiator', 'glass', 'clock', 'flag',
)
ADE20K_PALETTE = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3),
    (120, 120, 80), (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7),
    (224, 5, 255), (235, 255, 7), (150, 5, 61), (120, 120, 70), (8, 255, 51), (255, 6, 82),
    (143, 255, 140), (204, 255, 4), (255, 51, 7), (204, 70, 3), (0, 102, 200),
    (61, 230, 250), (255, 6, 51), (11, 102, 255), (255, 7, 71), (255, 9, 224), (9, 7, 230),
    (220, 220, 220), (255, 9, 92), (112, 9, 255), (8, 255, 214), (7, 255, 224),
    (255, 184, 6), (10, 255, 71), (255, 41, 10), (7, 255, 255), (224, 255, 8),
    (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20), (255, 8, 41),
    (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255),
    (140, 140, 140), (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0),
    (255, 224, 0), (153, 255, 0), (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255),
    (31, 0, 255), (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112),
    (0, 255, 133), (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0), (0, 143, 255),
    (51, 255, 0), (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0),
    (0, 255, 153), (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102),
    (255, 173, 0), (255, 0, 20), (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255),
    (255, 0, 204), (0, 255, 194), (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255),
    (0, 194, 255), (0, 122, 255), (0, 255, 163), (255, 153, 0), (0, 255, 10),
    (255, 112, 0), (143, 255, 0), (82, 0, 255), (163, 255, 0), (255, 235, 0),
    (8, 184, 170), (133, 0, 255), (0, 255, 92), (184, 0, 255), (255, 0, 31), (0, 184, 255),
    (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255), (112, 224, 255),
    (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235),
    (245, 0, 255), (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0),
    (0, 204, 255), (20, 0, 255), (255, 255, 0), (0, 153, 255), (0, 41, 255), (0, 255, 204),
    (41, 0, 255), (41, 255, 0), (173, 0, 255), (0, 245, 255), (71, 0, 255), (122, 0, 255),
    (0, 255, 184), (0, 92, 255), (184, 255, 0), (0, 133, 255), (255, 214, 0),
    (25, 194, 194), (102, 255, 0), (92, 0, 255),
)

CITYSCAPES_CLASSES = (
    'road', 'sidewalk', 'building', 'wall', 'fence', 'pole', 'traffic light',
    'traffic sign', 'vegetation', 'terrain', 'sky', 'person', 'rider', 'car', 'truck',
    'bus', 'train', 'motorcycle', 'bicycle',
)
CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)

PASCAL_CONTEXT_CLASSES = (
    'background', 'aeroplane', 'bag', 'bed', 'bedclothes', 'bench', 'bicycle', 'bird',
    'boat', 'book', 'bottle', 'building', 'bus', 'cabinet', 'car', 'cat', 'ceiling',
    'chair', 'cloth', 'computer', 'cow', 'cup', 'curtain', 'dog', 'door', 'fence', 'floor',
    'flower', 'food', 'grass', 'ground', 'horse', 'keyboard', 'light', 'motorbike',
    'mountain', 'mouse', 'person', 'plate', 'platform', 'pottedplant', 'road', 'rock',
    'sheep', 'shelves', 'sidewalk', 'sign', 'sky', 'snow', 'sofa', 'table', 'track',
    'train', 'tree', 'truck', 'tvmonitor', 'wall', 'water', 'window', 'wood',
)
PASCAL_CONTEXT_PALETTE = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3),
    (120, 120, 80), (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7),
    (224, 5, 255), (235, 255, 7), (150, 5, 61), (120, 120, 70), (8, 255, 51), (255, 6, 82),
    (143, 255, 140), (204, 255, 4), (255, 51, 7), (204, 70, 3), (0, 102, 200),
    (61, 230, 250), (255, 6, 51), (11, 102, 255), (255, 7, 71), (255, 9, 224), (9, 7, 230),
    (220, 220, 220), (255, 9, 92), (112, 9, 255), (8, 255, 214), (7, 255, 224),
    (255, 184, 6), (10, 255, 71), (255, 41, 10), (7, 255, 255), (224, 255, 8),
    (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20), (255, 8, 41),
    (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255),
    (140, 140, 140), (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0),
    (255, 224, 0), (153, 255, 0), (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255),
    (31, 0, 255),
)

COCO_STUFF_CLASSES = (
    'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train', 'truck', 'boat',
    'traffic light', 'fire hydrant', 'stop sign', 'parking meter', 'bench', 'bird', 'cat',
    'dog', 'horse', 'sheep', 'cow', 'elephant', 'bear', 'zebra', 'giraffe', 'backpack',
    'umbrella', 'handbag', 'tie', 'suitcase', 'frisbee', 'skis', 'snowboard',
    'sports ball', 'kite', 'baseball bat', 'baseball glove', 'skateboard', 'surfboard',
    'tennis racket', 'bottle', 'wine glass', 'cup', 'fork', 'knife', 'spoon', 'bowl',
    'banana', 'apple', 'sandwich', 'orange', 'broccoli', 'carrot', 'hot dog', 'pizza',
    'donut', 'cake', 'chair', 'couch', 'potted plant', 'bed', 'dining table', 'toilet',
    'tv', 'laptop', 'mouse', 'remote', 'keyboard', 'cell phone', 'microwave', 'oven',
    'toaster', 'sink', 'refrigerator', 'book', 'clock', 'vase', 'scissors', 'teddy bear',
    'hair drier', 'toothbrush', 'banner', 'blanket', 'branch', 'bridge', 'building-other',
    'bush', 'cabinet', 'cage', 'cardboard', 'carpet', 'ceiling-other', 'ceiling-tile',
    'cloth', 'clothes', 'clouds', 'counter', 'cupboard', 'curtain', 'desk-stuff', 'dirt',
    'door-stuff', 'fence', 'floor-marble', 'floor-other', 'floor-stone', 'floor-tile',
    'floor-wood', 'flower', 'fog', 'food-other', 'fruit', 'furniture-other', 'grass',
    'gravel', 'ground-other', 'hill', 'house', 'leaves', 'light', 'mat', 'metal',
    'mirror-stuff', 'moss', 'mountain', 'mud', 'napkin', 'net', 'paper', 'pavement',
    'pillow', 'plant-other', 'plastic', 'platform', 'playingfield', 'railing', 'railroad',
    'river', 'road', 'rock', 'roof', 'rug', 'salad', 'sand', 'sea', 'shelf', 'sky-other',
    'skyscraper', 'snow', 'solid-other', 'stairs', 'stone', 'straw', 'structural-other',
    'table', 'tent', 'textile-other', 'towel', 'tree', 'vegetable', 'wall-brick',
    'wall-concrete', 'wall-other', 'wall-panel', 'wall-stone', 'wall-tile', 'wall-wood',
    'water-other', 'waterdrops', 'window-blind', 'window-other', 'wood',
)
COCO_STUFF_PALETTE = (
    (0, 192, 64), (0, 192, 64), (0, 64, 96), (128, 192, 192), (0, 64, 64), (0, 192, 224),
    (0, 192, 192), (128, 192, 64), (0, 192, 96), (128, 192, 64), (128, 32, 192),
    (0, 0, 224), (0, 0, 64), (0, 160, 192), (128, 0, 96), (128, 0, 192), (0, 32, 192),
    (128, 128, 224), (0, 0, 192), (128, 160, 192), (128, 128, 0), (128, 0, 32),
    (128, 32, 0), (128, 0, 128), (64, 128, 32), (0, 160, 0), (0, 0, 0), (192, 128, 160),
    (0, 32, 0), (0, 128, 128), (64, 128, 160), (128, 160, 0), (0, 128, 0), (192, 128, 32),
    (128, 96, 128), (0, 0, 128), (64, 0, 32), (0, 224, 128), (128, 0, 0), (192, 0, 160),
    (0, 96, 128), (128, 128, 128), (64, 0, 160), (128, 224, 128), (128, 128, 64),
    (192, 0, 32), (128, 96, 0), (128, 0, 192), (0, 128, 32), (64, 224, 0), (0, 0, 64),
    (128, 128, 160), (64, 96, 0), (0, 128, 192), (0, 128, 160), (192, 224, 0),
    (0, 128, 64), (128, 128, 32), (192, 32, 128), (0, 64, 192), (0, 0, 32), (64, 160, 128),
    (128, 64, 64), (128, 0, 160), (64, 32, 128), (128, 192, 192), (0, 0, 160),
    (192, 160, 128), (128, 192, 0), (128, 0, 96), (192, 32, 0), (128, 64, 128),
    (64, 128, 96), (64, 160, 0), (0, 64, 0), (192, 128, 224), (64, 32, 0), (0, 192, 128),
    (64, 128, 224), (192, 160, 0), (0, 192, 0), (192, 128, 96), (192, 96, 128),
    (0, 64, 128), (64, 0, 96), (64, 224, 128), (128, 64, 0), (192, 0, 224), (64, 96, 128),
    (128, 192, 128), (64, 0, 224), (192, 224, 128), (128, 192, 64), (192, 0, 96),
    (192, 96, 0), (128, 64, 192), (0, 128, 96), (0, 224, 0), (64, 64, 64), (128, 128, 224),
    (0, 96, 0), (64, 192, 192), (0, 128, 224), (128, 224, 0), (64, 192, 64),
    (128, 128, 96), (128, 32, 128), (64, 0, 192), (0, 64, 96), (0, 160, 128), (192, 0, 64),
    (128, 64, 224), (0, 32, 128), (192, 128, 192), (0, 64, 224), (128, 160, 128),
    (192, 128, 0), (128, 64, 32), (128, 32, 64), (192, 0, 128), (64, 192, 32),
    (0, 160, 64), (64, 0, 0), (192, 192, 160), (0, 32, 64), (64, 128, 128), (64, 192, 160),
    (128, 160, 64), (64, 128, 0), (192, 192, 32), (128, 96, 192), (64, 0, 128),
    (64, 64, 32), (0, 224, 192), (192, 0, 0), (192, 64, 160), (0, 96, 192),
    (192, 128, 128), (64, 64, 160), (128, 224, 192), (192, 128, 64), (192, 64, 32),
    (128, 96, 64), (192, 0, 192), (0, 192, 32), (64, 224, 64), (64, 0, 64),
    (128, 192, 160), (64, 96, 64), (64, 128, 192), (0, 192, 160), (192, 224, 64),
    (64, 128, 64), (128, 192, 32), (192, 32, 192), (64, 64, 192), (0, 64, 32),
    (64, 160, 192), (192, 64, 64), (128, 64, 160), (64, 32, 192), (192, 192, 192),
    (0, 64, 160), (192, 160, 192), (192, 192, 0), (128, 64, 96), (192, 32, 64),
    (192, 64, 128), (64, 192, 96), (64, 160, 64), (64, 64, 0),
)

