"""Run a suite: one row per backbone x method setting, each cached by its full config.

A row holds GFLOPs (per image, averaged over ``flops_images`` frames), images/s at each
configured batch size, tokens kept and mIoU. Where the weights come from (:func:`plan`):

* backbones with real offline weights (``vit-s14``): the encoder is frozen and heads are
  trained here: the off-the-shelf head (trained without reduction, the method applied at
  test time) and, for settings marked ``train``, a head trained with the method active;
* other backbones take official checkpoints from ``--checkpoints DIR``:
  ``DIR/<dataset>/<backbone>/none/checkpoint.pth`` (+ ``variant.yml``) is the Segmenter
  every method is applied to off the shelf, and ``DIR/<dataset>/<backbone>/<method>/`` a
  model trained with that method, which adds a row per setting of it measured entirely
  on those weights. Without the ``none`` checkpoint a backbone keeps GFLOPs-only rows on
  random weights, and the row says which file was missing.

Finished rows are JSON files in ``cache_dir("rows", suite)``, so a killed run resumes
where it stopped.

Under torchrun (:mod:`algm.distributed`) every process runs the same rows: GFLOPs and mIoU
are sharded over the processes, throughput is measured and row files are read and written
by rank 0 only, and rank 0 trains missing heads while the others wait.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from algm import atomic, distributed
from algm.build import Setup, checkpoint_facts, checkpoint_sha256, make_setup
from algm.cache import cache_dir
from algm.config import DecoderConfig, get_backbone, get_dataset
from algm.data.datasets import build_dataset, check_files
from algm.evaluate import evaluate
from algm.fetch import layout_dir
from algm.measure.breakdown import measure_breakdown
from algm.measure.flops import average_flops, count_flops
from algm.measure.throughput import CONTENDED_BELOW, measure_interleaved
from algm.methods import required_training
from algm.reduction import TrainingContext
from algm.training.head import load_head, train_head
from suites.definition import Setting, Suite
from suites.machine import machine_record

ROW_VERSION = 3  # bump when the meaning of a row's numbers changes
ROW_FORMAT = f"algm-bench/row/v{ROW_VERSION}"
ROW_FIELDS = {"backbone", "method", "setting", "gflops", "tokens_kept_pct"}  # every row has these
CHECKPOINT_FILE = "checkpoint.pth"


@dataclass(frozen=True)
class RunOptions:
    data_root: str | None = None
    flops_only: bool = False
    device: str = "cpu"
    fresh: bool = False
    fresh_methods: tuple[str, ...] = ()  # recompute only the rows of these methods
    progress: bool = True
    checkpoints: str | None = None  # DIR/<dataset>/<backbone>/<method>/checkpoint.pth
    backbones: tuple[str, ...] | None = None  # restrict the suite to these


@dataclass(frozen=True)
class Row:
    """One planned row: a backbone x setting on some weights.

    ``checkpoint``: the official checkpoint the model loads (None: real offline weights
    or random ones); ``baseline``: the ``none`` checkpoint timed beside it; ``trained``:
    the checkpoint was trained with the row's method; ``missing``: the checkpoint file
    that was expected but not found (the row is GFLOPs-only, on random weights)."""

    backbone: str
    setting: Setting
    checkpoint: Path | None = None
    baseline: Path | None = None
    trained: bool = False
    missing: str | None = None

    @property
    def gflops_only(self) -> bool:
        return self.missing is not None


def checkpoint_path(root: str | Path, dataset: str, backbone: str, method: str) -> Path:
    return layout_dir(root, dataset, backbone, method) / CHECKPOINT_FILE


def plan(suite: Suite, opts: RunOptions) -> list[Row]:
    """The rows of a suite, in suite order (trained-with-method rows after their
    off-the-shelf twin). Every checkpoint's variant.yml is checked against the suite's
    dataset and the backbone before any row runs."""
    backbones = suite.backbones
    if opts.backbones:
        unknown = sorted(set(opts.backbones) - set(backbones))
        if unknown:
            raise ValueError(f"--backbones {','.join(unknown)}: not in suite {suite.name} "
                             f"({', '.join(backbones)})")
        backbones = tuple(b for b in backbones if b in opts.backbones)
    rows = []
    for backbone in backbones:
        if get_backbone(backbone).weights is not None:
            rows += [Row(backbone, s) for s in suite.settings]
            continue
        base = checkpoint_path(opts.checkpoints, suite.dataset, backbone, "none") if opts.checkpoints else None
        if base is None or not base.is_file():
            missing = str(base) if base is not None else (
                f"--checkpoints DIR with DIR/{suite.dataset}/{backbone}/none/{CHECKPOINT_FILE}")
            rows += [Row(backbone, s, missing=missing) for s in suite.settings]
            continue
        checkpoint_facts(base, backbone, suite.dataset)
        for s in suite.settings:
            rows.append(Row(backbone, s, base, base))
            own = checkpoint_path(opts.checkpoints, suite.dataset, backbone, s.method)
            if s.method != "none" and own.is_file():
                checkpoint_facts(own, backbone, suite.dataset)
                rows.append(Row(backbone, s, own, base, trained=True))
    return rows


def row_key(suite: Suite, row: Row, opts: RunOptions) -> str:
    """Hash of everything that determines a row's numbers (checkpoints by their content)."""
    setting = row.setting
    config = {
        "version": ROW_VERSION, "dataset": suite.dataset, "split": suite.split, "backbone": row.backbone,
        "method": setting.method, "options": setting.options, "train": setting.train,
        "decoder": suite.decoder, "window": suite.window_for(row.backbone),
        "flops_images": suite.flops_images, "miou_images": suite.miou_images,
        "window_batch_size": suite.window_batch_size, "throughput": asdict(suite.throughput),
        "flops_only": opts.flops_only or row.gflops_only, "device": opts.device,
        "data_root": opts.data_root, "missing": row.missing, "trained": row.trained,
        "checkpoint": _content(row.checkpoint), "baseline": _content(row.baseline),
    }
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _content(path: Path | None) -> str | None:
    return None if path is None else checkpoint_sha256(path)


