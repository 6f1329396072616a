"""Which rows a suite has, and on which weights (:func:`plan`).

* A backbone with ``DIR/<dataset>/<backbone>/none/checkpoint.pth`` (+ ``variant.yml``)
  under ``--checkpoints DIR`` runs on checkpoints: ``none/`` is the Segmenter every
  method is applied to off the shelf, and ``DIR/<dataset>/<backbone>/<method>/`` a model
  trained with that method, which adds a row per setting of it measured entirely on
  those weights (a fine-tuning suite writes both: :func:`suites.runner.finetune_models`);
* otherwise a backbone with real offline weights (``vit-s14``) keeps its encoder frozen
  and trains heads here: the off-the-shelf head (trained without reduction, the method
  applied at test time) and, for settings marked ``train``, a head trained with the
  method active;
* otherwise it keeps GFLOPs-only rows on random weights, and the rows say which file
  was missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from algm.build import checkpoint_facts
from algm.config import get_backbone
from algm.fetch import layout_dir
from suites.definition import Setting, Suite

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
    untimed: bool = False  # GFLOPs and mIoU now, timings by a later run (a busy machine)


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


def selected_backbones(suite: Suite, opts: RunOptions) -> tuple[str, ...]:
    """The suite's backbones, restricted to ``--backbones`` (which must be among them)."""
    if not opts.backbones:
        return suite.backbones
    unknown = sorted(set(opts.backbones) - set(suite.backbones))
    if unknown:
        raise ValueError(f"--backbones {','.join(unknown)}: not in suite {suite.name} "
                         f"({', '.join(suite.backbones)})")
    return tuple(b for b in suite.backbones if b in opts.backbones)


def plan(suite: Suite, opts: RunOptions) -> list[Row]:
    """The rows of a suite, in suite order (trained-with-method rows after their
    off-the-shelf twin). A backbone with ``DIR/<dataset>/<backbone>/none/`` runs on those
    checkpoints, one with real offline weights otherwise trains its heads here. Every
    checkpoint's variant.yml is checked against the suite's dataset and the backbone
    before any row runs."""
    backbones = selected_backbones(suite, opts)
    rows = []
    for backbone in backbones:
        base = checkpoint_path(opts.checkpoints, suite.dataset, backbone, "none") if opts.checkpoints else None
        if (base is None or not base.is_file()) and get_backbone(backbone).weights is not None:
            rows += [Row(backbone, s) for s in suite.settings]
            continue
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
