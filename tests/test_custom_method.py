"""A method written in one file (the README's example), registered from a test module,
runs from the command line, through a suite and in pictures, with no other file edited."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from algm.cli import main
from test_readme import readme_method

COMMON = ["--backbone", "vit-ti16", "--dataset", "ade20k", "--crop", "64"]


def write_ade(root, n: int = 3):
    """A tiny ADE20K tree (64 x 80 frames, random labels 0..150)."""
    rng = np.random.default_rng(0)
    for folder in ("training", "validation"):
        for i in range(n):
            stem = f"ADE_{folder[:3]}_{i:08d}"
            for sub, array in (("images", rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)),
                               ("annotations", rng.integers(0, 151, (64, 80), dtype=np.uint8))):
                path = root / "ADEChallengeData2016" / sub / folder / f"{stem}.{'jpg' if sub == 'images' else 'png'}"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(path)
    return root


@pytest.fixture
def custom(tmp_path, monkeypatch, isolated_registry):
    monkeypatch.setenv("ALGM_BENCH_CACHE", str(tmp_path / "cache"))
    readme_method()  # defining the class registers it
    assert "merge-one-pair" in isolated_registry
    return write_ade(tmp_path / "data")


def run_json(argv, capsys) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_flops_from_the_command_line(custom, capsys):
    base = run_json(["flops", *COMMON, "--json"], capsys)
    mine = run_json(["flops", *COMMON, "--method", "merge-one-pair", "--layer", "1",
                     "--data-root", str(custom), "--limit", "2", "--json"], capsys)
    assert mine["settings"] == {"layer": 1} and mine["images"] == 2
    assert mine["gflops"] < base["gflops"]


def test_a_suite_runs_it(custom, tmp_path, capsys):
    suite = tmp_path / "mine.yaml"
    suite.write_text(
        "dataset: ade20k\nsplit: val\nbackbones: [vit-ti16]\nwindows: {vit-ti16: [64, 64]}\n"
        "flops_images: 2\nthroughput: {batch_sizes: [1], warmup: 1, repeats: 1, contended_retries: 0}\n"
        "methods:\n  none: [{}]\n  merge-one-pair: [{layer: 1}]\n")
    out = tmp_path / "out"
    assert main(["bench", "--dataset", str(suite), "--data-root", str(custom), "--out", str(out),
                 "--no-progress"]) == 0
    rows = pd.read_csv(out / "results.csv").set_index("method")
    assert rows.loc["merge-one-pair", "gflops"] < rows.loc["none", "gflops"]
    tokens = json.loads(rows.loc["merge-one-pair", "tokens_per_layer"].replace("'", '"'))
    assert tokens[:3] == [17, 16, 16]  # cls + 16 patches, one pair merged after block 1
    assert "merge-one-pair" in (out / "table.md").read_text()


def test_pictures_show_it(custom, tmp_path):
    from algm.build import make_setup
    from algm.pictures.predict import predict, read_image

    image = custom / "ADEChallengeData2016" / "images" / "validation" / "ADE_val_00000000.jpg"
    out = tmp_path / "pictures"
    assert main(["predict", "--image", str(image), *COMMON, "--method", "merge-one-pair",
                 "--layer", "1", "--out", str(out)]) == 0
    assert (out / "ADE_val_00000000_tokens.png").is_file()
    assert main(["compare-methods", "--image", str(image), *COMMON, "--methods", "none",
                 "merge-one-pair", "--out", str(tmp_path / "compare.png")]) == 0
    assert (tmp_path / "compare.png").is_file()
    setup = make_setup("vit-ti16", "ade20k", "merge-one-pair", window=(64, 64), layer=1)
    pred = predict(setup.model.eval(), read_image(image), setup.window)
    assert pred.n_tokens == 15 and len(pred.token_ids()) == 15
    assert setup.model.method.label() == "merge-one-pair (layer=1)"
