"""The suite's row cache verifies itself, and a run's reports are replaced as one set."""

from __future__ import annotations

import json
import os
import re

import pytest

import suites.measure
import suites.runner as runner
from algm.cli import main
from test_custom_method import write_ade
from test_reproduce import write_checkpoint


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    write_checkpoint(root / "ade20k" / "vit-s16" / "none", seed=1)
    return root

SUITE = ("dataset: ade20k\nsplit: val\nbackbones: [vit-s16]\n"
         "flops_images: 2\nthroughput: {batch_sizes: [1], warmup: 0, repeats: 1, contended_retries: 0}\n"
         "methods:\n  none: [{}]\n  algm: [{}]\n")


@pytest.fixture
def bench(tmp_path, monkeypatch, checkpoints):
    """``bench(*extra) -> (exit code, measured settings, retimed settings)`` on a tiny suite."""
    monkeypatch.setenv("ALGM_BENCH_CACHE", str(tmp_path / "cache"))
    # A loaded CI machine would flag real timings as contended and have them re-timed;
    # these tests set the flag themselves where they need it.
    monkeypatch.setattr(suites.measure, "CONTENDED_BELOW", 0.0)
    data = write_ade(tmp_path / "data")
    suite = tmp_path / "tiny.yaml"
    suite.write_text(SUITE)
    calls = {"measured": [], "retimed": []}
    measure, retime = runner.measure_row, runner.retime
    monkeypatch.setattr(runner, "measure_row", lambda s, r, o: calls["measured"].append(r.setting.label()) or measure(s, r, o))
    monkeypatch.setattr(runner, "retime", lambda s, r, row, o: calls["retimed"].append(r.setting.label()) or retime(s, r, row, o))

    def run(*extra, out=tmp_path / "out"):
        calls["measured"].clear()
        calls["retimed"].clear()
        code = main(["bench", "--dataset", str(suite), "--data-root", str(data), "--out", str(out),
                     "--checkpoints", str(checkpoints), "--no-progress", *extra])
        return code, list(calls["measured"]), list(calls["retimed"])

    run.rows = tmp_path / "cache" / "rows" / "tiny"
    run.suite = suite
    return run


def row_file(rows_dir, method: str):
    return next(p for p in rows_dir.glob("*.json") if json.loads(p.read_text())["row"]["method"] == method)


def test_cached_rows_are_reused_and_fresh_method_redoes_only_its_rows(bench):
    assert bench() == (0, ["none", "algm"], [])
    assert bench() == (0, [], [])
    assert bench("--fresh-method", "algm") == (0, ["algm"], [])


@pytest.mark.parametrize("damage", [lambda p: os.truncate(p, 50), lambda p: p.write_text("{}"),
                                    lambda p: p.write_text('{"format": "x", "key": "y", "row": {}}')])
def test_a_damaged_row_is_reported_moved_aside_and_measured_again(bench, damage, capsys):
    bench()
    path = row_file(bench.rows, "algm")
    damage(path)
    capsys.readouterr()
    assert bench() == (0, ["algm"], [])
    err = capsys.readouterr().err
    assert str(path) in err and "damaged cached row" in err
    assert path.with_name(path.name + ".bad").is_file()
    assert json.loads(path.read_text())["row"]["method"] == "algm"


def test_a_contended_timing_is_timed_again_not_reused(bench):
    bench()
    path = row_file(bench.rows, "algm")
    entry = json.loads(path.read_text())
    entry["row"]["contended_b1"] = True
    path.write_text(json.dumps(entry))
    code, measured, retimed = bench()
    assert (code, measured, retimed) == (0, [], ["algm"])


def test_rows_record_the_gflops_of_their_timed_batch_and_older_rows_are_timed_again(bench):
    bench()
    none = json.loads(row_file(bench.rows, "none").read_text())["row"]
    assert none["timed_gflops_b1"] == pytest.approx(none["gflops"])  # no reduction: every frame alike
    path = row_file(bench.rows, "algm")
    entry = json.loads(path.read_text())
    assert 0 < entry["row"]["timed_gflops_b1"] < none["gflops"]
    del entry["row"]["timed_gflops_b1"]  # as rows cached by an older version
    path.write_text(json.dumps(entry))
    assert bench() == (0, [], ["algm"])
    assert "timed_gflops_b1" in json.loads(path.read_text())["row"]


