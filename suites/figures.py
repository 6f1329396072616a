"""The data figures of a suite run, drawn from its :class:`~suites.records.RowRecord` rows.

:func:`write_figures` writes every figure that the records have data for:

* ``miou_vs_speedup.png``: mIoU against the measured speed-up at the smallest timed
  batch (error bars: its spread), ``miou_vs_gflops.png``: against GFLOPs per image.
  One colour per method, every point labelled by its setting and mIoU, the Pareto front
  over all points marked; off-the-shelf heads and heads trained with the method are
  separate series (circles, diamonds), methods with trained parts (a learned policy,
  exit heads) hollow; a line joins only settings that differ in one numeric knob.
* ``speedup_vs_batch.png``: speed-up against batch size per method at its reference
  setting (:func:`reference_records`), batched settings as their own points.
* ``stage_time.png``: time per image relative to the baseline's, split into the fixed
  stages, the method's own steps and the transformer blocks.
* ``tokens_per_layer.png``: tokens alive after every block, in % of the baseline's.

Matplotlib through ``matplotlib.figure.Figure`` only (no pyplot); files are written
atomically (:func:`algm.pictures.figures.save_figure`). Methods are known through the
registry only (:mod:`algm.methods`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Sequence

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from algm.config import get_backbone, get_dataset
from algm.methods import method_class, method_config
from algm.pictures.figures import save_figure
from suites.records import RowRecord, baselines, resolved_settings

OFF_THE_SHELF, TRAINED = "off-the-shelf head", "head trained with the method"
SERIES_MARKER = {OFF_THE_SHELF: "o", TRAINED: "D"}
BASELINE_COLOR = "black"
FRONT_COLOR = "0.25"
MIN_MIOU_SPAN = 10.0  # mIoU points the y-axis spans at least: a 1-point gap stays small


# ============================================================ what the figures show
def setting_label(r: RowRecord) -> str:
    """The short label of a row's setting: ``tau=0.9``, ``r=16``, ``policy=learned``,
    ``batch=8`` (a batched row), ``default`` (no options), ``baseline``."""
    if r.is_baseline and not r.options and r.batch is None:
        return "baseline"
    parts = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.options.items()]
    if r.batch is not None:
        parts.append(f"batch={r.batch}")
    return ", ".join(parts) or "default"


def _number(value) -> float | None:
    """A knob's value as a number (numeric strings such as ``"0.7"`` included), else None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(str(value))
    except ValueError:
        return None


def sweeps(settings: Sequence[Mapping]) -> list[tuple[str, list[int]]]:
    """The one-knob sweeps among one method's settings: ``(knob, indices)`` for every
    group of at least two settings (resolved knob dicts) that agree on every knob but
    ``knob``, whose values there are distinct numbers; indices sorted by that value.
    A setting may lie on several sweeps (one per knob); settings that differ in two knobs,
    or in a knob that is not a number, share none."""
    out = []
    knobs = list(dict.fromkeys(k for s in settings for k in s))
    for knob in knobs:
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(settings):
            if knob in s and _number(s[knob]) is not None:
                rest = tuple(sorted((k, repr(v)) for k, v in s.items() if k != knob))
                groups.setdefault(rest, []).append(i)
        for members in groups.values():
            values = [_number(settings[i][knob]) for i in members]
            if len(members) > 1 and len(set(values)) == len(values):
                out.append((knob, [i for _, i in sorted(zip(values, members))]))
    return out


def pareto_front(x: Sequence[float], y: Sequence[float], lower_x_better: bool = False) -> list[int]:
    """Indices of the points no other point dominates (at least as good in x and in y,
    better in one; y higher is better, x higher unless ``lower_x_better``), by x ascending."""
    xs = -np.asarray(x, float) if lower_x_better else np.asarray(x, float)
    ys = np.asarray(y, float)
    geq = (xs[None, :] >= xs[:, None]) & (ys[None, :] >= ys[:, None])  # [i, j]: j at least as good as i
    better = (xs[None, :] > xs[:, None]) | (ys[None, :] > ys[:, None])
    on_front = ~(geq & better).any(axis=1)
    idx = np.flatnonzero(on_front)
    return [int(i) for i in idx[np.argsort(np.asarray(x, float)[idx], kind="stable")]]


