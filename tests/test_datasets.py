"""Dataset loaders on tiny trees in the real layouts, plus two real CamVid frames."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from algm.data import datasets as ds
from algm.data.datasets import DEFAULT_CAMVID_ROOT, Sample, build_dataset, check_files

H, W = 6, 8


def write_image(path: Path, seed: int = 0, size: tuple[int, int] = (H, W)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def write_label(path: Path, values, size: tuple[int, int] = (H, W)) -> np.ndarray:
    """A (H, W) uint8 label cycling through ``values``; returns the raw array."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = np.resize(np.asarray(values, dtype=np.uint8), size[0] * size[1]).reshape(size)
    Image.fromarray(raw).save(path)
    return raw


def make_camvid(root: Path, frames: dict[str, list[str]], values=(0, 5, 10, 11)) -> Path:
    for split, names in frames.items():
        (root / f"{split}.txt").parent.mkdir(parents=True, exist_ok=True)
        (root / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
        for i, n in enumerate(names):
            write_image(root / split / f"{n}.jpg", i)
            write_label(root / f"{split}annot" / f"{n}.png", values)
    return root


def make_ade(root: Path, n_train: int = 2, n_val: int = 3, values=(0, 1, 75, 150)) -> Path:
    base = root / "ADEChallengeData2016"
    for folder, n in (("training", n_train), ("validation", n_val)):
        for i in range(n):
            stem = f"ADE_{folder[:3]}_{i:08d}"
            write_image(base / "images" / folder / f"{stem}.jpg", i)
            write_label(base / "annotations" / folder / f"{stem}.png", values)
    return root


def make_cityscapes(root: Path) -> Path:
    for split, cities in (("train", {"aachen": 2, "bochum": 1}), ("val", {"frankfurt": 2})):
        for city, n in cities.items():
            for i in range(n):
                stem = f"{city}_000000_{i:06d}"
                write_image(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", i)
                write_label(root / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png", (0, 18, 255))
    return root


def make_pascal(root: Path, values=(0, 1, 59, 255)) -> Path:
    base = root / "VOCdevkit" / "VOC2010"
    lists = base / "ImageSets" / "SegmentationContext"
    lists.mkdir(parents=True)
    splits = {"train": ["2008_000002", "2008_000003"], "val": ["2008_000008"]}
    for split, names in splits.items():
        (lists / f"{split}.txt").write_text("\n".join(names) + "\n")
        for i, n in enumerate(names):
            write_image(base / "JPEGImages" / f"{n}.jpg", i)
            write_label(base / "SegmentationClassContext" / f"{n}.png", values)
    return root


def make_cocostuff(root: Path, values=(0, 91, 170, 255)) -> Path:
    base = root / "coco_stuff164k"
    for folder, n in (("train2017", 3), ("val2017", 2)):
        for i in range(n):
            stem = f"{i:012d}"
            write_image(base / "images" / folder / f"{stem}.jpg", i)
            write_label(base / "annotations" / folder / f"{stem}_labelTrainIds.png", values)
    return root


@pytest.fixture(autouse=True)
def no_data_root_env(monkeypatch):
    monkeypatch.delenv("DATA_ROOT", raising=False)


def test_camvid_lengths_labels_and_sample_types(tmp_path):
    root = make_camvid(tmp_path, {"train": ["a", "b", "c"], "val": ["d"], "test": ["e", "f"]})
    assert [len(build_dataset("camvid", s, root=root)) for s in ("train", "val", "test")] == [3, 1, 2]
    data = build_dataset("camvid", "train", root=root)
    assert (data.n_cls, data.ignore_index, len(data.palette)) == (11, 11, 11)
    sample = data[1]
    assert isinstance(sample, Sample) and sample.name == "b"
    assert sample.image.dtype == torch.uint8 and sample.image.shape == (3, H, W)
    assert sample.label.dtype == torch.long and sample.label.shape == (H, W)
    assert set(sample.label.unique().tolist()) == {0, 5, 10, 11}  # 11 stays the ignore index


def test_camvid_root_precedence(tmp_path, monkeypatch):
    env_root = make_camvid(tmp_path / "env", {"val": ["x", "y"]})
    arg_root = make_camvid(tmp_path / "arg", {"val": ["z"]})
    monkeypatch.setenv("ALGM_BENCH_DATA", str(tmp_path / "home"))
    assert ds.DEFAULT_CAMVID_ROOT == ds.default_root("camvid") == tmp_path / "home" / "camvid"
    monkeypatch.setenv("DATA_ROOT", str(env_root))
    assert len(build_dataset("camvid", "val")) == 2
    assert len(build_dataset("camvid", "val", root=arg_root)) == 1


def test_limit_and_collate(tmp_path):
    root = make_camvid(tmp_path, {"train": ["a", "b", "c"]})
    data = build_dataset("camvid", "train", root=root, limit=2)
    assert [s.name for s in data] == ["a", "b"]
    batch = next(iter(DataLoader(data, batch_size=2)))
    assert batch.image.shape == (2, 3, H, W) and batch.label.shape == (2, H, W)
    assert list(batch.name) == ["a", "b"]
    with pytest.raises(ValueError, match="limit"):
        build_dataset("camvid", "train", root=root, limit=0)


def test_ade20k_reduce_zero_label(tmp_path):
    root = make_ade(tmp_path)
    assert len(build_dataset("ade20k", "train", root=root)) == 2
    data = build_dataset("ade20k", "val", root=root)
    assert len(data) == 3 and data.n_cls == 150 and data.ignore_index == 255
    raw = np.array(Image.open(data.files[0][1]))
    label = data[0].label.numpy()
    assert (label[raw == 0] == 255).all()
    assert (label[raw > 0] == raw[raw > 0] - 1).all()
    assert set(np.unique(label)) == {0, 74, 149, 255}


def test_cityscapes_nested_cities(tmp_path):
    root = make_cityscapes(tmp_path)
    train = build_dataset("cityscapes", "train", root=root)
    assert len(train) == 3 and train.n_cls == 19
    assert [name for _, _, name in train.files] == ["aachen_000000_000000", "aachen_000000_000001",
                                                    "bochum_000000_000000"]
    assert set(train[2].label.unique().tolist()) == {0, 18, 255}
    assert len(build_dataset("cityscapes", "val", root=root)) == 2


def test_pascal_60_and_59(tmp_path):
    root = make_pascal(tmp_path)
    p60 = build_dataset("pascal", "train", root=root)
    p59 = build_dataset("pascal", "train", root=root, n_cls=59)
    assert (len(p60), len(p59), len(build_dataset("pascal", "val", root=root))) == (2, 2, 1)
    assert (p60.n_cls, p59.n_cls) == (60, 59)
    assert p60.classes[0] == "background" and p59.classes == p60.classes[1:]
    raw = np.array(Image.open(p60.files[0][1]))
    assert torch.equal(p60[0].label, torch.from_numpy(raw.astype(np.int64)))
    expected59 = np.where((raw == 0) | (raw == 255), 255, raw.astype(np.int64) - 1)
    assert (p59[0].label.numpy() == expected59).all()
    with pytest.raises(ValueError, match="n_cls"):
        build_dataset("pascal", "train", root=root, n_cls=21)


def test_cocostuff(tmp_path):
    root = make_cocostuff(tmp_path)
    data = build_dataset("cocostuff", "train", root=root)
    assert len(data) == 3 and data.n_cls == 171 and len(build_dataset("cocostuff", "val", root=root)) == 2
    assert set(data[0].label.unique().tolist()) == {0, 91, 170, 255}


@pytest.mark.parametrize("name, make, bad", [
    ("camvid", lambda r: make_camvid(r, {"val": ["a"]}, values=(0, 12)), 12),
    ("ade20k", lambda r: make_ade(r, values=(0, 151)), 151),
    ("cityscapes", None, 19),
    ("pascal", lambda r: make_pascal(r, values=(0, 60)), 60),
    ("cocostuff", lambda r: make_cocostuff(r, values=(3, 171)), 171),
])
def test_out_of_range_label_names_the_file(tmp_path, name, make, bad):
    if make is None:
        make_cityscapes(tmp_path)
        write_label(min((tmp_path / "gtFine" / "val").rglob("*.png")), (1, bad))
    else:
        make(tmp_path)
    data = build_dataset(name, "val", root=tmp_path)  # construction does not read labels
    with pytest.raises(ValueError, match=rf"{data.files[0][1].name}.*label values {bad}\b"):
        data[0]


def test_rgb_label_and_size_mismatch_are_errors(tmp_path):
    root = make_camvid(tmp_path, {"val": ["a", "b"]})
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(root / "valannot" / "a.png")
    write_label(root / "valannot" / "b.png", (1,), size=(H + 1, W))
    data = build_dataset("camvid", "val", root=root)
    with pytest.raises(ValueError, match="a.png.*single-channel"):
        data[0]
    with pytest.raises(ValueError, match="b.png.*label is"):
        data[1]


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def _listing(root: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*")}


@pytest.mark.parametrize("which, damage", [
    ("image", _truncate),  # JPEG: verify() alone would pass it
    ("label", _truncate),
    ("label", lambda p: _truncate(p, keep=0.97)),  # only the end of the PNG is missing
    ("image", lambda p: p.write_text("not an image")),
])
def test_unreadable_file_is_named_up_front_and_on_load(tmp_path, which, damage):
    """check_files fails on the first bad file, naming it; loading it does the same
    instead of PIL's "OSError: image file is truncated"."""
    root = tmp_path / "camvid"
    make_camvid(root, {"val": ["a", "b", "c"]})
    for n in "abc":  # big enough that half a file is a broken one, not a tiny valid one
        write_image(root / "val" / f"{n}.jpg", size=(48, 64))
        write_label(root / "valannot" / f"{n}.png", range(11), size=(48, 64))
    bad = root / ("val" if which == "image" else "valannot") / ("b.jpg" if which == "image" else "b.png")
    damage(bad)
    data = build_dataset("camvid", "val", root=root)
    before = _listing(tmp_path)
    with pytest.raises(ValueError, match=f"^{bad}: cannot read this image") as err:
        check_files(data)
    assert "\n" not in str(err.value)
    data[0]  # the good frame still loads
    if which == "image" or damage is _truncate:  # PIL decodes a PNG whose end is cut off
        with pytest.raises(ValueError, match=f"^{bad}: cannot read this image"):
            data[1]
    assert _listing(tmp_path) == before  # nothing written


def test_check_files_checks_label_headers(tmp_path):
    root = make_camvid(tmp_path, {"val": ["a", "b"]})
    check_files(build_dataset("camvid", "val", root=root))  # a sound split passes
    write_label(root / "valannot" / "b.png", (1,), size=(H + 1, W))
    with pytest.raises(ValueError, match=r"b.png: label is \(7, 8\) \(H, W\) but its image .*b.jpg is \(6, 8\)"):
        check_files(build_dataset("camvid", "val", root=root))
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(root / "valannot" / "a.png")
    with pytest.raises(ValueError, match="a.png: a label must be a single-channel image.*mode RGB"):
        check_files(build_dataset("camvid", "val", root=root))


def test_check_files_verifies_png_images(tmp_path):
    root = make_cityscapes(tmp_path)
    data = build_dataset("cityscapes", "train", root=root)
    check_files(data)
    image = data.files[1][0]
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (H, W, 3), np.uint8)).save(image)
    raw = bytearray(image.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte: the chunk checksum no longer matches
    image.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=f"^{image}: cannot read this image"):
        check_files(data)


@pytest.mark.parametrize("name", ["camvid", "ade20k", "cityscapes", "pascal", "cocostuff"])
def test_missing_root_shows_layout(tmp_path, name):
    with pytest.raises(FileNotFoundError, match="expected layout") as info:
        build_dataset(name, "val", root=tmp_path / "nowhere")
    problem, layout = str(info.value).split("\n")  # two lines: the problem, the layout
    assert problem == f"{name} val: the root {tmp_path / 'nowhere'} does not exist or is not a folder"
    assert layout == f"expected layout under {tmp_path / 'nowhere'}: {ds.one_line(ds._LOADERS[name].layout)}"


def test_missing_data_root_for_fixed_layouts(tmp_path, monkeypatch):
    monkeypatch.setenv("ALGM_BENCH_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"(?s)the root {tmp_path / 'ade20k'} does not exist.*"
                                                "ADEChallengeData2016"):
        build_dataset("ade20k", "val")


def test_wrong_layout_errors(tmp_path):
    root = make_ade(tmp_path)
    with pytest.raises(FileNotFoundError, match="contains ADEChallengeData2016: try"):
        build_dataset("ade20k", "val", root=root / "ADEChallengeData2016")
    (root / "ADEChallengeData2016" / "annotations" / "validation" / "ADE_val_00000001.png").unlink()
    with pytest.raises(FileNotFoundError, match="missing file: .*ADE_val_00000001.png"):
        build_dataset("ade20k", "val", root=root)
    (tmp_path / "empty" / "leftImg8bit" / "val").mkdir(parents=True)
    (tmp_path / "empty" / "gtFine" / "val").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no val images"):
        build_dataset("cityscapes", "val", root=tmp_path / "empty")
    camvid = make_camvid(tmp_path / "camvid", {"val": ["a"]})
    (camvid / "val.txt").write_text("a\nmissing\n")
    with pytest.raises(FileNotFoundError, match="missing file: .*missing.jpg"):
        build_dataset("camvid", "val", root=camvid)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("voc", "val", root=tmp_path)
    with pytest.raises(ValueError, match="no split 'test'"):
        build_dataset("ade20k", "test", root=tmp_path)
    with pytest.raises(ValueError, match="no split 'validation'; choose one of: train, val$"):
        build_dataset("ade20k", "validation", root=make_ade(tmp_path))  # the folder's name
    with pytest.raises(ValueError, match="unknown option"):
        build_dataset("ade20k", "val", root=tmp_path, n_cls=59)


def _mmseg_metainfo(module: str, cls: str) -> dict:
    spec = importlib.util.find_spec("mmseg")
    if spec is None:
        pytest.skip("mmsegmentation is not installed (optional extra 'mmseg')")
    source = Path(spec.origin).parent / "datasets" / f"{module}.py"
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for stmt in node.body:
                if isinstance(stmt, ast.Assign) and stmt.targets[0].id == "METAINFO":
                    return {k.arg: ast.literal_eval(k.value) for k in stmt.value.keywords}
    raise AssertionError(f"no METAINFO in {source}:{cls}")


@pytest.mark.parametrize("module, cls, classes, palette", [
    ("ade", "ADE20KDataset", ds.ADE20K_CLASSES, ds.ADE20K_PALETTE),
    ("cityscapes", "CityscapesDataset", ds.CITYSCAPES_CLASSES, ds.CITYSCAPES_PALETTE),
    ("pascal_context", "PascalContextDataset", ds.PASCAL_CONTEXT_CLASSES, ds.PASCAL_CONTEXT_PALETTE),
    ("pascal_context", "PascalContextDataset59", ds.PASCAL_CONTEXT_CLASSES[1:],
     ds.PASCAL_CONTEXT_PALETTE[1:]),
    ("coco_stuff", "COCOStuffDataset", ds.COCO_STUFF_CLASSES, ds.COCO_STUFF_PALETTE),
])
def test_class_names_and_palettes_match_mmseg(module, cls, classes, palette):
    meta = _mmseg_metainfo(module, cls)
    assert tuple(meta["classes"]) == classes
    assert tuple(tuple(c) for c in meta["palette"]) == palette


@pytest.mark.skipif(not (DEFAULT_CAMVID_ROOT / "val.txt").is_file(),
                    reason=f"real CamVid data not found at {DEFAULT_CAMVID_ROOT}")
def test_real_camvid_frames():
    data = build_dataset("camvid", "val", limit=2)
    assert len(data) == 2 and len(build_dataset("camvid", "train")) == 367
    for sample in data:
        assert sample.image.shape == (3, 360, 480) and sample.image.dtype == torch.uint8
        assert sample.label.shape == (360, 480)
        assert 0 <= sample.label.min() and sample.label.max() <= 11
    check_files(build_dataset("camvid", "val"))  # every real frame opens
