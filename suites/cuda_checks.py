"""The CUDA checks, as plain functions: ``tests/test_cuda.py`` wraps them in pytest and
``make gpu-check`` (:mod:`suites.gpu_check`) runs them in-process, so an installed
package (which has no ``tests/``) can check its GPU paths too.

Each ``check_*`` function takes the device to check and returns None or raises an
AssertionError that says what differed. They use whatever the method registry holds
(:func:`algm.methods.methods`): no method is named here. :func:`build_registered`
builds every registered method at its defaults plus its ``untrained_options`` (random
heads and the like: enough for timing and GFLOPs) and reports the ones that still
cannot be built, with the reason, instead of failing.
"""

from __future__ import annotations

import copy
import math
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from algm.build import Setup, make_setup
from algm.measure.throughput import cuda_settings, measure_interleaved, measure_throughput
from algm.methods import build_method, method_class, methods
from algm.model.segmenter import Segmenter
from algm.precision import autocast_context
from algm.reduction import NoReduction
from algm.safe_yaml import load_yaml
from suites.definition import SUITES_DIR

# The suite whose first reduced method is the reference (:func:`default_reference`).
REFERENCE_SUITE = SUITES_DIR / "camvid.yaml"
# A build that fails for want of a trained part or a file is a skip, anything else a bug.
BUILD_ERRORS = (ValueError, FileNotFoundError)


def default_reference() -> str:
    """The method the suite is about, read from data: the first method other than
    ``none`` under ``methods:`` of :data:`REFERENCE_SUITE`. The fine-tune check trains
    with it, and gpu-check times bf16 / torch.compile and matches the zero-cost cut to
    it. A name, not an import: if it is not registered, those parts are skipped and say so."""
    raw = load_yaml(REFERENCE_SUITE, "suite")
    table = raw.get("methods") if isinstance(raw, dict) else None
    names = [str(name) for name in table if name != "none"] if isinstance(table, dict) else []
    if not names:
        raise ValueError(f"{REFERENCE_SUITE}: methods: names no method besides none (the reference is the first)")
    return names[0]


def one_line(err: BaseException) -> str:
    """``Type: first line of the message``: a failure as one table cell."""
    return f"{type(err).__name__}: {next(iter(str(err).splitlines()), '')}"[:300]


def build_registered(backbone: str, dataset: str, window: tuple[int, int] | None = None,
                     pretrained: bool = False, names: list[str] | None = None
                     ) -> tuple[dict[str, Setup], dict[str, str]]:
    """Every registered method (or ``names``, in registry order) built at its defaults
    plus its class's ``untrained_options``: ``({name: Setup in eval mode}, {name: why it
    was skipped})``. All share one encoder and decoder (``none``'s, seeded, so random
    weights are the same in every run): one copy of the weights, and every method
    reduces the very model it is compared with."""
    registry = methods()
    wanted = list(registry) if names is None else [n for n in registry if n in names]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = make_setup(backbone, dataset, "none", window=window, pretrained=pretrained)
    base.model.eval()
    setups, skipped = {}, {}
    for name in wanted:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # random heads and the like: the same in every run
            try:
                method = build_method(name, base.backbone, base.dataset, **registry[name].untrained_options)
            except BUILD_ERRORS as err:
                skipped[name] = one_line(err)
                continue
        setups[name] = replace(base, model=base.model.with_method(method))
    return setups, skipped


def exact_baseline(model: Segmenter) -> bool:
    """True for the model without reduction: no merge decision can flip under rounding."""
    return isinstance(model.method, NoReduction)


def check_forward_matches_cpu(model: Segmenter, frames: Tensor, device: torch.device,
                              dtype: torch.dtype, tol: float) -> None:
    """The forward on ``device`` keeps the same tokens per layer as on the CPU and gives
    the same logits within ``tol`` (TF32 off: by default cuDNN may run the patch-embed
    convolution in TF32, a 1e-3 error). ``model`` is copied, not moved."""
    model = copy.deepcopy(model).to(dtype)
    x = frames.to(dtype)
    with torch.no_grad():
        cpu = model.run(x)
        with cuda_settings(device, tf32=False, cudnn_benchmark=False):
            out = model.to(device).run(x.to(device))
    assert torch.equal(out.tokens.cpu(), cpu.tokens), f"tokens kept per layer differ between cpu and {device}"
    torch.testing.assert_close(out.logits.cpu(), cpu.logits, atol=tol, rtol=tol)


