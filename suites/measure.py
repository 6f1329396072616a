"""Measure one planned row on its weights: GFLOPs and tokens kept, images/s (timed
interleaved with the baseline), the stage breakdown and mIoU.

GFLOPs are per image, averaged over ``flops_images`` frames (or mixed batches for a
batched setting); images/s at each configured batch size. Under torchrun
(:mod:`algm.distributed`) every process measures the same row: GFLOPs and mIoU are
sharded over the processes, throughput is timed by rank 0 only, and rank 0 trains
missing heads while the others wait.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

from algm import distributed
from algm.build import Setup, make_setup
from algm.config import DecoderConfig, get_backbone, get_dataset
from algm.data.datasets import build_dataset
from algm.data.windows import center_window, mixed_groups
from algm.evaluate import evaluate
from algm.measure.allocator import POLICY
from algm.measure.attainable import ZeroCostReduction, matched_tokens
from algm.measure.breakdown import measure_breakdown
from algm.measure.flops import average_flops, count_flops
from algm.measure.throughput import CONTENDED_BELOW, measure_interleaved
from algm.methods import required_training
from algm.training.features import training_context
from algm.training.head import load_head, train_head
from algm.weights.checkpoint import read_variant
from suites.definition import Setting, Suite
from suites.plan import Row, RunOptions


def has_data(suite: Suite, opts: RunOptions) -> bool:
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
        context = training_context(opts.data_root, suite.window_for(backbone), opts.progress)
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
    """One row's numbers. The method's trained parts are there already: the row's key
    (:func:`suites.runner.method_identity`) trained the missing ones."""
    backbone, setting = plan_row.backbone, plan_row.setting
    pretrained = get_backbone(backbone).weights is not None
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
        "window_batch_size": suite.window_batch_size, "batch": setting.batch,
        "finetune": _finetune_record(plan_row.checkpoint),
    }
    row.update(_flops_and_tokens(suite, setup, setting, opts))
    if opts.flops_only or plan_row.gflops_only:
        return row
    baseline = baseline_for(suite, plan_row, setup)
    if baseline is not setup:
        distributed.broadcast_module(baseline.model)
    if opts.untimed:
        row["untimed"] = True  # stale_sizes: the next run without --untimed times it
    elif distributed.is_main():
        for b in timed_sizes(suite, setting):
            row.update(_throughput(suite, setup, baseline, b, opts, setting.batch))
        if suite.throughput.breakdown:
            row.update(_breakdown(suite, setup, baseline, opts))
    row.update(_miou(suite, setup, baseline, plan_row, opts))
    return row


def stale_sizes(row: dict, suite: Suite) -> list[int]:
    """The batch sizes of a cached row to time again: contended ones, those timed under
    another host allocator policy (or before rows recorded it and the GFLOPs of their
    timed batch, ``timed_gflops_bN``) and, where the suite asks for the attainable
    speed-up, those of a reduced row without it; every size of a row measured
    ``--untimed``."""
    if row.get("untimed"):
        return list(timed_sizes(suite, Setting(row["method"], batch=row.get("batch"))))
    contended = {int(k[len("contended_b"):]) for k, v in row.items() if k.startswith("contended_b") and v}
    timed = {int(k[len("ims_b"):]) for k in row if k.startswith("ims_b") and k[len("ims_b"):].isdigit()}
    if _other_policy(row):
        return sorted(timed)
    lacking = {b for b in timed if f"timed_gflops_b{b}" not in row}
    if suite.throughput.attainable and row.get("method") != "none":
        lacking |= {b for b in timed if f"attainable_ims_b{b}" not in row}
    return sorted(contended | lacking)


def _other_policy(row: dict) -> bool:
    """Timed under another host allocator policy than this process's, or before rows recorded it."""
    return row.get("cpu_allocator") != POLICY


def retime(suite: Suite, plan_row: Row, row: dict, opts: RunOptions) -> dict:
    """``row`` with the throughput of its :func:`stale_sizes` measured again, and its
    breakdown too where it was timed under another allocator policy."""
    pretrained = get_backbone(plan_row.backbone).weights is not None
    setup = setup_for(suite, plan_row.backbone, plan_row.setting, pretrained, plan_row.checkpoint)
    baseline = baseline_for(suite, plan_row, setup)
    setup.model.eval()
    baseline.model.eval()
    row = dict(row)
    untimed = row.pop("untimed", False)
    if distributed.is_main():
        if suite.throughput.breakdown and (untimed or _other_policy(row)):
            row.update(_breakdown(suite, setup, baseline, opts))  # its fixed share moves with the policy
        for b in timed_sizes(suite, plan_row.setting) if untimed else stale_sizes(row, suite):
            row.update(_throughput(suite, setup, baseline, b, opts, plan_row.setting.batch))
    return row


