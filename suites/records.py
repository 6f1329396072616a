"""Typed suite rows: a :class:`RowRecord` per measured row and a :class:`Timing` per
batch size it was timed at.

The row cache keeps plain JSON dicts (``algm-bench/row/v3``, written by
:mod:`suites.measure`: keys such as ``ims_b1``, ``base_ims_b1``, ``contended_b4``);
:meth:`RowRecord.from_row` reads one and :meth:`RowRecord.to_row` gives the same dict
back, so reports work on records while the cache format stays as it is. mIoU is in
percent everywhere (NaN: not measured).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from algm.config import get_backbone, get_dataset
from algm.measure.breakdown import speedup_bound
from algm.methods import build_method, method_class, method_config

# Per batch size N: the record field and the cache key it reads (N substituted).
TIMING_KEYS = {
    "images_per_s": "ims_b{}",
    "median_images_per_s": "ims_b{}_median",
    "std_images_per_s": "ims_b{}_std",
    "baseline_images_per_s": "base_ims_b{}",
    "attainable_images_per_s": "attainable_ims_b{}",
    "attainable_tokens": "attainable_tokens_b{}",
    "timed_gflops": "timed_gflops_b{}",
    "peak_memory_mib": "peak_mem_b{}_mib",
    "cpu_utilisation": "cpu_util_b{}",
    "contended": "contended_b{}",
}
_TIMING_KEY = re.compile("|".join(f"(?:{re.escape(k).replace(re.escape('{}'), '(?P<n%d>[0-9]+)' % i)})$"
                                  for i, k in enumerate(TIMING_KEYS.values())))

# Row keys read into RowRecord fields of the same name; everything else that is not a
# timing key travels in ``RowRecord.extra``.
ROW_FIELDS = ("dataset", "backbone", "method", "setting", "options", "window", "stride", "batch",
              "weights", "checkpoint", "checkpoint_sha256", "trained_with_method", "missing_checkpoint",
              "window_batch_size", "finetune", "gflops", "gflops_images", "tokens_kept_pct",
              "tokens_per_layer", "miou", "miou_trained", "overhead_share", "fixed_share",
              "breakdown_batch", "batch_kind", "cpu_allocator", "seconds", "untimed")


def _nan(value) -> float:
    return math.nan if value is None else float(value)


@dataclass(frozen=True)
class Timing:
    """One batch size of a row, timed interleaved with the baseline (see
    :func:`suites.measure._throughput`): ``images_per_s`` = batch / mean latency,
    ``median_images_per_s`` and ``std_images_per_s`` over the timed forwards,
    ``baseline_images_per_s`` of the baseline timed beside it (None for the baseline
    itself, ``baseline`` True), ``attainable_images_per_s`` of a zero-cost reduction to
    ``timed_gflops`` (GFLOPs per image of the timed batch) timed beside it."""

    batch_size: int
    images_per_s: float
    median_images_per_s: float | None = None
    std_images_per_s: float | None = None
    baseline_images_per_s: float | None = None
    attainable_images_per_s: float | None = None
    attainable_tokens: int | None = None
    timed_gflops: float | None = None
    peak_memory_mib: float | None = None
    cpu_utilisation: float | None = None
    contended: bool = False
    baseline: bool = False  # the baseline's own timing: speed-up 1

    @property
    def speedup(self) -> float | None:
        """images/s over those of the baseline timed interleaved with it (1.0 for the
        baseline; None without an interleaved baseline)."""
        if self.baseline:
            return 1.0
        if not self.baseline_images_per_s:
            return None
        return self.images_per_s / self.baseline_images_per_s

    @property
    def speedup_std(self) -> float | None:
        """The speed-up's spread: the row's relative std of images/s over the timed
        forwards carried to the ratio (the interleaved baseline's own spread is not
        recorded). None where there is no speed-up or no spread."""
        if self.baseline or self.speedup is None or self.std_images_per_s is None or not self.images_per_s:
            return None
        return self.speedup * self.std_images_per_s / self.images_per_s

    @property
    def attainable_speedup(self) -> float | None:
        """The zero-cost reduction's images/s over the same interleaved baseline's."""
        if self.attainable_images_per_s is None or not self.baseline_images_per_s:
            return None
        return self.attainable_images_per_s / self.baseline_images_per_s


@dataclass(frozen=True)
class RowRecord:
    """One measured row (backbone x setting). ``miou``: the off-the-shelf head (or the
    checkpoint's own), ``miou_trained``: a head (or model) trained with the method, both
    in percent, NaN where not measured. ``timings``: batch size -> :class:`Timing` (empty
    for an untimed or GFLOPs-only row). ``options``: the setting's knobs as written in
    the suite; ``batch``: a batched setting's mixed-batch size (None: image by image)."""

    dataset: str
    backbone: str
    method: str
    setting: str
    gflops: float
    tokens_kept_pct: float
    options: dict = field(default_factory=dict)
    batch: int | None = None
    miou: float = math.nan
    miou_trained: float = math.nan
    timings: dict[int, Timing] = field(default_factory=dict)
    tokens_per_layer: list[float] | None = None
    gflops_images: int | None = None
    window: str | None = None
    stride: str | None = None
    weights: str | None = None
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    trained_with_method: bool = False
    missing_checkpoint: str | None = None
    window_batch_size: int | None = None
    finetune: dict | None = None
    overhead_share: float | None = None
    fixed_share: float | None = None
    breakdown_batch: int | None = None
    batch_kind: str | None = None
    cpu_allocator: str | None = None
    seconds: float | None = None
    untimed: bool = False
    extra: dict = field(default_factory=dict)  # keys of the row this record does not model
    # the source row's keys in order, so that to_row() gives the same dict back
    keys: tuple[str, ...] = field(default=(), repr=False, compare=False)

    @property
    def is_baseline(self) -> bool:
        return self.method == "none"

    @property
    def is_default(self) -> bool:
        """The method's default setting: no options, image by image."""
        return not self.options and self.batch is None

    @property
    def train(self) -> bool:
        """The row has a head (or model) trained with its method, besides or instead of
        the off-the-shelf one."""
        return not self.is_baseline and (self.trained_with_method or not math.isnan(self.miou_trained))

    @property
    def batch_sizes(self) -> list[int]:
        return sorted(self.timings)

    def speedup(self, batch_size: int) -> float | None:
        timing = self.timings.get(batch_size)
        return None if timing is None else timing.speedup

    @classmethod
    def from_row(cls, row: dict) -> "RowRecord":
        """The record of a cached row dict (any ``algm-bench/row/v3`` row, old ones
        lacking later fields included)."""
        values: dict[str, Any] = {}
        per_size: dict[int, dict] = {}
        extra = {}
        names = list(TIMING_KEYS)
        for key, value in row.items():
            match = _TIMING_KEY.match(key)
            if key in ROW_FIELDS:
                values[key] = value
            elif match:
                i, n = next((int(g[1:]), v) for g, v in match.groupdict().items() if v is not None)
                per_size.setdefault(int(n), {})[names[i]] = value
            else:
                extra[key] = value
        values["miou"] = _nan(values.get("miou"))
        values["miou_trained"] = _nan(values.get("miou_trained"))
        values["options"] = dict(values.get("options") or {})
        values["trained_with_method"] = bool(values.get("trained_with_method") or False)
        values["untimed"] = bool(values.get("untimed") or False)
        baseline = row.get("method") == "none"
        timings = {b: Timing(batch_size=b, baseline=baseline,
                             **{k: bool(v) if k == "contended" else v for k, v in figures.items()})
                   for b, figures in sorted(per_size.items()) if "images_per_s" in figures}
        orphans = {b for b in per_size if b not in timings}  # figures of a size without its images/s
        for b in orphans:
            extra.update({TIMING_KEYS[k].format(b): v for k, v in per_size[b].items()})
        return cls(**values, timings=timings, extra=extra, keys=tuple(row))

    def to_row(self) -> dict:
        """The cache's dict: the keys of the row it was read from, in the same order (a
        record built directly: every field it has)."""
        out: dict[str, Any] = {}
        for name in ROW_FIELDS:
            out[name] = getattr(self, name)
        for b, timing in self.timings.items():
            for name, key in TIMING_KEYS.items():
                value = getattr(timing, name)
                if value is not None or self.keys:  # a read row's None figures stay
                    out[key.format(b)] = value
        out.update(self.extra)
        if self.keys:
            return {k: out[k] for k in self.keys}
        return out


def baselines(records: list[RowRecord]) -> dict[str, RowRecord]:
    """backbone -> its first ``none`` row (the reference of every delta)."""
    out: dict[str, RowRecord] = {}
    for r in records:
        if r.is_baseline:
            out.setdefault(r.backbone, r)
    return out


def records_from_rows(rows: list[dict]) -> list[RowRecord]:
    return [RowRecord.from_row(r) for r in rows]


# Figures of a row against its backbone's baseline row (``base``); NaN where a figure is missing.

def gflops_delta_pct(r: RowRecord, base: RowRecord | None) -> float:
    """GFLOPs change against the baseline, in %."""
    return math.nan if base is None else (r.gflops / base.gflops - 1) * 100


def miou_delta(r: RowRecord, base: RowRecord | None) -> float:
    """Off-the-shelf mIoU minus the baseline's, in points."""
    return math.nan if base is None else r.miou - base.miou


def miou_trained_delta(r: RowRecord, base: RowRecord | None) -> float:
    """mIoU with the head (model) trained with the method minus the baseline's own head's
    (the baseline's ``miou_trained``: its head is trained the same way, with nothing
    reduced), in points. Never a maximum over the two evaluations."""
    return math.nan if base is None else r.miou_trained - base.miou_trained


def efficiency(r: RowRecord, base: RowRecord | None, batch_size: int) -> float:
    """Speed-up divided by the GFLOPs ratio of the timed batch (baseline GFLOPs over the
    row's ``timed_gflops``): 1.0 means the forward got as much faster as its GFLOPs fell."""
    t = r.timings.get(batch_size)
    if base is None or t is None or t.speedup is None or t.timed_gflops is None:
        return math.nan
    return t.speedup * t.timed_gflops / base.gflops


def speedup_bound_of(r: RowRecord, base: RowRecord | None) -> float:
    """The Amdahl bound of the baseline's fixed stages at the GFLOPs ratio of the batch
    the breakdown timed (the row's mean GFLOPs where that batch has none)."""
    if base is None or r.fixed_share is None or r.breakdown_batch is None:
        return math.nan
    t = r.timings.get(int(r.breakdown_batch))
    gflops = t.timed_gflops if t is not None and t.timed_gflops is not None else r.gflops
    return speedup_bound(r.fixed_share, base.gflops / gflops)


def resolved_settings(r: RowRecord) -> dict:
    """Every knob of the row's method with the value it ran with: the method built
    through the registry (with its ``untrained_options`` where its trained parts are not
    here) and its ``settings()``, per-backbone defaults filled in; its config's own values
    where it cannot be built; the row's options for a method the registry does not know
    (another run's plugin)."""
    return dict(_resolved(r.method, r.backbone, r.dataset, json.dumps(r.options, sort_keys=True)))


@lru_cache(maxsize=None)  # building a method may read its trained parts: once per setting
def _resolved(method: str, backbone: str, dataset: str, options: str) -> dict:
    given = json.loads(options)
    try:
        cls, config = method_class(method), method_config(method, **given)
    except ValueError:
        return given
    for extra in ({}, cls.untrained_options):
        try:
            return build_method(method, get_backbone(backbone), get_dataset(dataset), **given, **extra).settings()
        except (OSError, ValueError, TypeError, KeyError):
            continue
    return dataclasses.asdict(config)
