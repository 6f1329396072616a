"""``bench --checkpoint FILE --mmseg-config CONFIG``: a suite on an mmsegmentation Segmenter,
converted once into the cache."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from algm.cli import main
from algm.files import file_sha256
from algm.weights.checkpoint import read_variant
from run_cli import run_json
from test_mmseg import write_mmseg

pytestmark = pytest.mark.usefixtures("one_thread", "isolated_cache")

SUITE = ("dataset: ade20k\nsplit: val\nbackbones: [vit-s16, vit-ti16]\nflops_images: 2\n"
         "throughput: {batch_sizes: [1], warmup: 0, repeats: 1, contended_retries: 0}\n"
         "methods:\n  none: [{}]\n")


def bench_argv(tmp_path: Path, checkpoint, config, *extra: str) -> list[str]:
    suite = tmp_path / "mini.yaml"
    suite.write_text(SUITE)
    return ["bench", "--dataset", str(suite), "--flops-only", "--checkpoint", str(checkpoint),
            "--mmseg-config", str(config), "--out", str(tmp_path / "out"), "--no-progress", *extra]


def test_bench_runs_an_mmseg_checkpoint_converted_once(tmp_path, capsys):
    config, checkpoint, *_ = write_mmseg(tmp_path / "mmseg", dim=192, depth=12, heads=3)  # a ViT-Ti
    argv = bench_argv(tmp_path, checkpoint, config)
    assert main(argv) == 0
    assert "converting the mmseg checkpoint" in capsys.readouterr().err
    rows = pd.read_csv(tmp_path / "out" / "results.csv", dtype={"checkpoint_sha256": str})
    assert list(rows.backbone) == ["vit-ti16"]  # the checkpoint's backbone only, not the suite's vit-s16
    row = rows.iloc[0]
    converted = Path(row.checkpoint)
    assert row.weights == "checkpoint" and row.checkpoint_sha256 == file_sha256(converted)[:12]
    assert converted.parts[-4:] == ("ade20k", "vit-ti16", "none", "checkpoint.pth")
    assert converted.is_relative_to(tmp_path / "cache" / "mmseg")
    source = read_variant(converted.with_name("variant.yml"))["converted_from"]
    assert source == {"mmseg_config": str(config), "checkpoint": str(checkpoint),
                      "checkpoint_sha256": file_sha256(checkpoint)}
    flops = run_json(["flops", "--checkpoint", str(checkpoint), "--mmseg-config", str(config), "--json"], capsys)
    assert row.gflops == pytest.approx(flops["gflops"], rel=1e-9)
    stamp = converted.stat().st_mtime_ns
    assert main([*argv, "--fresh"]) == 0  # measured again, on the conversion already in the cache
    assert "converting" not in capsys.readouterr().err and converted.stat().st_mtime_ns == stamp


def test_bad_mmseg_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    config, checkpoint, *_ = write_mmseg(tmp_path / "mmseg")  # width 64, depth 2: no suite backbone
    missing = tmp_path / "nope.py"
    cases = [
        (bench_argv(tmp_path, checkpoint, missing), f"mmseg config not found: {missing}"),
        (bench_argv(tmp_path, checkpoint, config),
         f"--checkpoint {checkpoint}: its backbone mmseg:segmenter is not in suite mini (vit-s16, vit-ti16)"),
        (bench_argv(tmp_path, checkpoint, config, "--checkpoints", str(tmp_path)),
         "give either --checkpoints DIR or --checkpoint with --mmseg-config, not both"),
        ([a for a in bench_argv(tmp_path, checkpoint, config) if a not in ("--checkpoint", str(checkpoint))],
         "--mmseg-config CONFIG.py describes a --checkpoint FILE.pth: pass both (official checkpoints: "
         "--checkpoints DIR)"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        assert capsys.readouterr().err == f"algm-bench bench: error: {message}\n"
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