def _finetune_record(checkpoint: Path | None) -> dict | None:
    """How a checkpoint written by ``algm-bench finetune`` was trained (its variant's
    ``algm_bench`` entry, the per-epoch history left out), else None."""
    if checkpoint is None:
        return None
    record = read_variant(checkpoint.with_name("variant.yml")).get("algm_bench")
    if not isinstance(record, dict):
        return None
    return {k: v for k, v in record.items() if k != "history"}


def _flops_and_tokens(suite: Suite, setup: Setup, setting: Setting, opts: RunOptions) -> dict:
    model = setup.model
    n_patches = setup.grid[0] * setup.grid[1]
    if setting.method == "none":
        h, w = setup.window
        gflops = count_flops(model, torch.randn(1, 3, h, w))
        return {"gflops": gflops, "gflops_images": 1, "tokens_kept_pct": 100.0,
                "tokens_per_layer": [n_patches + 1] * setup.model.encoder.depth}
    counts = []

    def signature(images):
        with torch.no_grad():
            tokens = model.run(images).tokens  # (B, depth)
        counts.append(tokens)
        return tuple(map(tuple, tokens.tolist()))

    if setting.batch is None:
        inputs = setup.split_windows(suite.split, suite.flops_images, opts.data_root)
    else:  # GFLOPs of whole mixed batches (padding included) per image; tokens kept exclude padding
        inputs = mixed_batches(suite, setup, setting.batch, suite.flops_images, opts)
    _, per_input = average_flops(model, inputs, signature, distributed=True)
    tokens = torch.cat(distributed.gather_in_order(counts)).float()  # (images, depth)
    mean_tokens = tokens.mean(0)
    return {
        "gflops": sum(per_input) / tokens.shape[0], "gflops_images": tokens.shape[0],
        "tokens_kept_pct": float(mean_tokens[-1] / (n_patches + 1) * 100),
        "tokens_per_layer": [round(float(t), 1) for t in mean_tokens],
    }


def timed_sizes(suite: Suite, setting: Setting) -> tuple[int, ...]:
    """The batch sizes a row is timed at: the suite's, plus a batched setting's own."""
    sizes = suite.throughput.batch_sizes
    return sizes if setting.batch is None or setting.batch in sizes else (*sizes, setting.batch)


def mixed_batches(suite: Suite, setup: Setup, batch_size: int, limit: int, opts: RunOptions) -> Iterator[Tensor]:
    """(B, 3, h, w) centre windows of the first groups of the split's fixed seeded
    grouping into mixed batches of ``batch_size`` (:func:`~algm.data.windows.mixed_groups`),
    enough groups to hold ``limit`` images (the last group may be shorter)."""
    data = build_dataset(suite.dataset, suite.split, root=opts.data_root)
    for group in mixed_groups(len(data), batch_size)[:math.ceil(limit / batch_size)]:
        yield torch.cat([center_window(data[i].image, setup.window, setup.backbone.mean, setup.backbone.std)
                         for i in group])


def _throughput(suite: Suite, setup: Setup, baseline: Setup, batch_size: int, opts: RunOptions,
                row_batch: int | None = None) -> dict:
    """images/s at one batch size, timed interleaved with the baseline (``base_ims_bN``;
    the row's speed-up is the ratio of the two, see
    :func:`~algm.measure.throughput.measure_interleaved`). A CPU timing that competed with
    other processes (utilisation below :data:`~algm.measure.throughput.CONTENDED_BELOW`)
    is repeated up to ``suite.throughput.contended_retries`` times; the least disturbed
    one is kept, and flagged if it is still contended. ``timed_gflops_bN`` is the GFLOPs
    per image of the timed batch (an adaptive method's differ from the row's mean over
    ``flops_images`` frames). With ``throughput.attainable`` a reduced row times a third
    model too, the baseline under :class:`~algm.measure.attainable.ZeroCostReduction` at
    those GFLOPs (``attainable_ims_bN``, ``attainable_tokens_bN``). The batch is the suite's
    ``batch_kind`` of that size, except at a batched setting's own size (``row_batch``):
    the first group of :func:`mixed_batches`, images spread over the split."""
    tp = suite.throughput
    if batch_size == row_batch:
        batch = next(mixed_batches(suite, setup, batch_size, batch_size, opts))
    else:
        batch = setup.batch(suite.split, batch_size, tp.batch_kind, opts.data_root)
    # Frames merge differently: the speed-up compares with the GFLOPs of this very batch.
    timed_gflops = count_flops(setup.model, batch) / batch.shape[0]
    models = [s.model for s in ((setup,) if baseline is setup else (setup, baseline))]
    zero_cost_tokens = None
    if tp.attainable and baseline is not setup:  # matched on the CPU, as timed_gflops is counted
        k = matched_tokens(baseline.model, batch, timed_gflops)
        models.append(baseline.model.with_method(ZeroCostReduction(k)))
        zero_cost_tokens = k + 1  # cls included, as tokens_per_layer counts
    batch = batch.to(opts.device)
    models = [m.to(opts.device) for m in models]
    repeats = tp.repeats_at(batch.shape[0])
    results = measure_interleaved(models, batch, tp.warmup, repeats)
    for _ in range(tp.contended_retries):
        if not _least_utilisation(results) < CONTENDED_BELOW:
            break
        again = measure_interleaved(models, batch, tp.warmup, repeats)
        results = max(results, again, key=_least_utilisation)
    for model in models:
        model.to("cpu")
    result, util = results[0], _least_utilisation(results)
    out = {f"ims_b{batch_size}": result.images_per_s, f"timed_gflops_b{batch_size}": timed_gflops,
           f"ims_b{batch_size}_median": result.median_images_per_s,
           f"ims_b{batch_size}_std": result.std_images_per_s,
           f"peak_mem_b{batch_size}_mib": result.peak_memory_mib,
           f"cpu_util_b{batch_size}": util,
           f"contended_b{batch_size}": util < CONTENDED_BELOW,
           "batch_kind": tp.batch_kind, "cpu_allocator": POLICY}
    if len(results) > 1:
        out[f"base_ims_b{batch_size}"] = results[1].images_per_s
    if zero_cost_tokens is not None:
        out[f"attainable_ims_b{batch_size}"] = results[2].images_per_s
        out[f"attainable_tokens_b{batch_size}"] = zero_cost_tokens
    return out