def has_trained_parts(r: RowRecord) -> bool:
    """The row's method reads parts trained for it (CTS's learned policy, pruning's exit
    heads): it has training tasks in the registry. False for a method it does not know."""
    try:
        cls, config = method_class(r.method), method_config(r.method, **r.options)
    except ValueError:
        return False
    return bool(cls.training_tasks(config, get_backbone(r.backbone), get_dataset(r.dataset)))


def reference_records(records: Sequence[RowRecord]) -> list[RowRecord]:
    """One image-by-image row per backbone x method: its default setting, else the
    suite's first setting of the method (a method whose every setting names a knob)."""
    out: dict[tuple[str, str], RowRecord] = {}
    for r in records:
        if r.batch is not None:
            continue
        key = (r.backbone, r.method)
        if key not in out or (r.is_default and not out[key].is_default):
            out[key] = r
    return list(out.values())


class Point(NamedTuple):
    """One point of a trade-off plot: the row, its series (:data:`OFF_THE_SHELF` or
    :data:`TRAINED`), x, its error (None: none) and the mIoU in percent."""

    record: RowRecord
    series: str
    x: float
    xerr: float | None
    y: float


def tradeoff_points(records: Sequence[RowRecord], x: Callable[[RowRecord], tuple[float | None, float | None]],
                    ) -> list[Point]:
    """Every row's off-the-shelf point and, where measured, its trained-head point (two
    points, never the better of them); ``x(record)`` gives (x, error) or (None, _) for
    no point. The baseline's trained head shows only where it differs from its own."""
    out = []
    for r in records:
        value, err = x(r)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        if not math.isnan(r.miou):
            out.append(Point(r, OFF_THE_SHELF, value, err, r.miou))
        if not math.isnan(r.miou_trained) and not (r.is_baseline and r.miou_trained == r.miou):
            out.append(Point(r, TRAINED, value, err, r.miou_trained))
    return out


# ================================================================ drawing
def _colours(records: Sequence[RowRecord]) -> dict[str, str]:
    """A colour per method (black for the baseline), in order of first appearance."""
    names = [m for m in dict.fromkeys(r.method for r in records) if m != "none"]
    cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    colours = {m: matplotlib.colors.to_hex(cmap(i % cmap.N)) for i, m in enumerate(names)}
    colours["none"] = BASELINE_COLOR
    return colours


def _figure(n_axes: int, title: str, caption: str, specifics: str, legend_width: float = 2.3,
            size: tuple[float, float] = (7.6, 5.6)) -> tuple[Figure, list[Axes]]:
    """A figure of ``n_axes`` plots side by side, the title, the caller's caption and this
    figure's ``specifics`` above, room for a legend at the right."""
    w, h = size
    top = 0.9
    fig_w, fig_h = n_axes * w + legend_width, h + top
    fig = Figure(figsize=(fig_w, fig_h), dpi=110)
    axes = [fig.add_axes(((0.7 + k * w) / fig_w, 0.6 / fig_h, (w - 0.9) / fig_w, (h - 0.75) / fig_h))
            for k in range(n_axes)]
    fig.text(0.5, 1 - 0.08 / fig_h, title, ha="center", va="top", fontsize=11)
    fig.text(0.5, 1 - 0.38 / fig_h, f"{caption}\n{specifics}", ha="center", va="top", fontsize=7, color="0.3")
    return fig, axes


def _legend(fig: Figure, handles: list) -> None:
    fig.legend(handles=handles, loc="center right", fontsize=7, frameon=False, handlelength=1.6,
               borderaxespad=0.3)


def _method_handles(colours: Mapping[str, str]) -> list:
    return [Line2D([], [], color=c, marker="*" if m == "none" else "o", linestyle="-" if m != "none" else "none",
                   markersize=9 if m == "none" else 5, label="baseline" if m == "none" else m)
            for m, c in colours.items()]