def run_suite(suite: Suite, opts: RunOptions) -> list[dict]:
    """Measure (or read from cache) every row of ``suite``; returns them in suite order."""
    if not opts.flops_only:  # fails naming the expected layout, or the first unreadable file
        check_files(build_dataset(suite.dataset, suite.split, root=opts.data_root))
    rows_dir = cache_dir("rows", suite.name)
    has_data = _has_data(suite, opts)
    todo = [r for r in plan(suite, opts)
            if not ((opts.flops_only or r.gflops_only) and r.setting.method != "none" and not has_data)]
    rows = []
    main = distributed.is_main()
    bar = tqdm(todo, desc=f"suite {suite.name}", unit="row", disable=not opts.progress or not main)
    for row_plan in bar:
        bar.set_postfix_str(f"{row_plan.backbone} {row_plan.setting.label()}")
        key = row_key(suite, row_plan, opts)
        path = rows_dir / f"{key}.json"
        fresh = opts.fresh or row_plan.setting.method in opts.fresh_methods
        row = distributed.broadcast_object(read_row(path, key) if main and not fresh else None)
        if row is None:
            start = time.perf_counter()
            row = measure_row(suite, row_plan, opts)
            row["seconds"] = time.perf_counter() - start  # training of missing parts included
        elif _contended_sizes(row) and not row_plan.gflops_only:  # competed with other processes: time it again
            row = retime(suite, row_plan, row, opts)
        if main:
            atomic.write_json(path, {"format": ROW_FORMAT, "key": key, "row": row}, indent=None)
        rows.append(row)
    return rows


def read_row(path: Path, key: str) -> dict | None:
    """A cached row, or None: missing, or damaged (unparsable, another key or format, no
    numbers), in which case it is moved aside as ``<name>.bad`` and reported."""
    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text())
        if entry.get("format") != ROW_FORMAT or entry.get("key") != key:
            raise ValueError(f"not a {ROW_FORMAT} row with key {key}")
        row = entry["row"]
        missing = sorted(ROW_FIELDS - set(row))
        if missing:
            raise ValueError(f"no {', '.join(missing)}")
        return row
    except (ValueError, KeyError, TypeError, AttributeError) as err:  # JSONDecodeError is a ValueError
        bad = path.with_name(path.name + ".bad")
        os.replace(path, bad)
        print(f"algm-bench: damaged cached row {path} ({err}); moved to {bad.name}, measuring it again",
              file=sys.stderr)
        return None