def check_event_timing(model: Segmenter, frames: Tensor, device: torch.device) -> None:
    """CUDA-event timing gives finite, positive rates and puts TF32 / cuDNN autotuning
    back as they were."""
    model = copy.deepcopy(model).to(device)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark
    result = measure_throughput(model, frames.to(device), warmup=2, repeats=3, tf32=True, cudnn_benchmark=True)
    now = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark
    assert now == saved, f"TF32 / cuDNN settings not restored: {now} after, {saved} before"
    assert result.device.startswith("cuda") and result.tf32 and result.cudnn_benchmark, result
    rates = (result.images_per_s, result.median_images_per_s, result.std_images_per_s)
    assert all(math.isfinite(r) for r in rates) and result.images_per_s > 0, f"rates {rates}"
    assert 0 < result.min_latency_s <= result.max_latency_s, result
    assert result.cpu_utilisation is None, "cpu_utilisation is a CPU-only figure"


def check_peak_memory(models: list[Segmenter], frames: Tensor, device: torch.device) -> None:
    """Peak GPU memory is reported per model, above the weights and larger for a batch 8x
    as large."""
    models = [copy.deepcopy(m).to(device) for m in models]
    small = measure_interleaved(models, frames.to(device), warmup=1, repeats=2)
    large = measure_interleaved(models, frames.repeat(8, 1, 1, 1).to(device), warmup=1, repeats=2)
    for model, s, big in zip(models, small, large):
        params_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        assert params_mib < s.peak_memory_mib < big.peak_memory_mib, (
            f"{model.method.name}: peak {s.peak_memory_mib} MiB (batch {len(frames)}), {big.peak_memory_mib} "
            f"(x8), weights {params_mib:.0f}")


def check_autocast_forward(model: Segmenter, frames: Tensor, device: torch.device, precision: str) -> None:
    """An autocast (``bf16`` / ``fp16``) forward runs, is finite and has fp32's shape; for
    the baseline it is also fp32's result up to rounding. Timing in that precision works."""
    model, x = copy.deepcopy(model).to(device), frames.to(device)
    with torch.no_grad():
        reference = model(x)
        with autocast_context(device, precision):
            logits = model(x)
    assert logits.shape == reference.shape, f"{precision} logits {tuple(logits.shape)} vs {tuple(reference.shape)}"
    assert torch.isfinite(logits).all(), f"{precision} logits are not all finite"
    if exact_baseline(model):
        error = (logits.float() - reference).abs().mean() / reference.abs().mean()
        assert error < 0.1, f"{precision} logits differ from fp32 by {error:.3f} of their mean size"
    result = measure_throughput(model, x, warmup=1, repeats=2, precision=precision)
    assert math.isfinite(result.images_per_s) and result.precision == precision, result


def check_compile_matches_eager(model: Segmenter, frames: Tensor, device: torch.device) -> None:
    """``torch.compile`` of the model gives the eager logits (1e-3, TF32 off)."""
    model, x = copy.deepcopy(model).to(device), frames.to(device)
    compiled = torch.compile(model)
    with torch.no_grad(), cuda_settings(device, tf32=False, cudnn_benchmark=False):
        eager = model(x)
        out = compiled(x)
    torch.testing.assert_close(out, eager, atol=1e-3, rtol=1e-3)


def write_tiny_ade(root: Path, n: int = 2, size: tuple[int, int] = (64, 80)) -> Path:
    """An ADE20K tree of ``n`` random training and validation images (seeded) under ``root``."""
    rng = np.random.default_rng(0)
    for folder in ("training", "validation"):
        for i in range(n):
            stem = f"ADE_{folder[:3]}_{i:08d}"
            for sub, array, suffix in (("images", rng.integers(0, 256, (*size, 3), dtype=np.uint8), "jpg"),
                                       ("annotations", rng.integers(0, 151, size, dtype=np.uint8), "png")):
                path = root / "ADEChallengeData2016" / sub / folder / f"{stem}.{suffix}"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(path)
    return root


