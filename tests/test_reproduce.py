"""Reproducing the paper end to end on fixtures: a tiny ADE20K tree and two official-format
ViT-S checkpoints with 150 classes and random weights (a "Segmenter" and an
"ALGM-trained" one), through every command and a suite."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from algm.cli import main
from algm.config import DecoderConfig, get_backbone
from algm.model.segmenter import build_segmenter

WINDOW, STRIDE = 64, 48
VARIANT = """\
dataset_kwargs:
  dataset: {dataset}
  image_size: 64
  crop_size: 64
inference_kwargs:
  im_size: 64
  window_size: {window}
  window_stride: {stride}
net_kwargs:
  backbone: vit_small_patch16_384
  d_model: 384
  decoder:
    name: mask_transformer
    n_cls: {n_cls}
    n_layers: 2
  distilled: false
  image_size: !!python/tuple
  - {window}
  - {window}
  n_cls: {n_cls}
  n_heads: 6
  n_layers: 12
  patch_size: 16
"""


def write_checkpoint(folder: Path, seed: int, dataset: str = "ade20k", n_cls: int = 150) -> Path:
    """An official-format checkpoint.pth + variant.yml of a ViT-S Segmenter, random weights."""
    torch.manual_seed(seed)
    cfg = get_backbone("vit-s16").with_pos_grid((WINDOW // 16, WINDOW // 16))
    model = build_segmenter(cfg, n_cls, DecoderConfig("mask"))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("method.")}
    state["encoder.head.weight"] = torch.zeros(1000, 384)  # Segmenter keeps the unused classifier
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state, "epoch": 63}, folder / "checkpoint.pth")
    (folder / "variant.yml").write_text(VARIANT.format(dataset=dataset, window=WINDOW, stride=STRIDE, n_cls=n_cls))
    return folder / "checkpoint.pth"


def write_ade(root: Path, n: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for folder in ("training", "validation"):
        for i in range(n):
            stem = f"ADE_{folder[:3]}_{i:08d}"
            for sub, array, suffix in (("images", rng.integers(0, 256, (64, 80, 3), dtype=np.uint8), "jpg"),
                                       ("annotations", rng.integers(0, 151, (64, 80), dtype=np.uint8), "png")):
                path = root / "ADEChallengeData2016" / sub / folder / f"{stem}.{suffix}"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(path)
    return root


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    base = tmp_path_factory.mktemp("reproduce")
    ckpts = base / "checkpoints"
    write_checkpoint(ckpts / "ade20k" / "vit-s16" / "none", seed=1)
    write_checkpoint(ckpts / "ade20k" / "vit-s16" / "algm", seed=2)
    return {"checkpoints": ckpts, "data": write_ade(base / "data"), "base": base,
            "none": ckpts / "ade20k" / "vit-s16" / "none" / "checkpoint.pth"}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ALGM_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DATA_ROOT", raising=False)
    monkeypatch.delenv("ALGM_BENCH_CHECKPOINTS", raising=False)


def run_json(argv, capsys) -> dict:
    assert main(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_commands_take_everything_from_the_checkpoint(zoo, capsys):
    common = ["--checkpoint", str(zoo["none"]), "--data-root", str(zoo["data"]), "--json"]
    ev = run_json(["eval", *common, "--method", "algm", "--no-progress", "--window-batch-size", "2"], capsys)
    assert ev["dataset"] == "ade20k" and ev["backbone"] == "vit-s16" and ev["images"] == 2
    assert ev["window"] == [WINDOW, WINDOW] and ev["stride"] == [STRIDE, STRIDE]
    assert ev["settings"]["tau"] == 0.88  # the paper's ViT-S / ADE20K tau: the backbone is known
    assert np.isfinite(ev["miou"]) and ev["window_batch_size"] == 2
    fl = run_json(["flops", *common, "--method", "algm", "--limit", "2"], capsys)
    assert fl["backbone"] == "vit-s16" and fl["crop"] == [WINDOW, WINDOW] and fl["images"] == 2
    tp = run_json(["throughput", *common, "--method", "algm", "--warmup", "0", "--repeats", "1"], capsys)
    assert tp["images_per_s"] > 0
    first = run_json(["flops", *common, "--method", "algm", "--limit", "1"], capsys)
    assert tp["gflops"] == pytest.approx(first["gflops"])  # the timed batch is the first frame


@pytest.mark.parametrize("argv,message", [
    (["eval", "--dataset", "cityscapes"], "dataset cityscapes disagrees with"),
    (["eval", "--backbone", "vit-b16"], "backbone vit-b16 disagrees with"),
])
def test_a_disagreeing_name_is_an_error_naming_both(zoo, argv, message, capsys):
    assert main([*argv, "--checkpoint", str(zoo["none"]), "--data-root", str(zoo["data"])]) == 2
    err = capsys.readouterr().err
    assert message in err and "variant.yml" in err and err.count("\n") == 1


def test_the_suite_reports_every_backbone_with_checkpoints(zoo, tmp_path, capsys):
    suite = tmp_path / "mini.yaml"
    suite.write_text(
        "dataset: ade20k\nsplit: val\nbackbones: [vit-s16, vit-b16]\nflops_images: 2\n"
        "window_batch_size: 2\nthroughput: {batch_sizes: [1], warmup: 0, repeats: 1, contended_retries: 0, "
        "breakdown: true}\n"
        "methods:\n  none: [{}]\n  algm: [{}]\n"
        "published:\n  vit-s16: {none: {gflops: 38.6, miou: 45.3}, algm: {gflops: 26.3, miou: 46.4, speedup: 1.433}}\n")
    out = tmp_path / "out"
    assert main(["bench", "--dataset", str(suite), "--data-root", str(zoo["data"]),
                 "--checkpoints", str(zoo["checkpoints"]), "--out", str(out), "--no-progress"]) == 0
    df = pd.read_csv(out / "results.csv")
    s16 = df[df.backbone == "vit-s16"]
    assert len(s16) == 3  # none, algm off the shelf, algm trained with the method
    assert (s16.miou_pct.notna() | s16.miou_trained_pct.notna()).all()  # each its own column
    trained = s16[s16.trained_with_method.astype(bool)]
    off = s16[~s16.trained_with_method.astype(bool)]
    assert len(trained) == 1 and trained.method.item() == "algm"
    assert trained.checkpoint_sha256.item() != off.checkpoint_sha256.iloc[0]
    assert (s16.window_batch_size == 2).all() and (s16.stride == f"{STRIDE}x{STRIDE}").all()
    # the baseline GFLOPs are those of `flops --checkpoint`
    fl = run_json(["flops", "--checkpoint", str(zoo["none"]), "--json"], capsys)
    assert off[off.method == "none"].gflops.item() == pytest.approx(fl["gflops"], rel=1e-9)
    # vit-b16 has no checkpoint: GFLOPs only, and the table says which file was missing
    b16 = df[df.backbone == "vit-b16"]
    assert len(b16) == 2 and b16.miou_pct.isna().all() and "images_per_s_b1" in df and b16.images_per_s_b1.isna().all()
    table = (out / "table.md").read_text()
    diagnostics = (out / "diagnostics.md").read_text()
    assert "none/checkpoint.pth" in diagnostics and "algm/checkpoint.pth" in diagnostics
    assert "trained with the method" in diagnostics and ", trained model" in table
    assert str(zoo["checkpoints"] / "ade20k" / "vit-b16" / "none" / "checkpoint.pth") in table
    # the method's own share of the forward, and the bound the fixed stages set
    assert (off[off.method == "none"].overhead_pct == 0).all()
    algm = off[off.method == "algm"].overhead_pct.item()
    assert 0 < algm < 100
    assert ((s16.fixed_pct > 0) & (s16.fixed_pct < 100)).all()
    assert "method overhead %" in diagnostics and "speed-up bound" in diagnostics
    reproduction = (out / "reproduction.md").read_text()
    assert "| vit-s16 | algm |" in reproduction and "speed-up b1" in reproduction


def test_bad_checkpoints_fail_before_anything_is_written(zoo, tmp_path, capsys):
    bad = tmp_path / "bad"
    write_checkpoint(bad / "ade20k" / "vit-s16" / "none", seed=3, dataset="cityscapes")
    out = tmp_path / "out"
    argv = ["bench", "--dataset", "ade20k", "--backbones", "vit-s16", "--data-root", str(zoo["data"]),
            "--out", str(out), "--no-progress"]
    assert main([*argv, "--checkpoints", str(bad)]) == 2
    assert "dataset ade20k disagrees with" in capsys.readouterr().err and not out.exists()
    write_checkpoint(bad / "ade20k" / "vit-s16" / "none", seed=3, n_cls=19)
    assert main([*argv, "--checkpoints", str(bad)]) == 2
    assert "predicts 19 classes but ade20k has 150" in capsys.readouterr().err and not out.exists()
    (bad / "ade20k" / "vit-s16" / "none" / "variant.yml").unlink()
    assert main([*argv, "--checkpoints", str(bad)]) == 2
    assert "variant.yml" in capsys.readouterr().err and not out.exists()
    assert main(["eval", "--checkpoint", str(zoo["none"]), "--data-root", str(tmp_path / "nowhere")]) == 2
    assert "ADEChallengeData2016" in capsys.readouterr().err


def test_batched_rows_measure_mixed_batches(tmp_path):
    """``batch: 2`` rows measure tokens, GFLOPs and mIoU on the seeded mixed batches:
    per-image merging keeps fewer tokens than the authors' batch minimum, and exactly
    what the same images keep alone (the unbatched row over the same 5 images), with
    the same mIoU; padding makes its GFLOPs no less than alone, and no more than
    batch_min's (the padded length is at most batch_min's)."""
    data = write_ade(tmp_path / "data", n=5)
    write_checkpoint(tmp_path / "checkpoints" / "ade20k" / "vit-s16" / "none", seed=1)
    suite = tmp_path / "batched.yaml"
    suite.write_text(
        "dataset: ade20k\nsplit: val\nbackbones: [vit-s16]\nflops_images: 5\n"
        "throughput: {batch_sizes: [1], warmup: 0, repeats: 1, contended_retries: 0}\n"
        "methods:\n  none: [{}]\n  algm:\n    - {tau: 0.5, batch_policy: per_image}\n"
        "    - {tau: 0.5, batch: 2}\n    - {tau: 0.5, batch: 2, batch_policy: per_image}\n")
    out = tmp_path / "out"
    assert main(["bench", "--dataset", str(suite), "--data-root", str(data), "--checkpoints",
                 str(tmp_path / "checkpoints"), "--out", str(out), "--no-progress"]) == 0
    df = pd.read_csv(out / "results.csv").set_index("setting")
    alone, authors, own = (df.loc[f"algm({s}tau=0.5)"] for s in
                           ("batch_policy=per_image, ", "batch=2, ", "batch=2, batch_policy=per_image, "))
    assert own.tokens_kept_pct < authors.tokens_kept_pct
    assert own.tokens_per_layer == alone.tokens_per_layer and own.miou_pct == pytest.approx(alone.miou_pct, abs=1e-9)
    assert alone.gflops <= own.gflops <= authors.gflops and own.gflops_images == 5
    assert np.isnan(alone.images_per_s_b2) and min(authors.images_per_s_b1, authors.images_per_s_b2,
                                                   authors.baseline_images_per_s_b2) > 0
    table = (out / "table.md").read_text()
    assert "| tau=0.5, batch_policy=per_image, batch=2 |" in table and "## Batch 2" in (out / "diagnostics.md").read_text()
    assert "Rows with batch=N (N = 2): tokens kept, GFLOPs and mIoU on mixed batches" in table
