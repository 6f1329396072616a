"""Hostile files and odd machines (issue 27): caches that trust nothing, inputs too large
for memory refused up front, reads that could block refused, the packages never shadowed."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import types
import zlib
import struct

import pytest

import algm.cli
from algm import distributed
from algm.config import check_window
from algm.data.datasets import build_dataset, check_image_file
from algm.data.windows import covering_stride, frames_batch
from algm.evaluate import slide_inference
from suites.runner import ROW_FORMAT, read_row

ROW = {"backbone": "vit-s14", "method": "none", "setting": "none", "gflops": 25.9, "tokens_kept_pct": 100.0,
       "ims_b1": 2.2, "miou": 52.1, "miou_trained": math.nan}


@pytest.mark.parametrize("field, value, reason", [
    ("gflops", "abc", "gflops is 'abc', not a number"),
    ("gflops", -5.0, "gflops is -5.0, out of range"),
    ("gflops", math.inf, "gflops is inf, out of range"),
    ("miou", math.inf, "miou is inf, out of range"),
    ("miou", 101.0, "miou is 101.0, out of range"),
    ("ims_b1", math.nan, "ims_b1 is nan, out of range"),
    ("ims_b1", -1.0, "ims_b1 is -1.0, out of range"),
])
def test_a_cached_row_with_bad_numbers_is_moved_aside_not_used(tmp_path, capsys, field, value, reason):
    path = tmp_path / "k.json"
    path.write_text(json.dumps({"format": ROW_FORMAT, "key": "k", "row": {**ROW, field: value}}))
    assert read_row(path, "k") is None
    assert not path.exists() and (tmp_path / "k.json.bad").is_file()
    assert reason in capsys.readouterr().err
    path.write_text(json.dumps({"format": ROW_FORMAT, "key": "k", "row": {**ROW, field: value}}))
    assert read_row(path, "k") is None and (tmp_path / "k.json.bad-2").is_file()  # the first kept


def test_a_good_cached_row_is_used_nan_miou_included(tmp_path):
    path = tmp_path / "k.json"
    path.write_text(json.dumps({"format": ROW_FORMAT, "key": "k", "row": ROW}))
    assert read_row(path, "k")["gflops"] == 25.9


def test_windows_and_batches_too_large_for_memory_are_one_line():
    with pytest.raises(ValueError, match=r"^input size 0x0 is smaller than one 16x16 patch$"):
        check_window((0, 0), 16)
    with pytest.raises(ValueError, match=r"^a 100000x100000 window \(39,062,501 tokens\) needs at least "
                                         r"5,684,342\.2 GiB of memory, more than this machine's [\d,.]+ GiB"):
        check_window((100000, 100000), 16)
    with pytest.raises(ValueError, match=r"^a 16000x16000 window \(1,000,001 tokens\) needs at least 3,725\.3 GiB"):
        check_window((16000, 16000), 16)
    with pytest.raises(ValueError, match=r"^a batch of 10,000,000 images of 336x448 needs at least 16,822\.8 GiB"):
        frames_batch("camvid", "val", (336, 448), (0.5,) * 3, (0.5,) * 3, 10_000_000, "repeated", root="/nowhere")


def test_a_stride_longer_than_the_window_is_cut_and_said_or_refused():
    assert covering_stride((32, 32), (48, 48)) == ((32, 32), "the stride 48x48 is longer than the 32x32 window "
                                                   "and would leave pixels unevaluated; using stride 32x32")
    assert covering_stride((64, 64), (48, 48)) == ((48, 48), None)
    import torch
    with pytest.raises(ValueError, match=r"stride must be positive and at most the window \(32, 32\)"):
        slide_inference(lambda x: x, torch.zeros(1, 3, 80, 80), (32, 32), (48, 48), 3)


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares its size and holds no pixels: enough for Pillow's size check."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def test_an_image_over_the_pixel_cap_is_one_line_before_decoding(tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(_png_header(20000, 20000))
    with pytest.raises(ValueError) as err:
        check_image_file(big)
    assert str(err.value) == f"{big}: image too large (400 megapixels, over the limit of 89 megapixels); refusing to decode it"


def _camvid(root, names=("a",), listing=None):
    from PIL import Image

    for sub in ("val", "valannot"):
        (root / sub).mkdir(parents=True)
    for n in names:
        Image.new("RGB", (8, 8)).save(root / "val" / f"{n}.jpg")
        Image.new("L", (8, 8)).save(root / "valannot" / f"{n}.png")
    (root / "val.txt").write_bytes(listing if listing is not None else "\n".join(names).encode())
    return root


def test_split_lists_that_block_or_are_binary_are_named(tmp_path):
    root = _camvid(tmp_path / "camvid", listing=b"\xff\xfe a\n")
    with pytest.raises(ValueError) as err:
        build_dataset("camvid", "val", root=root)
    assert str(err.value) == (f"{root / 'val.txt'}: not UTF-8 text (byte 0xff at offset 0); is this frame list "
                              f"a binary file?")
    (root / "val.txt").unlink()
    os.mkfifo(root / "val.txt")
    with pytest.raises(ValueError, match=r"val.txt: not a regular file \(a FIFO\); the frame list must be a file"):
        build_dataset("camvid", "val", root=root)


@pytest.mark.parametrize("make, problem", [
    (lambda root: None, "the root {root} does not exist or is not a folder"),
    (lambda root: _camvid(root, listing=b"\n"), "no val images found"),
    (lambda root: _camvid(root, listing=b"a\nmissing\n"), "missing file: {root}/val/missing.jpg"),
])
def test_data_problems_are_two_lines_at_most(tmp_path, make, problem):
    root = tmp_path / "camvid"
    make(root)
    with pytest.raises(FileNotFoundError) as err:
        build_dataset("camvid", "val", root=root)
    first, layout = str(err.value).split("\n")
    assert first == f"camvid val: {problem.format(root=root)}"
    assert layout.startswith(f"expected layout under {root}: <root>/ (default: $ALGM_BENCH_DATA/camvid, else <cache>/data/camvid")


def test_predict_refuses_a_fifo_and_a_device_as_not_regular_files(tmp_path, capsys):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    for image, kind in ((fifo, "a FIFO"), ("/dev/zero", "a character device")):
        assert algm.cli.main(["predict", "--image", str(image), "--out", str(tmp_path / "out")]) == 2
        assert capsys.readouterr().err == (f"algm-bench predict: error: {image}: not a regular file ({kind}); "
                                           f"the image must be a file (reading this could block or never end)\n")
    assert not (tmp_path / "out").exists()


def test_bench_refuses_an_unknown_fresh_method(tmp_path, capsys):
    assert algm.cli.main(["bench", "--flops-only", "--fresh-method", "bogus", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("algm-bench bench: error: --fresh-method bogus: suite camvid has no such method; "
                          "its methods: none, algm") and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_finetune_refuses_a_file_as_out_before_training(tmp_path):
    from algm.training.finetune import FinetuneConfig, finetune

    out = tmp_path / "a-file"
    out.write_text("mine")
    with pytest.raises(NotADirectoryError, match=f"^{out} exists and is not a folder"):
        finetune(None, FinetuneConfig(), out)
    assert out.read_text() == "mine"


def test_the_working_directory_never_shadows_the_packages(tmp_path):
    for name in ("suites", "baselines"):  # would stop the run if imported
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("raise SystemExit('shadowed')\n")
    result = subprocess.run([sys.executable, "-m", "algm.cli", "fetch", "--dataset", "ade20k", "--manifest",
                             str(tmp_path / "none.yaml")], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2
    assert result.stderr == f"algm-bench fetch: error: manifest {tmp_path / 'none.yaml'} not found\n"


def test_a_shadowing_package_already_imported_stops_the_cli(tmp_path, monkeypatch, capsys):
    fake = types.ModuleType("suites")
    fake.__path__ = [str(tmp_path / "suites")]
    monkeypatch.setitem(sys.modules, "suites", fake)
    assert algm.cli.main(["fetch", "--dataset", "ade20k"]) == 2
    assert capsys.readouterr().err.startswith(f"algm-bench: error: the package 'suites' was imported from "
                                              f"{tmp_path / 'suites'} instead of ")


def test_workers_are_launched_without_the_working_directory_on_their_path(monkeypatch):
    seen = {}
    monkeypatch.delenv("PYTHONSAFEPATH", raising=False)
    monkeypatch.setattr(subprocess, "run", lambda cmd: seen.update(cmd=cmd, safe=os.environ.get("PYTHONSAFEPATH"))
                        or types.SimpleNamespace(returncode=0))
    assert distributed.launch(2, ["eval", "--nproc", "2"]) == 0
    assert seen == {"cmd": seen["cmd"], "safe": "1"} and seen["cmd"][-2:] == ["algm.cli", "eval"]
    assert "PYTHONSAFEPATH" not in os.environ  # this process's own environment is left as it was