def _contended_sizes(row: dict) -> list[int]:
    return [int(k[len("contended_b"):]) for k, v in row.items() if k.startswith("contended_b") and v]


def retime(suite: Suite, plan_row: Row, row: dict, opts: RunOptions) -> dict:
    """``row`` with the throughput of its contended batch sizes measured again."""
    pretrained = get_backbone(plan_row.backbone).weights is not None
    setup = setup_for(suite, plan_row.backbone, plan_row.setting, pretrained, plan_row.checkpoint)
    baseline = baseline_for(suite, plan_row, setup)
    setup.model.eval()
    baseline.model.eval()
    row = dict(row)
    if distributed.is_main():
        for b in _contended_sizes(row):
            row.update(_throughput(suite, setup, baseline, b, opts))
    return row


def _has_data(suite: Suite, opts: RunOptions) -> bool:
    try:
        build_dataset(suite.dataset, suite.split, root=opts.data_root, limit=1)
    except FileNotFoundError:
        return False
    return True


def setup_for(suite: Suite, backbone: str, setting: Setting, pretrained: bool = False,
              checkpoint: Path | None = None) -> Setup:
    """The model of one row: an official ``checkpoint``, the real offline weights
    (``pretrained``) or random ones."""
    if checkpoint is not None:
        return make_setup(backbone, suite.dataset, setting.method, window=suite.window_for(backbone),
                          checkpoint=checkpoint, **setting.options)
    # Seeded: random weights, and with them an adaptive method's token counts and GFLOPs,
    # are the same in every run (the global RNG is left as it was).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return make_setup(backbone, suite.dataset, setting.method, window=suite.window_for(backbone),
                          decoder=DecoderConfig(suite.decoder), pretrained=pretrained, **setting.options)


def train_missing_parts(suite: Suite, backbone: str, setting: Setting, opts: RunOptions) -> None:
    """Train what the method still needs besides the decoder (its
    :meth:`~algm.reduction.TokenReduction.required_training`), once, into the cache:
    only rank 0 trains, the others wait."""
    tasks = required_training(setting.method, get_backbone(backbone), get_dataset(suite.dataset),
                              **setting.options)
    if not tasks:
        return
    if distributed.is_main():
        context = TrainingContext(data_root=opts.data_root, window=suite.window_for(backbone),
                                  progress=opts.progress)
        for task in tasks:
            if opts.progress:
                print(f"training {task.name} -> {task.path}")
            task.run(context)
    distributed.barrier()


def baseline_for(suite: Suite, plan_row: Row, setup: Setup) -> Setup:
    """The ``none`` model timed beside a row (the row's own model for ``none``)."""
    if plan_row.setting.method == "none":
        return setup
    pretrained = get_backbone(plan_row.backbone).weights is not None
    return setup_for(suite, plan_row.backbone, Setting("none"), pretrained, plan_row.baseline)


def measure_row(suite: Suite, plan_row: Row, opts: RunOptions) -> dict:
    backbone, setting = plan_row.backbone, plan_row.setting
    pretrained = get_backbone(backbone).weights is not None
    if pretrained and _has_data(suite, opts):
        train_missing_parts(suite, backbone, setting, opts)
    setup = setup_for(suite, backbone, setting, pretrained, plan_row.checkpoint)
    distributed.broadcast_module(setup.model)  # random weights differ per process: use rank 0's
    setup.model.eval()
    row = {
        "dataset": suite.dataset, "backbone": backbone, "method": setting.method,
        "setting": setting.label(), "options": setting.options,
        "window": f"{setup.window[0]}x{setup.window[1]}",
        "weights": setup.weights.kind, "checkpoint": setup.weights.path,
        "checkpoint_sha256": setup.weights.sha256, "trained_with_method": plan_row.trained,
        "missing_checkpoint": plan_row.missing, "stride": f"{setup.stride[0]}x{setup.stride[1]}",
        "window_batch_size": suite.window_batch_size,
    }
    row.update(_flops_and_tokens(suite, setup, setting, opts))
    if opts.flops_only or plan_row.gflops_only:
        return row
    baseline = baseline_for(suite, plan_row, setup)
    if baseline is not setup:
        distributed.broadcast_module(baseline.model)
    if distributed.is_main():
        for b in suite.throughput.batch_sizes:
            row.update(_throughput(suite, setup, baseline, b, opts))
        if suite.throughput.breakdown:
            row.update(_breakdown(suite, setup, baseline, opts))
    row.update(_miou(suite, setup, baseline, plan_row, opts))
    return row