def test_a_flops_only_rerun_leaves_no_stale_report(bench, tmp_path):
    out = tmp_path / "out"
    bench()
    (out / "miou_vs_throughput.png").write_bytes(b"stale")  # as a full run with mIoU leaves it
    assert bench("--flops-only")[0] == 0
    assert not (out / "miou_vs_throughput.png").exists()
    assert {p.name for p in out.iterdir()} == {"results.csv", "table.md", "table.tex", "diagnostics.md",
                                              "machine.json", "run.json"}
    assert not list(tmp_path.glob(".out.staging-*"))


def test_an_unwritable_out_fails_before_any_row_runs(bench, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert bench(out=blocker / "out") == (2, [], [])
    assert f"{blocker} is not a writable folder" in capsys.readouterr().err


def test_a_failed_report_write_leaves_the_old_set_intact(bench, tmp_path, monkeypatch):
    """A full disk while the new reports are written: the old report set stays whole."""
    import errno

    import suites.report as report

    out = tmp_path / "out"
    assert bench()[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full_disk(*args):  # table.tex is written after results.csv and table.md
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report, "latex_table", full_disk)
    assert bench()[0] == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not list(tmp_path.glob(".out.staging-*"))


def test_untimed_rows_are_timed_by_the_next_run_and_keep_their_other_figures(bench):
    assert bench("--untimed") == (0, ["none", "algm"], [])
    untimed = json.loads(row_file(bench.rows, "algm").read_text())["row"]
    assert untimed["untimed"] is True and not any(k.startswith("ims_b") for k in untimed)
    assert bench("--untimed") == (0, [], [])  # still a busy machine: nothing is timed
    assert bench() == (0, [], ["none", "algm"])
    timed = json.loads(row_file(bench.rows, "algm").read_text())["row"]
    assert "untimed" not in timed and timed["ims_b1"] > 0 and timed["base_ims_b1"] > 0
    assert {k: timed[k] for k in untimed if k != "untimed"} == {k: v for k, v in untimed.items() if k != "untimed"}
    assert bench() == (0, [], [])


def test_each_methods_first_setting_is_measured_first_and_reported_before_the_sweeps(bench, monkeypatch):
    import suites.report

    bench.suite.write_text(SUITE.replace("algm: [{}]", "algm: [{tau: 0.9}, {}]\n  tome: [{r: 8}, {r: 4}]"))
    partial, tables, write = [], [], suites.report._partial_report

    def spy(rows, planned, suite, out, title, minutes):
        partial.append(([r["setting"] for r in rows], planned))
        write(rows, planned, suite, out, title, minutes)
        tables.append((out / "table.md").read_text())

    monkeypatch.setattr(suites.report, "_partial_report", spy)
    code, measured, _ = bench()
    assert code == 0 and measured == ["none", "algm", "tome(r=8)", "algm(tau=0.9)", "tome(r=4)"]
    assert partial == [(["none", "algm", "tome(r=8)"], 5), (["none", "algm(tau=0.9)", "algm", "tome(r=8)"], 5)]
    assert "(partial: 3 of 5 rows" in tables[0] and "r=8" in tables[0] and "tau=0.9" not in tables[0]
    assert re.search(r"first setting first; \d+\.\d min into the run\)", tables[0])
    out = bench.rows.parents[2] / "out"
    run = json.loads((out / "run.json").read_text())
    assert 0 < run["first_answer_seconds"] < run["wall_seconds"]
    assert (f"Its first complete table (each method's first setting) was written "
            f"{run['first_answer_seconds'] / 60:.1f} min after it started.") in (out / "table.md").read_text()
    assert bench() == (0, [], [])  # all cached: one partial report when the first answers are read
    assert len(partial) == 3 and "partial" not in (bench.rows.parents[2] / "out" / "table.md").read_text()
