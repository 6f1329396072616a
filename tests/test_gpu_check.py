"""``make gpu-check`` (suites.gpu_check): the tiny CPU run writes the whole result set,
no CUDA with ``--device cuda`` writes nothing, a failed configuration is recorded."""

import csv
import json
import math
import sys
from dataclasses import replace

import pytest
import torch

from algm.data.datasets import resolve_root
from suites import gpu_check

needs_camvid = pytest.mark.skipif(not (resolve_root("camvid") / "val.txt").is_file(),
                                  reason="CamVid val not found (set DATA_ROOT)")
FLOAT_COLUMNS = ("images_per_s", "baseline_images_per_s", "speedup", "gflops", "flop_ratio",
                 "speedup_per_flop_ratio")


def stand_in_cli(out):
    """A quick stand-in for the ADE20K GFLOPs suite (minutes on 2 cores): writes a report."""
    script = ("import pathlib, sys; out = pathlib.Path(sys.argv[1]); (out / 'plots').mkdir(parents=True); "
              "(out / 'table.md').write_text('ade20k'); (out / 'plots' / 'a.png').write_bytes(b'png')")
    return [sys.executable, "-c", script, str(out)]


@needs_camvid
def test_tiny_cpu_run_writes_table_csv_and_machine(tmp_path, monkeypatch):
    tiny = gpu_check.BUDGETS["tiny"]
    monkeypatch.setitem(gpu_check.BUDGETS, "tiny", replace(tiny, ade20k_flops=True))
    monkeypatch.setattr(gpu_check, "ade20k_command", stand_in_cli)
    out = tmp_path / "gc"
    assert gpu_check.main(["--device", "cpu", "--budget", "tiny", "--out", str(out)]) == 0

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    configs = len(tiny.precisions) * len(tiny.batch_kinds) * len(tiny.batch_sizes)
    methods = [m for m, _ in tiny.methods] + [gpu_check.ZERO_COST]
    assert len(rows) == configs * len(methods)
    assert {(r["method"], int(r["batch_size"])) for r in rows} == {(m, b) for m in methods
                                                                   for b in tiny.batch_sizes}
    for r in rows:
        assert all(math.isfinite(float(r[c])) and float(r[c]) > 0 for c in FLOAT_COLUMNS), r
        assert r["error"] == "" and r["device"] == "cpu"
    none = [r for r in rows if r["method"] == "none"]
    assert all(float(r["speedup"]) == 1.0 and float(r["flop_ratio"]) == 1.0 for r in none)
    assert all(float(r["gflops"]) < float(r["baseline_gflops"]) for r in rows if r["method"] == "algm")
    # the zero-cost cut is matched to ALGM's mean GFLOPs: at most those, within one token's worth
    algm = next(float(r["gflops"]) for r in rows if r["method"] == "algm" and r["batch_kind"] == "mixed")
    zero_cost = [r for r in rows if r["method"] == gpu_check.ZERO_COST]
    assert all(float(r["gflops"]) <= algm * (1 + 1e-9) for r in zero_cost)
    assert zero_cost[0]["setting"].startswith("zero-cost (k=")

    table = (out / "table.md").read_text()
    header = "| precision | batch kind | compile | batch | method | GFLOPs | FLOP ratio | im/s |"
    assert header in table and "speed-up ÷ FLOP ratio" in table
    protocol, everything = table.split("## Authors' protocol")[1].split("## All configurations")
    assert protocol.count("\n| ") == 1 + len(methods)  # header + one row per method
    assert everything.count("\n| ") == 1 + len(rows)
    assert "cuda tests: ok" in table and "nan" not in table

    machine = json.loads((out / "machine.json").read_text())
    assert machine["device"] == "cpu" and machine["torch"] == torch.__version__
    assert machine["gpu"] is None and machine["driver"] is None and machine["cuda"] == torch.version.cuda
    assert machine["run"]["budget"]["name"] == "tiny"
    assert machine["run"]["steps"]["cuda tests"]["returncode"] == 0
    assert "skipped" in (out / "logs" / "cuda-tests.log").read_text()  # no GPU here
    assert (out / "ade20k-flops" / "table.md").read_text() == "ade20k"
    assert (out / "ade20k-flops" / "plots" / "a.png").read_bytes() == b"png"
    assert not list(out.rglob(".*.tmp"))  # atomic writes left no temporaries


def test_without_cuda_device_cuda_writes_nothing_and_exits_0(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gc"
    assert gpu_check.main(["--device", "cuda", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and "nothing written" in printed[0]
    assert not out.exists()


def test_failed_configuration_is_recorded_not_fatal(monkeypatch):
    budget = replace(gpu_check.BUDGETS["tiny"], precisions=("fp32",), batch_kinds=("mixed",), batch_sizes=(2,),
                     attainable=None)
    setups = gpu_check.build_setups(budget)
    h, w = budget.window

    def fail(*args, **kwargs):
        raise RuntimeError("out of memory\nsecond line")

    monkeypatch.setattr(gpu_check, "measure_interleaved", fail)
    rows = gpu_check.time_all(setups, torch.zeros(2, 3, h, w), {"none": [2.0], "algm": [1.0]},
                              budget, torch.device("cpu"))
    assert [r["error"] for r in rows] == ["RuntimeError: out of memory"] * 2
    assert all(math.isnan(r["images_per_s"]) for r in rows) and rows[1]["flop_ratio"] == 2.0
    machine = {"gpu": None, "cpu": "x", "device": "cpu", "torch": "t", "cuda": None, "cudnn": None, "driver": None}
    table = gpu_check.render_table(rows, budget, machine, {}, setups)
    assert "| failed |" in table and "## Failed configurations" in table
    late = gpu_check.time_all(setups, torch.zeros(2, 3, h, w), {"none": [2.0], "algm": [1.0]},
                              budget, torch.device("cpu"), deadline=0.0)
    assert all(r["error"].startswith("skipped") for r in late)


def test_full_budget_plan_and_output_name():
    timings = gpu_check.plan(gpu_check.BUDGETS["full"])
    eager = [t for t in timings if not t.compile]
    assert len(eager) == 2 * 2 * 3 and all(len(t.methods) == 6 and t.methods[0] == "none" for t in eager)
    assert all(t.methods[-1] == gpu_check.ZERO_COST for t in eager)
    assert [(t.precision, t.batch_size, t.methods) for t in timings if t.compile] == [
        ("fp32", 32, ("none", "algm"))]
    assert timings[-1].compile  # the compiled timings come last: a passed deadline skips them
    with pytest.raises(ValueError, match="must come first"):
        gpu_check.plan(replace(gpu_check.BUDGETS["full"], compile_methods=("algm", "none")))
    assert any(t.batch_size == 32 and t.batch_kind == "repeated" and t.precision == "fp32" for t in eager)
    with pytest.raises(ValueError, match="attainable names 'cts-learned', not one of"):
        gpu_check.plan(replace(gpu_check.BUDGETS["full"], attainable="cts-learned"))
    assert gpu_check.slug("NVIDIA H200") == "nvidia-h200"