def _breakdown(suite: Suite, setup: Setup, baseline: Setup, opts: RunOptions) -> dict:
    """The method's own share of the forward (its hooks) and the baseline's fixed-stage
    share (patch embed, restore, upsample; it bounds the speed-up, see
    :func:`~algm.measure.breakdown.speedup_bound`), at the first batch size."""
    tp = suite.throughput
    b = tp.batch_sizes[0]
    batch = setup.batch(suite.split, b, tp.batch_kind, opts.data_root).to(opts.device)
    results = [measure_breakdown(s.model.to(opts.device), batch, tp.warmup, tp.repeats_at(b))
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
        miou = _evaluate(setup, dataset, suite, setting, opts)
        if plan_row.trained:
            return {"miou": math.nan, "miou_trained": miou}
        return {"miou": miou, "miou_trained": miou if setting.method == "none" else math.nan}
    if setup.weights.kind == "random":
        return {"miou": math.nan, "miou_trained": math.nan}
    load_head(setup, trained_head(baseline, opts))
    out = {"miou": _evaluate(setup, dataset, suite, setting, opts)}
    out["miou_trained"] = math.nan
    if setting.train and setting.method != "none":
        load_head(setup, trained_head(setup, opts))
        out["miou_trained"] = _evaluate(setup, dataset, suite, setting, opts)
    elif setting.method == "none":
        out["miou_trained"] = out["miou"]
    return out


def trained_head(setup: Setup, opts: RunOptions) -> Path:
    """The head's file: rank 0 trains it (or finds it cached) first, then the other ranks
    find it in the cache (a cache folder shared by all nodes, or they train it too)."""
    main = distributed.is_main()
    if not main:
        distributed.barrier()  # until rank 0 has its head
    path = train_head(setup, root=opts.data_root, progress=opts.progress and main)
    if main:
        distributed.barrier()
    return path


def _evaluate(setup: Setup, dataset, suite: Suite, setting: Setting, opts: RunOptions) -> float:
    """mIoU in %; a batched setting evaluates mixed batches of ``setting.batch`` images
    (the windows of a batch in one forward), the others image by image with
    ``suite.window_batch_size`` windows per forward."""
    model = setup.model.to(distributed.device(opts.device))
    result = evaluate(model, dataset, setup.window, setup.stride, limit=suite.miou_images,
                      progress=opts.progress, distributed=True,
                      batch_size=None if setting.batch else suite.window_batch_size,
                      images_per_batch=setting.batch or 1)
    setup.model.to("cpu")
    return result.miou  # MIoUResult is in percent


def row_miou(suite: Suite, plan_row: Row, opts: RunOptions) -> dict:
    """``miou`` and ``miou_trained`` (%) of one row on real offline weights, as
    :func:`measure_row` reports them; missing parts and heads are trained first."""
    train_missing_parts(suite, plan_row.backbone, plan_row.setting, opts)
    setup = setup_for(suite, plan_row.backbone, plan_row.setting, pretrained=True)
    setup.model.eval()
    return _miou(suite, setup, baseline_for(suite, plan_row, setup), plan_row, opts)
