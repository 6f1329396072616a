"""The trained parts a suite uses, shipped with the package (:mod:`algm.shipped`), and
their check: retrain every one from scratch and compare.

:func:`suite_parts` lists, for the real-weight rows of a suite, the heads they load (the
off-the-shelf head; for ``train`` settings the head trained with the method) and the
method's own trained files (:meth:`~algm.reduction.TokenReduction.training_tasks`), each
with the first row that uses it. :func:`ship` copies them from the cache into the
package with a manifest (``python -m suites.shipped_parts camvid``, after a run that
trained them). :func:`verify` retrains them in an empty cache and compares tensors and
the mIoU of the rows that use them (``algm-bench parts --verify``).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from algm import atomic, shipped
from algm.files import file_sha256
from algm.cache import cache_dir
from algm.config import get_backbone, get_dataset
from algm.data.datasets import build_dataset, check_files
from algm.methods import method_class, method_config
from algm.training.features import training_context
from algm.training.head import TrainConfig, train_head, trained_head_path
from algm.weights.torch_file import load_torch_file
from suites.definition import Setting, Suite, load_suite
from suites.machine import machine_record
from suites.measure import row_miou, setup_for
from suites.plan import Row, RunOptions, plan


@dataclass(frozen=True)
class Part:
    """One trained file a suite's rows read: where the cache holds it, what it is, the
    first row that uses it, and the setting whose head it is (None: a method's file)."""

    path: Path
    what: str
    row: Row
    head_of: Setting | None = None


def suite_parts(suite: Suite, opts: RunOptions) -> list[Part]:
    """Every trained part the suite's real-weight rows use, once each (first row wins),
    found in the cache or installed from the package; one that is neither is a
    FileNotFoundError."""
    parts: dict[Path, Part] = {}
    looked_up = set()  # (backbone, setting label): building the model to find its head is the slow part
    for row in plan(suite, opts):
        if row.checkpoint is not None or row.gflops_only or get_backbone(row.backbone).weights is None:
            continue
        heads = [Setting("none")] + ([row.setting] if row.setting.train and row.setting.method != "none" else [])
        for setting in heads:
            if (row.backbone, setting.label()) in looked_up:
                continue
            looked_up.add((row.backbone, setting.label()))
            path = trained_head_path(setup_for(suite, row.backbone, setting, pretrained=True), root=opts.data_root)
            if path is None:
                raise FileNotFoundError(f"the {setting.label()} head of {suite.name} / {row.backbone} is not trained "
                                        f"yet: run `algm-bench bench --dataset {suite.name}` first")
            how = "without reduction" if setting.method == "none" else f"with {setting.label()}"
            parts.setdefault(path, Part(path, f"{suite.decoder} head ({row.backbone}, {suite.dataset}, trained {how})",
                                        row, setting))
        for task in _tasks(suite, row):
            if not (task.path.is_file() or shipped.install(task.path)):
                raise FileNotFoundError(f"{task.name} is not trained yet: run `algm-bench bench --dataset "
                                        f"{suite.name}` first")
            parts.setdefault(task.path, Part(task.path, task.name, row))
    return list(parts.values())


def _tasks(suite: Suite, row: Row) -> list:
    method = row.setting.method
    return method_class(method).training_tasks(method_config(method, **row.setting.options),
                                               get_backbone(row.backbone), get_dataset(suite.dataset))


def _used_by(row: Row) -> dict:
    s = row.setting
    return {"backbone": row.backbone, "method": s.method, "options": s.options, "train": s.train, "batch": s.batch}


def _row(suite: Suite, used_by: dict) -> Row:
    return Row(used_by["backbone"], Setting(used_by["method"], used_by["options"], used_by["train"], used_by["batch"]))


def ship(suite: Suite, opts: RunOptions, folder: Path | None = None) -> dict:
    """Copy the suite's trained parts from the cache into ``folder`` (files under their
    cache-relative paths, others removed) and write its ``manifest.json``; returns it."""
    folder = folder or shipped.SHIPPED_DIR
    entries = []
    for part in suite_parts(suite, opts):
        relpath = shipped.relative_to_cache(part.path)
        target = folder / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic.copy_file(part.path, target)
        entry = {"path": relpath, "what": part.what, "sha256": file_sha256(target),
                 "bytes": target.stat().st_size, "used_by": _used_by(part.row)}
        if part.head_of is not None:
            meta = json.loads(load_torch_file(part.path, what="head")["meta"])
            entry["head_of"] = _used_by(Row(part.row.backbone, part.head_of))
            entry["precision"] = meta["train"]["precision"]
        entries.append(entry)
    shipping = {e["path"] for e in entries} | {"manifest.json"}
    for stale in folder.rglob("*"):
        if stale.is_file() and stale.relative_to(folder).as_posix() not in shipping:
            stale.unlink()
    manifest = {"format": shipped.MANIFEST_FORMAT, "suite": suite.name, "trained_on": machine_record(),
                "parts": entries}
    atomic.write_json(folder / "manifest.json", manifest)
    return manifest


# ------------------------------------------------------------------ verification
@contextmanager
def _cache(root: Path, use_shipped: bool):
    """Inside the block the cache is ``root`` (its converted encoder weights linked from
    the usual cache: converting them is not training) and shipped parts are installed
    or not."""
    weights = cache_dir("weights")
    saved = {k: os.environ.get(k) for k in ("ALGM_BENCH_CACHE", shipped.ENV)}
    os.environ["ALGM_BENCH_CACHE"], os.environ[shipped.ENV] = str(root), "1" if use_shipped else "0"
    try:
        for f in weights.iterdir():
            if f.is_file() and not (cache_dir("weights") / f.name).exists():
                _link_or_copy(f, cache_dir("weights") / f.name)
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system
        atomic.copy_file(source, target)


def retrain(suite: Suite, part: dict, opts: RunOptions) -> Path:
    """Train the manifest entry ``part`` again in the current cache (a head in the
    precision it was trained in); returns where it was written."""
    row = _row(suite, part["used_by"])
    if "head_of" in part:
        setup = setup_for(suite, row.backbone, _row(suite, part["head_of"]).setting, pretrained=True)
        return train_head(setup, root=opts.data_root, config=TrainConfig(precision=part["precision"]),
                          progress=opts.progress, load=False)
    task = next((t for t in _tasks(suite, row) if shipped.relative_to_cache(t.path) == part["path"]), None)
    if task is None:
        raise ValueError(f"{row.setting.label()} no longer trains {part['path']}: its training changed, ship again")
    task.run(training_context(opts.data_root, suite.window_for(row.backbone), opts.progress))
    return task.path


def tensor_difference(a: Path, b: Path) -> float:
    """Largest absolute difference between the tensors of two trained files (0.0: all
    equal; inf: their tensors differ in names or shapes). Other values (metadata,
    timings) are ignored."""
    ta, tb = _tensors(load_torch_file(a, what="trained part")), _tensors(load_torch_file(b, what="trained part"))
    if ta.keys() != tb.keys() or any(ta[k].shape != tb[k].shape for k in ta):
        return math.inf
    return max((float((ta[k].double() - tb[k].double()).abs().max()) for k in ta if ta[k].numel()), default=0.0)


def _tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return {k: v for key, value in items for k, v in _tensors(value, f"{prefix}/{key}").items()}


def verify(work: Path, opts: RunOptions, tolerance: float = 0.5, folder: Path | None = None) -> list[dict]:
    """Retrain every shipped part in the empty cache ``work/retrained`` and compare it
    with the shipped file: the largest tensor difference, and the mIoU (%) of the row
    that uses it with every part shipped (cache ``work/shipped``) vs every part
    retrained. A part reproduces if its tensors are equal or those mIoU differ by at
    most ``tolerance`` points. Results go to ``work/verify.json``; a rerun resumes."""
    folder = folder or shipped.SHIPPED_DIR
    manifest = shipped.manifest(folder)
    suite = load_suite(manifest["suite"])
    for split in dict.fromkeys(("train", suite.split)):  # a missing data root fails before anything is written
        check_files(build_dataset(suite.dataset, split, root=opts.data_root))
    results = []
    for part in manifest["parts"]:
        row = _row(suite, part["used_by"])
        with _cache(work / "retrained", use_shipped=False):
            start = time.perf_counter()  # a part already retrained by an earlier run: seconds to find it
            path = retrain(suite, part, opts)
            seconds = time.perf_counter() - start
            diff = tensor_difference(folder / part["path"], path)
            retrained = row_miou(suite, row, opts)
        with _cache(work / "shipped", use_shipped=True):
            original = row_miou(suite, row, opts)
        deltas = [abs(retrained[k] - original[k]) for k in ("miou", "miou_trained")
                  if not (math.isnan(retrained[k]) and math.isnan(original[k]))]
        results.append({"path": part["path"], "what": part["what"], "row": row.setting.label(),
                        "retrain_seconds": seconds, "max_abs_difference": diff, "miou_shipped": original, "miou_retrained": retrained,
                        "reproduces": diff == 0.0 or max(deltas, default=math.inf) <= tolerance})
    atomic.write_json(work / "verify.json", {"tolerance_pp": tolerance, "machine": machine_record(),
                                             "parts": results})
    return results


if __name__ == "__main__":  # maintainers: ship the parts a finished run of this suite trained
    if len(sys.argv) != 2:
        sys.exit("usage: python -m suites.shipped_parts SUITE")
    print(json.dumps(ship(load_suite(sys.argv[1]), RunOptions(progress=False)), indent=1))