def _floor_axis(ax: Axes, values: Sequence[float]) -> None:
    """y from a sensible floor: at least :data:`MIN_MIOU_SPAN` points shown, so a small
    gap does not fill the axis."""
    lo, hi = min(values), max(values)
    pad = max((MIN_MIOU_SPAN - (hi - lo)) / 2, 0.0) + 0.08 * (hi - lo) + 0.5
    ax.set_ylim(lo - pad, hi + pad)


def _tradeoff_axes(ax: Axes, points: list[Point], colours: Mapping[str, str], lower_x_better: bool) -> None:
    """Points, one-knob sweep lines, labels and the Pareto front on one backbone's axes."""
    for p in points:
        r = p.record
        hollow = has_trained_parts(r)
        colour = colours[r.method]
        marker = "*" if r.is_baseline else SERIES_MARKER[p.series]
        ax.errorbar([p.x], [p.y], xerr=None if p.xerr is None else [p.xerr], fmt=marker, color=colour,
                    markersize=12 if r.is_baseline else 5, markerfacecolor="white" if hollow else colour,
                    markeredgewidth=1.2, ecolor=colour, elinewidth=0.8, capsize=2, zorder=3)
    groups: dict[tuple, list[Point]] = {}
    for p in points:
        if p.record.batch is None and not p.record.is_baseline:
            groups.setdefault((p.record.method, p.series), []).append(p)
    for (method, series), members in groups.items():
        for _, order in sweeps([resolved_settings(p.record) for p in members]):
            line = [members[i] for i in order]
            ax.plot([p.x for p in line], [p.y for p in line], color=colours[method],
                    linestyle="-" if series == OFF_THE_SHELF else "--", linewidth=1, zorder=2)
    front = [points[i] for i in pareto_front([p.x for p in points], [p.y for p in points], lower_x_better)]
    ax.step([p.x for p in front], [p.y for p in front], where="post" if lower_x_better else "pre",
            color=FRONT_COLOR, linewidth=1.6, alpha=0.45, zorder=1)
    ax.scatter([p.x for p in front], [p.y for p in front], s=130, facecolors="none", edgecolors=FRONT_COLOR,
               linewidths=1.0, zorder=1)
    _floor_axis(ax, [p.y for p in points])
    _place_labels(ax, [(p.x, p.y, f"{setting_label(p.record)}: {p.y:.1f}", colours[p.record.method])
                       for p in points])
    ax.set_ylabel("mIoU (%)")
    ax.grid(alpha=0.3)


LABEL_SIZE = 5.5  # points
# Where a point's label may go, in points from the point, tried in this order.
LABEL_OFFSETS = ((4, 2), (4, -7), (-4, 2), (-4, -7), (4, 9), (-4, 9), (4, -14), (-4, -14), (4, 16), (-4, -21))


def _place_labels(ax: Axes, labels: Sequence[tuple[float, float, str, str]]) -> None:
    """Annotate (x, y, text, colour) points, each label at the first of
    :data:`LABEL_OFFSETS` where it overlaps no label placed before (by estimated text
    boxes in display space; the first offset where all are taken). Call after the
    axis limits are final."""
    ax.autoscale_view()
    scale = ax.figure.dpi / 72  # pixels per point
    taken: list[tuple[float, float, float, float]] = []
    for x, y, text, colour in sorted(labels, key=lambda item: -item[1]):
        px, py = ax.transData.transform((x, y))
        w, h = 0.55 * LABEL_SIZE * len(text) * scale, 1.2 * LABEL_SIZE * scale
        for dx, dy in LABEL_OFFSETS:
            left = px + dx * scale - (w if dx < 0 else 0)
            box = (left, py + dy * scale, left + w, py + dy * scale + h)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in taken):
                break
        else:
            dx, dy = LABEL_OFFSETS[0]
            left = px + dx * scale
            box = (left, py + dy * scale, left + w, py + dy * scale + h)
        taken.append(box)
        ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=LABEL_SIZE, color=colour,
                    ha="right" if dx < 0 else "left", va="bottom", zorder=4)