def _flops_and_tokens(suite: Suite, setup: Setup, setting: Setting, opts: RunOptions) -> dict:
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

    images = setup.split_windows(suite.split, suite.flops_images, opts.data_root)
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
    tp = suite.throughput
    batch = setup.batch(suite.split, batch_size, tp.batch_kind, opts.data_root)
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


def _breakdown(suite: Suite, setup: Setup, baseline: Setup, opts: RunOptions) -> dict:
    """The method's own share of the forward (its hooks) and the baseline's fixed-stage
    share (patch embed, restore, upsample; it bounds the speed-up, see
    :func:`~algm.measure.breakdown.speedup_bound`), at the first batch size."""
    tp = suite.throughput
    b = tp.batch_sizes[0]
    batch = setup.batch(suite.split, b, tp.batch_kind, opts.data_root).to(opts.device)
    results = [measure_breakdown(s.model.to(opts.device), batch, tp.warmup, tp.repeats)
               for s in dict.fromkeys((setup, baseline))]
    for s in (setup, baseline):
        s.model.to("cpu")
    return {"breakdown_batch": b, "overhead_share": results[0].overhead_share,
            "fixed_share": results[-1].fixed_share}


def _least_utilisation(results) -> float:
    """The lowest CPU utilisation among interleaved results (1.0 on GPU: not measured)."""
    return min((r.cpu_utilisation for r in results if r.cpu_utilisation is not None), default=1.0)


def _miou(suite: Suite, setup: Setup, baseline: Setup, plan_row: Row, opts: RunOptions) -> dict:
    """mIoU: a checkpoint's own decoder; for real offline encoders the off-the-shelf head
    and, if the setting asks, a head trained with the method. A model trained with the
    method reports under ``miou_trained``."""
    dataset = build_dataset(suite.dataset, suite.split, root=opts.data_root)
    setting = plan_row.setting
    if setup.weights.kind == "checkpoint":
        miou = _evaluate(setup, dataset, suite, opts)
        if plan_row.trained:
            return {"miou": math.nan, "miou_trained": miou}
        return {"miou": miou, "miou_trained": miou if setting.method == "none" else math.nan}
    if setup.weights.kind == "random":
        return {"miou": math.nan, "miou_trained": math.nan}
    load_head(setup, _train_head(baseline, opts))
    out = {"miou": _evaluate(setup, dataset, suite, opts)}
    out["miou_trained"] = math.nan
    if setting.train and setting.method != "none":
        load_head(setup, _train_head(setup, opts))
        out["miou_trained"] = _evaluate(setup, dataset, suite, opts)
    elif setting.method == "none":
        out["miou_trained"] = out["miou"]
    return out


def _train_head(setup: Setup, opts: RunOptions) -> Path:
    """The head's file: rank 0 trains it (or finds it cached) first, then the other ranks
    find it in the cache (a cache folder shared by all nodes, or they train it too)."""
    main = distributed.is_main()
    if not main:
        distributed.barrier()  # until rank 0 has its head
    path = train_head(setup, root=opts.data_root, progress=opts.progress and main)
    if main:
        distributed.barrier()
    return path


def _evaluate(setup: Setup, dataset, suite: Suite, opts: RunOptions) -> float:
    model = setup.model.to(distributed.device(opts.device))
    result = evaluate(model, dataset, setup.window, setup.stride, limit=suite.miou_images,
                      progress=opts.progress, batch_size=suite.window_batch_size, distributed=True)
    setup.model.to("cpu")
    return result.miou * 100


def write_machine(out_dir: Path, opts: RunOptions) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out_dir / "machine.json", json.dumps(machine_record(opts.device), indent=2) + "\n")
