"""Run a suite: fine-tune its models if it says so, then every planned row
(:mod:`suites.plan`), each measured once (:mod:`suites.measure`) and cached by its full
config.

Finished rows are JSON files in ``cache_dir("rows", suite)``, so a killed run resumes
where it stopped; a damaged entry is moved aside and measured again, and a row whose
timing competed with other processes is timed again. Under torchrun row files are read
and written by rank 0 only.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from algm import atomic, distributed
from algm.build import Setup
from algm.cache import cache_dir, move_aside
from algm.config import get_backbone, get_dataset
from algm.data.datasets import build_dataset, check_files
from algm.files import checkpoint_sha256
from algm.fetch import layout_dir
from algm.methods import build_method
from algm.safe_yaml import brief, clip
from algm.training.finetune import finetune
from algm.training.head import load_head
from suites.definition import Setting, Suite
from suites.machine import machine_record
from suites.measure import (has_data, measure_row, retime, setup_for, stale_sizes, train_missing_parts,
                            trained_head)
from suites.plan import CHECKPOINT_FILE, Row, RunOptions, checkpoint_path, plan, selected_backbones

ROW_VERSION = 3  # bump when the meaning of a row's numbers changes
ROW_FORMAT = f"algm-bench/row/v{ROW_VERSION}"
ROW_FIELDS = {"backbone", "method", "setting", "gflops", "tokens_kept_pct"}  # every row has these


def row_key(suite: Suite, row: Row, opts: RunOptions, method: dict) -> str:
    """Hash of everything that determines a row's numbers: ``method`` is the method's
    :meth:`~algm.reduction.TokenReduction.identity` (resolved settings, digests of its
    trained parts), checkpoints count by their content."""
    setting = row.setting
    config = {
        "version": ROW_VERSION, "dataset": suite.dataset, "split": suite.split, "backbone": row.backbone,
        "method": method, "train": setting.train,
        "decoder": suite.decoder, "window": suite.window_for(row.backbone),
        "flops_images": suite.flops_images, "miou_images": suite.miou_images,
        "window_batch_size": suite.window_batch_size, "throughput": _throughput_config(suite),
        "flops_only": opts.flops_only or row.gflops_only, "device": opts.device,
        "data_root": opts.data_root, "missing": row.missing, "trained": row.trained,
        "checkpoint": _content(row.checkpoint), "baseline": _content(row.baseline),
    }
    if setting.batch is not None:  # only when set: the keys of unbatched rows stay as they were
        config["batch"] = setting.batch
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _throughput_config(suite: Suite) -> dict:
    """The timing settings a row depends on; ``min_images`` only when set, so that the
    keys of suites without it stay as they were. ``attainable`` is left out: it adds a
    figure and changes none, so a cached row without it is timed again
    (:func:`~suites.measure.stale_sizes`), not measured again."""
    config = asdict(suite.throughput)
    del config["attainable"]
    if not config["min_images"]:
        del config["min_images"]
    return config


def _content(path: Path | None) -> str | None:
    return None if path is None else checkpoint_sha256(path)


def first_answer(todo: list[Row]) -> set[int]:
    """Indices of the rows that give a first answer: per backbone and method its default
    setting (no options, image by image), else its first one in the suite."""
    picked: dict[tuple, int] = {}
    for i, r in enumerate(todo):
        group = (r.backbone, r.setting.method, r.trained)
        default = not r.setting.options and r.setting.batch is None
        if group not in picked or default and (todo[picked[group]].setting.options or todo[picked[group]].setting.batch):
            picked[group] = i
    return set(picked.values())


def run_suite(suite: Suite, opts: RunOptions, on_measured: Callable[[dict], None] | None = None,
              on_progress: Callable[[list[dict], int], None] | None = None) -> list[dict]:
    """Measure (or read from cache) every row of ``suite``; returns them in suite order.
    A suite with ``finetune`` first fine-tunes its models and measures those. The
    :func:`first_answer` rows are measured first. ``on_measured`` is called with every
    row this run measures or times again; ``on_progress`` with the rows finished so far
    (suite order) and the number planned once the first-answer rows are all there, and after every later row
    measured or timed again."""
    if not opts.flops_only:  # fails naming the expected layout, or the first unreadable file
        check_files(build_dataset(suite.dataset, suite.split, root=opts.data_root))
    if suite.finetune is not None and not opts.flops_only:
        opts = replace(opts, checkpoints=str(finetune_models(suite, opts)))
    rows_dir = cache_dir("rows", suite.name)
    data_present = has_data(suite, opts)
    todo = [r for r in plan(suite, opts)
            if not ((opts.flops_only or r.gflops_only) and r.setting.method != "none" and not data_present)]
    first = first_answer(todo)
    done: dict[int, dict] = {}
    main = distributed.is_main()
    bar = tqdm(sorted(range(len(todo)), key=lambda i: i not in first), desc=f"suite {suite.name}", unit="row",
               disable=not opts.progress or not main)
    for i in bar:
        row_plan = todo[i]
        bar.set_postfix_str(f"{row_plan.backbone} {row_plan.setting.label()}")
        key = row_key(suite, row_plan, opts, method_identity(suite, row_plan, opts))
        path = rows_dir / f"{key}.json"
        fresh = opts.fresh or row_plan.setting.method in opts.fresh_methods
        row = distributed.broadcast_object(read_row(path, key) if main and not fresh else None)
        changed = True
        if row is None:
            start = time.perf_counter()
            row = measure_row(suite, row_plan, opts)
            row["seconds"] = time.perf_counter() - start  # training of missing parts included
        elif stale_sizes(row, suite) and not row_plan.gflops_only and not opts.untimed:  # contended, timed another way, or lacking a figure
            row = retime(suite, row_plan, row, opts)
        else:
            changed = False
        if main:
            atomic.write_json(path, {"format": ROW_FORMAT, "key": key, "row": row}, indent=None)
        if changed and on_measured:
            on_measured(row)
        done[i] = row
        if on_progress and first <= done.keys() and (changed or i in first) and len(done) < len(todo):
            on_progress([done[j] for j in sorted(done)], len(todo))
    return [done[i] for i in range(len(todo))]


def method_identity(suite: Suite, row: Row, opts: RunOptions, train: bool = True) -> dict:
    """The identity of the row's method as the row will measure it: its missing trained
    parts are trained first (cached; ``train=False``: a missing part is a
    FileNotFoundError), so retraining a part or changing a default gives another key."""
    backbone, setting = row.backbone, row.setting
    if train and get_backbone(backbone).weights is not None and has_data(suite, opts):
        train_missing_parts(suite, backbone, setting, opts)
    return build_method(setting.method, get_backbone(backbone), get_dataset(suite.dataset),
                        **setting.options).identity()


def cached_row(suite: Suite, row: Row, opts: RunOptions) -> dict | None:
    """The planned ``row`` as the row cache holds it under its key, measuring and
    training nothing; None if it is not there (or was damaged: :func:`read_row`)."""
    try:
        key = row_key(suite, row, opts, method_identity(suite, row, opts, train=False))
    except FileNotFoundError:  # a trained part the row needs was never trained
        return None
    return read_row(cache_dir("rows", suite.name) / f"{key}.json", key)


def read_row(path: Path, key: str) -> dict | None:
    """A cached row, or None: missing, or damaged (unparsable, another key or format, no
    numbers, or a figure out of range: :func:`check_row_numbers`), in which case it is
    moved aside (:func:`~algm.cache.move_aside`) to be measured again."""
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
        check_row_numbers(row)
        return row
    except (ValueError, KeyError, TypeError, AttributeError) as err:  # JSONDecodeError is a ValueError
        move_aside(path, clip(err), "cached row")
        return None


def check_row_numbers(row: dict) -> None:
    """A ValueError naming the first figure of a cached row that is no number, not finite
    or out of range: GFLOPs > 0, tokens kept and mIoU within 0-100 (mIoU NaN: not
    measured), every other figure >= 0."""
    for name in ("gflops", "tokens_kept_pct"):
        if isinstance(row[name], bool) or not isinstance(row[name], (int, float)):
            raise ValueError(f"{name} is {brief(row[name])}, not a number")
    for name, value in row.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if name.startswith("miou") and math.isnan(value):
            continue
        top = 100 if name == "tokens_kept_pct" or name.startswith("miou") else math.inf
        if not (0 <= value <= top and math.isfinite(value)) or (name == "gflops" and value == 0):
            raise ValueError(f"{name} is {value!r}, out of range")


def finetune_models(suite: Suite, opts: RunOptions) -> Path:
    """Fine-tune (or find cached) ``none`` and every setting marked ``train`` on each
    backbone with the suite's :class:`~algm.training.finetune.FinetuneConfig`, all from
    the same start (:func:`finetune_start`), into the checkpoint layout under
    ``cache_dir("finetuned", <suite>)``; returns that root. Only rank 0 trains."""
    root = cache_dir("finetuned", suite.name)
    if distributed.is_main():
        for backbone in selected_backbones(suite, opts):
            for setting in [Setting("none")] + [s for s in suite.settings if s.train and s.method != "none"]:
                setup = finetune_start(suite, backbone, setting, opts)
                if opts.progress:
                    print(f"fine-tuning {backbone} {setting.label()} (epochs={suite.finetune.epochs}, "
                          f"freeze_blocks={suite.finetune.freeze_blocks})")
                finetune(setup, suite.finetune, layout_dir(root, suite.dataset, backbone, setting.method),
                         root=opts.data_root, device=opts.device, progress=opts.progress, overwrite=True)
    distributed.barrier()
    return root


def finetune_start(suite: Suite, backbone: str, setting: Setting, opts: RunOptions) -> Setup:
    """The start of fine-tuning, driven by the setting's method: ``--checkpoints``'
    ``none`` model if there is one, else the offline encoder with its off-the-shelf head."""
    base = checkpoint_path(opts.checkpoints, suite.dataset, backbone, "none") if opts.checkpoints else None
    if base is not None and base.is_file():
        return setup_for(suite, backbone, setting, checkpoint=base)
    if get_backbone(backbone).weights is None:
        raise ValueError(f"suite {suite.name} fine-tunes {backbone}, which has no offline weights: pass "
                         f"--checkpoints DIR with DIR/{suite.dataset}/{backbone}/none/{CHECKPOINT_FILE} "
                         f"as the start")
    train_missing_parts(suite, backbone, setting, opts)
    setup = setup_for(suite, backbone, setting, pretrained=True)
    load_head(setup, trained_head(setup_for(suite, backbone, Setting("none"), pretrained=True), opts))
    return setup


def write_machine(out_dir: Path, opts: RunOptions) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out_dir / "machine.json", json.dumps(machine_record(opts.device), indent=2) + "\n")