def _tradeoff_legend(colours: Mapping[str, str], points: list[Point]) -> list:
    handles = _method_handles(colours)
    finetuned = any(isinstance(p.record.finetune, dict) for p in points if p.series == TRAINED)
    trained_label = "model fine-tuned with the method" if finetuned else TRAINED
    handles += [Line2D([], [], color="0.4", marker="o", linestyle="-", label=OFF_THE_SHELF),
                Line2D([], [], color="0.4", marker="D", linestyle="--", label=trained_label),
                Line2D([], [], color="0.4", marker="o", markerfacecolor="white", linestyle="none",
                       label="method with trained parts"),
                Line2D([], [], color=FRONT_COLOR, marker="o", markerfacecolor="none", markersize=11, alpha=0.6,
                       label="Pareto front")]
    return handles


def _by_backbone(records: Sequence[RowRecord]) -> dict[str, list[RowRecord]]:
    out: dict[str, list[RowRecord]] = {}
    for r in records:
        out.setdefault(r.backbone, []).append(r)
    return out


def _tradeoff_figure(records: Sequence[RowRecord], x, xlabel: str, title: str, caption: str, specifics: str,
                     lower_x_better: bool, mark_baseline_x: bool = False) -> Figure | None:
    per_backbone = {b: tradeoff_points(rs, x) for b, rs in _by_backbone(records).items()}
    per_backbone = {b: pts for b, pts in per_backbone.items() if pts}
    if not per_backbone:
        return None
    colours = _colours(records)
    fig, axes = _figure(len(per_backbone), title, caption, specifics)
    for ax, (backbone, points) in zip(axes, per_backbone.items()):
        _tradeoff_axes(ax, points, colours, lower_x_better)
        if mark_baseline_x:
            for p in points:
                if p.record.is_baseline:
                    ax.axvline(p.x, color=BASELINE_COLOR, linestyle=":", linewidth=0.8, zorder=0)
        ax.set_xlabel(xlabel)
        ax.set_title(backbone, fontsize=9)
    _legend(fig, _tradeoff_legend(colours, [p for pts in per_backbone.values() for p in pts]))
    return fig


def _smallest_batch(records: Sequence[RowRecord]) -> int | None:
    sizes = [b for r in records for b, t in r.timings.items() if t.speedup is not None]
    return min(sizes) if sizes else None


def miou_vs_speedup(records: Sequence[RowRecord], caption: str) -> Figure | None:
    b = _smallest_batch(records)
    if b is None:
        return None

    def x(r: RowRecord):
        t = r.timings.get(b)
        if t is None or t.speedup is None:
            return None, None
        return t.speedup, None if r.is_baseline else t.speedup_std  # the baseline's 1.0 is exact

    return _tradeoff_figure(
        records, x, f"speed-up over the baseline at batch {b} (x)",
        "mIoU against measured speed-up", caption,
        f"speed-up: images/s over the baseline's timed interleaved with the row, batch {b}; "
        f"error bars: its spread over the timed forwards", lower_x_better=False)


def miou_vs_gflops(records: Sequence[RowRecord], caption: str) -> Figure | None:
    return _tradeoff_figure(
        records, lambda r: (r.gflops, None), "GFLOPs per image", "mIoU against GFLOPs", caption,
        "GFLOPs per image (fvcore), mean over the suite's GFLOPs frames; dotted: the baseline's",
        lower_x_better=True, mark_baseline_x=True)


