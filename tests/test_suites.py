"""Suite definitions, row caching keys and reports."""

import math

import pandas as pd
import pytest

from suites.definition import Setting, load_suite
from suites.report import markdown_table, latex_table, reproduction_table, to_frame, write_reports
from suites.runner import RunOptions, row_key


@pytest.mark.parametrize("name", ["camvid", "ade20k", "cityscapes", "pascal", "cocostuff"])
def test_every_shipped_suite_loads(name):
    suite = load_suite(name)
    assert suite.dataset == name
    assert any(s.method == "none" for s in suite.settings)


def test_suite_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="known suites: .*camvid"):
        load_suite("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: camvid\nbackbones: [vit-s14]\nmethods: {magic: [{}]}\n")
    with pytest.raises(ValueError, match="bad.yaml.*unknown method 'magic'"):
        load_suite(str(bad))
    bad.write_text("dataset: camvid\nbackbones: [vit-xxl]\nmethods: {none: [{}]}\n")
    with pytest.raises(ValueError, match="unknown backbone 'vit-xxl'"):
        load_suite(str(bad))


def test_row_key_changes_with_every_knob():
    suite = load_suite("camvid")
    opts = RunOptions()
    a = row_key(suite, "vit-s14", Setting("algm", {"tau": 0.9}), opts)
    assert a == row_key(suite, "vit-s14", Setting("algm", {"tau": 0.9}), opts)
    assert a != row_key(suite, "vit-s14", Setting("algm", {"tau": 0.91}), opts)
    assert a != row_key(suite, "vit-s14", Setting("algm", {"tau": 0.9}, train=True), opts)
    assert a != row_key(suite, "vit-s14", Setting("algm", {"tau": 0.9}), RunOptions(device="cuda"))


ROWS = [
    dict(backbone="vit-s14", method="none", setting="none", gflops=40.0, ims_b1=10.0, ims_b8=12.0,
         miou=60.0, miou_trained=60.0, tokens_kept_pct=100.0),
    dict(backbone="vit-s14", method="algm", setting="algm(tau=0.9)", gflops=30.0, ims_b1=12.0,
         ims_b8=15.0, miou=58.0, miou_trained=59.5, tokens_kept_pct=60.0),
    dict(backbone="vit-s14", method="tome", setting="tome(r=8)", gflops=20.0, ims_b1=11.0,
         ims_b8=16.0, miou=55.0, miou_trained=math.nan, tokens_kept_pct=40.0),
]


def test_deltas_are_relative_to_the_backbone_baseline():
    df = to_frame(ROWS).set_index("setting")
    assert df.loc["algm(tau=0.9)", "d_gflops"] == pytest.approx(-25.0)
    assert df.loc["algm(tau=0.9)", "speedup_b1"] == pytest.approx(1.2)
    assert df.loc["tome(r=8)", "speedup_b8"] == pytest.approx(16 / 12)
    assert df.loc["algm(tau=0.9)", "d_miou"] == pytest.approx(-0.5)
    assert df.loc["tome(r=8)", "d_miou"] == pytest.approx(-5.0)


def test_tables_mark_the_best_per_column():
    md = markdown_table(to_frame(ROWS))
    assert "**20.00**" in md  # lowest GFLOPs
    assert "**12.00**" in md  # fastest at batch 1
    assert "**60.0**" in md   # best mIoU
    assert md.count("\n") == 2 + len(ROWS)
    tex = latex_table(to_frame(ROWS))
    assert r"\textbf{20.00}" in tex and r"\toprule" in tex and "$\\Delta$" in tex


def test_write_reports_creates_every_file(tmp_path):
    written = write_reports(ROWS, tmp_path, {"vit-s14": {"none": 40.0}}, "test")
    names = {p.name for p in written}
    assert names == {"results.csv", "table.md", "table.tex", "miou_vs_gflops.png",
                     "miou_vs_throughput.png", "reproduction.md"}
    assert len(pd.read_csv(tmp_path / "results.csv")) == 3
    assert "| vit-s14 | none | 40.00 | 40.0 | 1.0000 |" in (tmp_path / "reproduction.md").read_text()


def test_reproduction_table_skips_rows_without_published_value():
    text = reproduction_table(to_frame(ROWS), {"vit-s14": {"algm(tau=0.9)": 26.3}})
    assert "| vit-s14 | algm(tau=0.9) | 30.00 | 26.3 | 1.1407 |" in text
    assert "tome" not in text
