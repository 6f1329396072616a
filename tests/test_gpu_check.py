"""``make gpu-check`` (suites.gpu_check): the tiny CPU run writes the whole result set for
whatever the registry holds, in-process; no CUDA with ``--device cuda`` writes nothing; a
failed or late configuration is recorded, not fatal."""

import csv
import json
import math
import subprocess
from dataclasses import dataclass, replace

import pytest
import torch

import algm.methods
from algm.data.datasets import resolve_root
from algm.reduction import TokenReduction
from suites import cuda_checks, gpu_check
from suites.cuda_checks import build_registered

needs_camvid = pytest.mark.skipif(not (resolve_root("camvid") / "val.txt").is_file(),
                                  reason="CamVid val not found (set DATA_ROOT)")
FLOAT_COLUMNS = ("images_per_s", "baseline_images_per_s", "speedup", "gflops", "flop_ratio",
                 "speedup_per_flop_ratio")


class NeedsPart(TokenReduction):
    """A method that cannot be built without a trained part, as a newly added one may be."""

    name = "needs-part"

    @dataclass(frozen=True)
    class Config:
        pass

    @classmethod
    def from_config(cls, config, backbone, dataset):
        raise FileNotFoundError("needs-part: its trained part is missing\nsecond line")


@pytest.fixture
def registry_with_unbuildable(monkeypatch):
    """The registry with ``needs-part`` registered and listed second where gpu-check reads
    the registry (so the tiny budget's first methods hold it)."""
    real = algm.methods.methods()
    names = list(real)
    ordered = {names[0]: real[names[0]], NeedsPart.name: NeedsPart, **{n: real[n] for n in names[1:]}}
    monkeypatch.setitem(algm.methods._REGISTRY, NeedsPart.name, NeedsPart)
    for module in (gpu_check, cuda_checks):
        monkeypatch.setattr(module, "methods", lambda: dict(ordered))
    return ordered


def no_subprocess(*args, **kwargs):
    raise AssertionError(f"gpu-check started a subprocess: {args}")