def speedup_vs_batch(records: Sequence[RowRecord], caption: str) -> Figure | None:
    """Speed-up against batch size: a line per method at its reference setting, a batched
    setting's own point at its batch size."""
    lines = [(r, sorted((b, t) for b, t in r.timings.items() if t.speedup is not None))
             for r in reference_records(records) if not r.is_baseline]
    lines = [(r, ts) for r, ts in lines if ts]
    batched = [(r, r.timings[r.batch]) for r in records
               if r.batch is not None and r.batch in r.timings and r.timings[r.batch].speedup is not None]
    if not lines and not batched:
        return None
    backbones = list(dict.fromkeys(r.backbone for r, _ in lines + batched))
    colours = _colours(records)
    fig, axes = _figure(len(backbones), "Speed-up against batch size", caption,
                        "a line per method at its default setting (else the suite's first); "
                        "triangles: batched settings at their batch size; error bars: the spread", size=(5.6, 4.4))
    sizes: set[int] = set()
    for ax, backbone in zip(axes, backbones):
        labels = []
        for r, ts in lines:
            if r.backbone != backbone:
                continue
            bs = [b for b, _ in ts]
            sizes.update(bs)
            ax.errorbar(bs, [t.speedup for _, t in ts], yerr=[t.speedup_std or 0.0 for _, t in ts],
                        color=colours[r.method], marker="o", markersize=4, capsize=2, linewidth=1.2,
                        markerfacecolor="white" if has_trained_parts(r) else colours[r.method])
            labels.append((bs[-1], ts[-1][1].speedup, f"{r.method} {setting_label(r)}", colours[r.method]))
        for r, t in batched:
            if r.backbone != backbone:
                continue
            sizes.add(r.batch)
            ax.errorbar([r.batch], [t.speedup], yerr=[t.speedup_std or 0.0], color=colours[r.method], marker="^",
                        markersize=6, capsize=2, linestyle="none")
            labels.append((r.batch, t.speedup, f"{r.method} {setting_label(r)}", colours[r.method]))
        ax.axhline(1.0, color=BASELINE_COLOR, linestyle=":", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(sizes), [str(b) for b in sorted(sizes)])
        ax.minorticks_off()
        ax.set_xlabel("batch size (images per forward)")
        ax.set_ylabel("speed-up over the baseline (x)")
        ax.set_title(backbone, fontsize=9)
        ax.grid(alpha=0.3)
        _place_labels(ax, labels)
    handles = [h for h in _method_handles(colours) if h.get_label() != "baseline"]
    handles.append(Line2D([], [], color=BASELINE_COLOR, linestyle=":", label="baseline (1x)"))
    _legend(fig, handles)
    return fig


STAGES = (("fixed stages (patch embed, restore, upsample)", "0.55"), ("method's own steps", "tab:red"),
          ("transformer blocks and decoder", "tab:blue"))


def stage_times(r: RowRecord) -> tuple[float, float, float] | None:
    """(fixed, overhead, rest) of one image's time, in units of the baseline's time at the
    breakdown batch: the model's relative time is 1 / speed-up there; the fixed stages
    cost what the baseline's share says (``fixed_share``, they do not change with the
    method), the method's steps ``overhead_share`` of the model's time, the rest (at
    least 0) is the blocks and the decoder. None without a breakdown or a speed-up."""
    if r.fixed_share is None or r.overhead_share is None or r.breakdown_batch is None:
        return None
    t = r.timings.get(int(r.breakdown_batch))
    if t is None or t.speedup is None:
        return None
    total = 1.0 / t.speedup
    overhead = r.overhead_share * total
    return (r.fixed_share, overhead, max(total - r.fixed_share - overhead, 0.0))


