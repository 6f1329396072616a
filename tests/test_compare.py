"""``algm-bench compare`` on a tiny ADE20K tree and an official-format ViT-S checkpoint with
random weights (the fixtures of test_reproduce): structure, deltas, formats, errors. No
timing is asserted, only that the speed-ups are the ratios of the timed rates."""

from __future__ import annotations

import csv
import io
import json

import pytest

from algm.cli import main
from test_reproduce import write_ade, write_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread", "isolated_cache")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    base = tmp_path_factory.mktemp("compare")
    write_checkpoint(base / "ckpt", seed=1)
    return {"data": write_ade(base / "data"), "checkpoint": base / "ckpt" / "checkpoint.pth"}


def compare(zoo, *extra) -> list[str]:
    return ["compare", "--checkpoint", str(zoo["checkpoint"]), "--data-root", str(zoo["data"]),
            "--warmup", "0", "--repeats", "1", "--limit", "2", *extra]


def test_json_rows_and_deltas_follow_the_formulas(zoo, capsys):
    assert main(compare(zoo, "--methods", "algm:tau=0.9,tome:r=4", "--batch-sizes", "1,2", "--miou",
                        "--json")) == 0
    out = json.loads(capsys.readouterr().out)
    rows = out["rows"]
    assert [r["method"] for r in rows] == ["none", "algm:tau=0.9", "tome:r=4"]  # none added, first
    assert rows[1]["options"] == {"tau": 0.9} and rows[2]["options"] == {"r": 4}
    assert out["batch_sizes"] == [1, 2] and out["dataset"] == "ade20k" and out["backbone"] == "vit-s16"
    base = rows[0]
    for row in rows:
        assert row["gflops_delta_pct"] == pytest.approx(100 * (row["gflops"] / base["gflops"] - 1))
        for b in (1, 2):
            assert row[f"speedup_b{b}"] == pytest.approx(row[f"images_per_s_b{b}"] / base[f"images_per_s_b{b}"])
        assert 0 <= row["miou_pct"] <= 100
        assert row["miou_delta_pp"] == pytest.approx(row["miou_pct"] - base["miou_pct"])
    assert base["gflops_delta_pct"] == 0 and base["speedup_b1"] == 1 and base["miou_delta_pp"] == 0
    assert rows[2]["gflops"] < base["gflops"]  # ToMe merges 4 tokens per block: fewer GFLOPs


def test_the_table_prints_the_numbers_the_json_holds(zoo, capsys):
    assert main(compare(zoo, "--methods", "none,tome:r=4", "--json")) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert main(compare(zoo, "--methods", "none,tome:r=4")) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[1].split() == ["method", "GFLOPs", "(Δ%)", "speed-up", "b1"]
    cells = lines[3].split()
    assert cells[0] == "tome:r=4"
    gflops, delta = float(cells[1]), float(cells[2].strip("()"))
    assert gflops == pytest.approx(rows[1]["gflops"], abs=0.005)  # GFLOPs do not depend on the run
    base = float(lines[2].split()[1])
    # the printed delta is the formula's on the unrounded GFLOPs: within the rounding of the printed ones
    low, high = 100 * ((gflops - 0.005) / (base + 0.005) - 1), 100 * ((gflops + 0.005) / (base - 0.005) - 1)
    assert low - 0.05 <= delta <= high + 0.05
    assert "algm-bench compare: timing 2 models interleaved at batch 1" in captured.err


def test_csv_has_one_row_per_spec(zoo, capsys):
    assert main(compare(zoo, "--methods", "none,algm", "--csv", "--batch-sizes", "2")) == 0
    captured = capsys.readouterr()
    rows = list(csv.DictReader(io.StringIO(captured.out)))
    assert [r["method"] for r in rows] == ["none", "algm"]
    assert {"gflops", "gflops_delta_pct", "images_per_s_b2", "speedup_b2"} <= set(rows[0])
    assert float(rows[1]["speedup_b2"]) == pytest.approx(
        float(rows[1]["images_per_s_b2"]) / float(rows[0]["images_per_s_b2"]))
    assert json.loads(rows[1]["settings"])["tau"] > 0  # structured cells are JSON
    assert captured.err == ""  # --csv: no progress lines


@pytest.mark.parametrize("spec,message", [
    ("none,bogus", "argument --methods: unknown method 'bogus'"),
    ("tome:x=1", "argument --methods: tome:x=1: method 'tome' has no option 'x'; its options: r,"),
    ("tome:r=abc", "argument --methods: tome:r=abc: argument --r: invalid int value: 'abc'"),
    ("algm:tau", "argument --methods: algm:tau: tau takes a value: give tau=VALUE"),
])
def test_bad_specs_are_one_line_and_exit_2(spec, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["compare", "--methods", spec])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_a_missing_data_root_fails_before_any_model(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main(["compare", "--methods", "none,tome", "--data-root", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"expected layout under {missing}" in err and "building the model" not in err