@needs_camvid
def test_tiny_cpu_run_writes_table_csv_and_machine(tmp_path, monkeypatch, registry_with_unbuildable):
    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    monkeypatch.setattr(subprocess, "run", no_subprocess)
    tiny = gpu_check.BUDGETS["tiny"]
    out = tmp_path / "gc"
    assert gpu_check.main(["--device", "cpu", "--budget", "tiny", "--out", str(out)]) == 0

    chosen = gpu_check.chosen_methods(tiny)
    assert chosen[:2] == ["none", "needs-part"] and tiny.reference in chosen
    built = [m for m in chosen if m != "needs-part"]
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    plan = gpu_check.plan(tiny)
    expected = []
    for t in plan:  # every built method (or none and the reference), then the zero-cost cut
        names = [m for m in built if not t.reference_only or m in ("none", tiny.reference)]
        expected += [(t.model_set.name, t.protocol.name, t.batch_size, m) for m in names + [gpu_check.ZERO_COST]]
    assert [(r["set"], r["protocol"], int(r["batch_size"]), r["method"]) for r in rows] == expected
    assert all(r["error"] == "" and r["batch_kind"] == "repeated" for r in rows)

    flash = [r for r in rows if r["protocol"] == "bf16-flash"]
    assert flash and all(r["sdpa_kernel"] == "unavailable" and r["images_per_s"] == "nan" for r in flash)
    for r in (r for r in rows if r["protocol"] != "bf16-flash"):
        assert all(math.isfinite(float(r[c])) and float(r[c]) > 0 for c in FLOAT_COLUMNS), r
        assert r["device"] == "cpu" and r["sdpa_kernel"] in ("flash-cpu", "math", "efficient"), r
    assert {r["sdpa_kernel"] for r in rows if r["protocol"] == "fp32-no-flash"} == {"math"}
    assert all(float(r["speedup"]) == 1.0 for r in rows if r["method"] == "none" and r["protocol"] != "bf16-flash")
    for r in rows:  # the zero-cost cut is matched to the reference's GFLOPs: at most those
        if r["method"] == gpu_check.ZERO_COST:
            reference = next(x for x in rows if x["set"] == r["set"] and x["method"] == tiny.reference)
            assert float(r["gflops"]) <= float(reference["gflops"]) * (1 + 1e-9)
            assert r["setting"].startswith("zero-cost (k=")

    machine = json.loads((out / "machine.json").read_text())
    assert machine["device"] == "cpu" and machine["torch"] == torch.__version__ and machine["gpu"] is None
    assert machine["cuda"] == torch.version.cuda and machine["sdpa"]["default_kernel"]["fp32"] == "flash-cpu"
    run = machine["run"]
    assert run["budget"]["name"] == "tiny" and run["methods"] == chosen
    assert run["skipped_methods"]["needs-part"] == "FileNotFoundError: needs-part: its trained part is missing"
    assert all(why.startswith("not in budget tiny") for m, why in run["skipped_methods"].items()
               if m in registry_with_unbuildable and m not in chosen)
    checks = {c["name"]: c["status"] for c in run["checks"]}
    assert checks["forward on cpu equals cpu: none fp32"] == "passed"
    assert checks[f"autocast bf16 forward: {tiny.reference}"] == "passed"
    assert checks["cuda-event timing: finite rates, settings restored"] == "skipped"
    assert set(checks.values()) == {"passed", "skipped"}
    assert len(checks) == len(built) * 2 + 2  # forward and autocast per method, two CUDA-only

    table = (out / "table.md").read_text()
    assert "## Methods skipped" in table and "- needs-part: FileNotFoundError" in table
    assert "- passed: forward on cpu equals cpu: none fp32" in table and "nan" not in table
    assert table.count("\n### ") == len({(t.model_set.name, t.protocol.name) for t in plan})
    assert "speed-up ÷ FLOP ratio" in table and "| SDPA kernel |" in table
    assert not (out / "ade20k-flops").exists()  # not in the tiny budget
    assert not list(out.rglob(".*.tmp"))  # atomic writes left no temporaries