def check_finetune(folder: Path, device: torch.device, method: str, freeze_blocks: int,
                   backbone: str = "vit-ti16") -> None:
    """One epoch of fine-tuning with ``method`` active on ``device`` (a tiny random ADE20K
    tree, random weights, 64 x 64 crops) writes the model it trained: the checkpoint,
    loaded and driven by the same method, gives the trained model's logits exactly."""
    from algm.training.finetune import FinetuneConfig, finetune
    from algm.weights.checkpoint import load_checkpoint

    data = write_tiny_ade(folder / "data")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        setup = make_setup(backbone, "ade20k", method, window=(64, 64), **method_class(method).untrained_options)
    config = FinetuneConfig(epochs=1, freeze_blocks=freeze_blocks, views=1, batch_size=2)
    result = finetune(setup, config, folder / "out", root=data, device=str(device), cache=folder / "cache",
                      progress=False)
    budget = result.record["budget"]
    assert budget["iterations"] == 1, f"{budget['iterations']} iterations, expected 1"
    if device.type == "cuda":
        assert budget["precision"] == "bf16", f"precision {budget['precision']} on CUDA, expected bf16"
    model, _ = load_checkpoint(result.checkpoint)
    trained = setup.model.cpu().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.with_method(trained.method).eval()(x), trained(x)), \
            "the written checkpoint is not the model that was trained"


@dataclass(frozen=True)
class Check:
    """One named check: ``run()`` raises on failure; ``needs_cuda``: skipped elsewhere."""

    name: str
    run: Callable[[], None]
    needs_cuda: bool = False


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: str  # passed | failed | skipped
    detail: str  # the failure's one line, or why it was skipped
    seconds: float
    log: str = ""  # a failure's traceback

    def to_dict(self) -> dict:
        return {"name": self.name, "status": self.status, "detail": self.detail, "seconds": round(self.seconds, 2)}


@dataclass(frozen=True)
class CheckOptions:
    """Which checks a run makes: autocast precisions, torch.compile, fine-tuning
    (``freeze_blocks`` values; empty: none) and the fp64 / fp32 tolerances."""

    precisions: tuple[str, ...] = ("bf16", "fp16")
    compile: bool = True
    finetune: tuple[int, ...] = (0, 5)
    tolerances: tuple[tuple[str, float], ...] = (("fp64", 1e-8), ("fp32", 1e-3))


DTYPES = {"fp64": torch.float64, "fp32": torch.float32}


def planned_checks(setups: dict[str, Setup], frames: Tensor, device: torch.device, options: CheckOptions,
                   reference: str, scratch: Path) -> list[Check]:
    """Every check of a run over the built methods ``setups`` (``none`` first) on
    ``frames`` (B, 3, h, w); timing, compile and fine-tuning use ``none`` and
    ``reference`` (where it is built); fine-tuning writes under ``scratch``."""
    models = {name: s.model for name, s in setups.items()}
    pair = [name for name in dict.fromkeys(["none", reference]) if name in models]
    checks = [Check(f"forward on {device.type} equals cpu: {name} {dtype}",
                    lambda m=model, d=DTYPES[dtype], t=tol: check_forward_matches_cpu(m, frames, device, d, t))
              for name, model in models.items() for dtype, tol in options.tolerances]
    checks.append(Check("cuda-event timing: finite rates, settings restored",
                        lambda: check_event_timing(models[pair[-1]], frames, device), needs_cuda=True))
    checks.append(Check(f"peak memory reported, grows with the batch: {', '.join(pair)}",
                        lambda: check_peak_memory([models[n] for n in pair], frames, device), needs_cuda=True))
    checks += [Check(f"autocast {precision} forward: {name}",
                     lambda m=model, p=precision: check_autocast_forward(m, frames, device, p))
               for precision in options.precisions for name, model in models.items()]
    if options.compile:
        checks += [Check(f"torch.compile gives the eager logits: {name}",
                         lambda m=models[name]: check_compile_matches_eager(m, frames, device)) for name in pair]
    if reference in models:
        checks += [Check(f"fine-tune on {device.type} writes the model it trained: {reference}, freeze {k}",
                         lambda k=k: check_finetune(scratch / f"finetune-{k}", device, reference, k))
                   for k in options.finetune]
    return checks


def run_checks(checks: list[Check], device: torch.device, log: Callable[[str], None] = print) -> list[CheckResult]:
    """Run each check, recording passed / failed (the one-line reason, the traceback) /
    skipped (needs CUDA on another device); one failure does not stop the others."""
    results = []
    for check in checks:
        start = time.perf_counter()
        if check.needs_cuda and device.type != "cuda":
            result = CheckResult(check.name, "skipped", f"needs CUDA, the device is {device}", 0.0)
        else:
            try:
                check.run()
                result = CheckResult(check.name, "passed", "", time.perf_counter() - start)
            except Exception as err:  # a failed check is a result, the next one still runs
                result = CheckResult(check.name, "failed", one_line(err), time.perf_counter() - start,
                                     traceback.format_exc())
        log(f"gpu-check: check {result.status}: {result.name}"
            + (f" ({result.detail})" if result.status == "failed" else f" ({result.seconds:.1f} s)"))
        results.append(result)
    return results