def stage_time(records: Sequence[RowRecord], caption: str) -> Figure | None:
    """A stacked bar per method at its reference setting (:func:`stage_times`)."""
    bars = [(r, stage_times(r)) for r in reference_records(records)]
    bars = [(r, s) for r, s in bars if s is not None]
    if not bars:
        return None
    batch = int(bars[0][0].breakdown_batch)
    fig, (ax,) = _figure(1, "Where the time goes: per-stage time of one image", caption,
                         f"time relative to the baseline's (1 = the baseline's forward, = 1 / speed-up), "
                         f"batch {batch}; each method at its default setting (else the suite's first)",
                         legend_width=3.4, size=(max(5.0, 0.75 * len(bars) + 1.5), 4.4))
    x = np.arange(len(bars))
    bottom = np.zeros(len(bars))
    for k, (name, colour) in enumerate(STAGES):
        heights = np.array([s[k] for _, s in bars])
        ax.bar(x, heights, bottom=bottom, color=colour, width=0.65, label=name)
        bottom += heights
    for i, total in enumerate(bottom):
        ax.text(x[i], total, f"{total:.2f}", ha="center", va="bottom", fontsize=6)
    names = [("baseline" if r.is_baseline else f"{r.method}\n{setting_label(r)}")
             + (f"\n{r.backbone}" if len({r.backbone for r, _ in bars}) > 1 else "") for r, _ in bars]
    ax.set_xticks(x, names, fontsize=6.5)
    ax.axhline(1.0, color=BASELINE_COLOR, linestyle=":", linewidth=0.8)
    ax.set_ylabel("time per image (baseline = 1)")
    ax.set_ylim(0, max(bottom.max(), 1.0) * 1.12)
    ax.grid(alpha=0.3, axis="y")
    _legend(fig, ax.get_legend_handles_labels()[0])
    return fig


def tokens_per_layer(records: Sequence[RowRecord], caption: str) -> Figure | None:
    """Tokens alive after every block (cls included), in % of the baseline's, a line per
    method at its reference setting."""
    base = baselines(records)
    lines = [r for r in reference_records(records)
             if r.tokens_per_layer and r.backbone in base and base[r.backbone].tokens_per_layer]
    if not lines:
        return None
    colours = _colours(records)
    backbones = list(dict.fromkeys(r.backbone for r in lines))
    fig, axes = _figure(len(backbones), "Tokens kept per layer", caption,
                        "tokens after every block (cls included), mean over the GFLOPs frames, in % of the "
                        "baseline's; each method at its default setting (else the suite's first)")
    for ax, backbone in zip(axes, backbones):
        ref = np.asarray(base[backbone].tokens_per_layer, float)
        for r in lines:
            if r.backbone != backbone:
                continue
            kept = 100 * np.asarray(r.tokens_per_layer, float) / ref
            blocks = np.arange(1, len(kept) + 1)
            ax.plot(blocks, kept, color=colours[r.method], marker="o", markersize=3, linewidth=1.2,
                    markerfacecolor="white" if has_trained_parts(r) else colours[r.method],
                    drawstyle="steps-mid")
            if not r.is_baseline:
                ax.annotate(f"{r.method} {setting_label(r)}", (blocks[-1], kept[-1]), xytext=(4, 0),
                            textcoords="offset points", fontsize=LABEL_SIZE, color=colours[r.method], va="center")
        ax.set_xticks(np.arange(1, len(ref) + 1))
        ax.set_xlabel("block")
        ax.set_ylabel("tokens kept (% of the baseline's)")
        ax.set_ylim(0, 105)
        ax.set_title(backbone, fontsize=9)
        ax.grid(alpha=0.3)
    _legend(fig, _method_handles({m: c for m, c in colours.items() if any(r.method == m for r in lines)}))
    return fig


# Every data figure: file name -> the function drawing it (None: no data for it).
FIGURES: dict[str, Callable[[Sequence[RowRecord], str], Figure | None]] = {
    "miou_vs_speedup.png": miou_vs_speedup,
    "miou_vs_gflops.png": miou_vs_gflops,
    "speedup_vs_batch.png": speedup_vs_batch,
    "stage_time.png": stage_time,
    "tokens_per_layer.png": tokens_per_layer,
}


def write_figures(records: list[RowRecord], out_dir: Path, caption: str) -> list[Path]:
    """Write every figure of :data:`FIGURES` that ``records`` have data for into
    ``out_dir`` (each atomically) and return their paths; ``caption`` (dataset, split,
    backbones, window, batch sizes, machine) goes under every title."""
    out_dir = Path(out_dir)
    written = []
    for name, draw in FIGURES.items():
        fig = draw(records, caption)
        if fig is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            written.append(save_figure(fig, out_dir / name))
    return written