def test_without_cuda_device_cuda_writes_nothing_and_exits_0(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gc"
    assert gpu_check.main(["--device", "cuda", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and "nothing written" in printed[0]
    assert not out.exists()


def tiny_lineup() -> tuple[gpu_check.Budget, dict]:
    """A one-configuration budget on the tiny camvid set, with zero frames (no data needed)."""
    tiny = gpu_check.BUDGETS["tiny"]
    stage = replace(tiny.stages[0], batch_sizes=(2,), zero_cost=False)
    budget = replace(tiny, stages=(stage,))
    ms = stage.sets[0]
    setups, skipped = build_registered(ms.backbone, ms.dataset, ms.window, False, gpu_check.chosen_methods(budget))
    lineup = gpu_check.Lineup(ms, setups, torch.zeros(1, 3, *ms.window), skipped, on_device=True,
                              gflops={name: 2.0 if name == "none" else 1.0 for name in setups})
    return budget, {ms.name: lineup}


def test_failed_or_late_configuration_is_recorded_not_fatal(monkeypatch):
    budget, lineups = tiny_lineup()

    def fail(*args, **kwargs):
        raise RuntimeError("out of memory\nsecond line")

    monkeypatch.setattr(gpu_check, "measure_interleaved", fail)
    rows = gpu_check.time_all(lineups, budget, torch.device("cpu"))
    assert rows and [r["error"] for r in rows] == ["RuntimeError: out of memory"] * len(rows)
    assert all(math.isnan(r["images_per_s"]) for r in rows) and rows[-1]["flop_ratio"] == 2.0
    machine = {"gpu": None, "cpu": "x", "device": "cpu", "torch": "t", "cuda": None, "cudnn": None,
               "driver": None, "sdpa": {"default_kernel": {}}}
    table = gpu_check.render_table(rows, budget, machine, [], {}, "ok")
    assert "| failed |" in table and "## Failed or skipped configurations" in table
    late = gpu_check.time_all(lineups, budget, torch.device("cpu"), deadline=0.0)
    assert late and all(r["error"] == gpu_check.DEADLINE for r in late)
    assert "| skipped |" in gpu_check.render_table(late, budget, machine, [], {}, "ok")


def test_sdpa_backend_is_observed_or_unavailable():
    def attend(x):
        return torch.nn.functional.scaled_dot_product_attention(x, x, x)

    x = torch.randn(1, 2, 8, 4)
    assert gpu_check.observed_backend(attend, x, gpu_check.AUTHORS) == "flash-cpu"
    assert gpu_check.observed_backend(attend, x, gpu_check.NO_FLASH) == "math"
    assert gpu_check.observed_backend(attend, x, gpu_check.FLASH) == "unavailable"  # CPU: no FlashAttention


def test_full_budget_order_and_coverage():
    full = gpu_check.BUDGETS["full"]
    timings = gpu_check.plan(full)
    assert gpu_check.chosen_methods(full) == list(algm.methods.methods())  # every registered method
    camvid = gpu_check.CAMVID_S14
    first = [(t.model_set, t.protocol, t.batch_size) for t in timings[:2]]
    assert first == [(camvid, gpu_check.AUTHORS, 1), (camvid, gpu_check.AUTHORS, 32)]
    # the authors' and MPM's protocols at b1, 8 and 32, on ViT-S/14 CamVid and every 512 x 512 shape
    for ms in (camvid, *gpu_check.SHAPES_512):
        for protocol in (gpu_check.AUTHORS, gpu_check.NO_FLASH, gpu_check.FLASH):
            assert {t.batch_size for t in timings if (t.model_set, t.protocol) == (ms, protocol)} == {1, 8, 32}
            assert not any(t.reference_only for t in timings if (t.model_set, t.protocol) == (ms, protocol))
    assert [b.split("-")[-1] for b in (ms.backbone for ms in gpu_check.SHAPES_512)] == ["ti16", "s16", "b16", "l16"]
    assert all(ms.window == (512, 512) and not ms.pretrained for ms in gpu_check.SHAPES_512)
    # bf16 and torch.compile for none and the reference only, compile last
    extra = [t for t in timings if t.reference_only]
    assert {t.protocol.precision for t in extra} == {"bf16", "fp32"} and timings[-1].protocol.compile
    assert all(t.reference_only for t in timings if t.protocol.compile or t.protocol == gpu_check.BF16)
    assert full.ade20k_backbones is None and full.deadline_s <= 8 * 60
    assert gpu_check.slug("NVIDIA H200") == "nvidia-h200"


def test_the_reference_method_is_read_from_the_camvid_suite(tmp_path, monkeypatch):
    """The method the zero-cost cut matches is data: the first reduced method of the
    CamVid suite, not a name in the code."""
    import yaml

    raw = yaml.safe_load(cuda_checks.REFERENCE_SUITE.read_text())
    assert cuda_checks.default_reference() == next(name for name in raw["methods"] if name != "none")
    assert gpu_check.BUDGETS["full"].reference == cuda_checks.default_reference()
    suite = tmp_path / "suite.yaml"
    monkeypatch.setattr(cuda_checks, "REFERENCE_SUITE", suite)
    suite.write_text("dataset: camvid\nmethods:\n  none: [{}]\n  mine: [{r: 8}]\n  other: [{}]\n")
    assert cuda_checks.default_reference() == "mine"
    suite.write_text("dataset: camvid\nmethods:\n  none: [{}]\n")
    with pytest.raises(ValueError, match=rf"^{suite}: methods: names no method besides none \(the reference is "
                                         r"the first\)$"):
        cuda_checks.default_reference()
