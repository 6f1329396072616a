"""A suite's report set: run the suite (or read its cached rows) and write, as one set,
``results.csv``, ``table.md`` / ``table.tex`` (the paper table), ``diagnostics.md``,
``equal_gflops.md``, the figures (:func:`suites.figures.write_figures`), the token-map
and prediction galleries, ``reproduction.md`` (against published figures),
``machine.json`` and ``run.json`` (this run's duration).

Files are written into a staging folder beside the output and published together
(:func:`publish`); a folder holding a committed reference (a ``REFERENCE`` file) is
only written with ``update_reference``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from algm import atomic
from suites.records import RowRecord, baselines, records_from_rows
from suites.results_csv import SCHEMA_DOC, csv_text
from suites.tables import (DIAGNOSTICS_NOTE, diagnostics_markdown, equal_gflops_markdown, latex_table,
                           markdown_table, table_sizes, weights_label)

REFERENCE_MARKER = "REFERENCE"
# Every file of a report set besides the figures (any *.png); publish() replaces them as one set.
REPORT_FILES = ("results.csv", "table.md", "table.tex", "diagnostics.md", "equal_gflops.md",
                "reproduction.md", "machine.json", "run.json")


class ReferenceFolder(ValueError):
    """The output folder holds a committed reference and overwriting it was not asked for."""


def check_reference(out: Path, update_reference: bool) -> None:
    """Refuse (one line naming the folder and the flag) to write into a folder marked
    with a ``REFERENCE`` file unless ``update_reference``."""
    if (out / REFERENCE_MARKER).is_file() and not update_reference:
        raise ReferenceFolder(f"{out} holds a committed reference report ({REFERENCE_MARKER}): pass "
                              f"--update-reference to overwrite it, or --out DIR to write elsewhere")


@contextmanager
def staging_dir(out: Path):
    """A fresh folder beside ``out`` to write a report set into; removed afterwards."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish(staging: Path, out: Path) -> list[Path]:
    """Move every file of ``staging`` into ``out`` (renames on one file system) and remove
    the report files and figures of an earlier run that this set lacks (a
    ``--flops-only`` rerun leaves no mIoU figure of the full run behind). Returns the
    published paths."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for file in sorted(staging.iterdir()):
        os.replace(file, out / file.name)
        written.append(out / file.name)
    names = {p.name for p in written}
    for old in [out / n for n in REPORT_FILES] + sorted(out.glob("*.png")):
        if old.name not in names:
            old.unlink(missing_ok=True)
    return written


# ---------------------------------------------------------------------------- text

def machine_text(machine: dict) -> str:
    """``NVIDIA H200`` or ``Intel Xeon ... (2 threads)``: what a figure was timed on."""
    if machine.get("gpu"):
        return str(machine["gpu"])
    return f"{machine.get('cpu', 'CPU')} ({machine.get('torch_threads')} threads)"


def caption(records: list[RowRecord], split: str, machine: dict) -> str:
    """Dataset, split, backbone(s), window, batch sizes and machine of a report set."""
    dataset = records[0].dataset if records else ""
    backbones = ", ".join(dict.fromkeys(r.backbone for r in records))
    windows = ", ".join(dict.fromkeys(r.window for r in records if r.window))
    sizes = sorted({b for r in records for b in r.timings})
    timed = f"; timed at batch {', '.join(map(str, sizes))} on {machine_text(machine)}" if sizes else ""
    return f"{dataset} {split}, {backbones}" + (f", window {windows}" if windows else "") + timed


def duration_note(records: list[RowRecord], run: dict | None) -> str:
    """This run's wall time (as recorded by the run itself) and the summed measuring time
    of its rows."""
    summed = sum(r.seconds for r in records if r.seconds is not None)
    text = "\n## Duration\n\n"
    if run and run.get("wall_seconds") is not None:
        text += (f"This run took {run['wall_seconds'] / 60:.1f} min of wall time "
                 f"({run.get('rows_measured', 0)} of {len(records)} rows measured or timed in it, the rest "
                 f"read from the row cache). ")
        if run.get("first_answer_seconds") is not None:
            text += (f"Its first complete table (each method's first setting) was written "
                     f"{run['first_answer_seconds'] / 60:.1f} min after it started. ")
    else:
        text += "The wall time of the run that measured these rows was not recorded. "
    return text + (f"Measuring the rows took {summed / 60:.1f} min in all (each row's own measuring time when "
                   f"it was measured, one-off training of missing parts included).\n")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + "s" * (n != 1)


def _missing_note(records: list[RowRecord]) -> str:
    missing = {r.backbone: r.missing_checkpoint for r in records if r.missing_checkpoint}
    if not missing:
        return ""
    items = "".join(f"\n- {b}: {m}" for b, m in missing.items())
    return ("\nGFLOPs only, on random weights (no mIoU, no timing), for the backbones whose "
            f"baseline checkpoint was missing:{items}\n")


def _finetune_note(records: list[RowRecord]) -> str:
    """The budget of every fine-tuned model: epochs, frozen blocks, iterations, wall time."""
    lines, seen = [], set()
    for r in records:
        if not isinstance(r.finetune, dict) or r.checkpoint in seen:
            continue
        seen.add(r.checkpoint)
        rec, b = r.finetune, r.finetune["budget"]
        frozen = f"blocks 1-{b['freeze_blocks']} frozen" if b["freeze_blocks"] else "nothing frozen"
        lines.append(f"\n- {r.backbone} {rec['method']}: {_count(b['epochs'], 'epoch')} x {b['items']} views of "
                     f"{b['frames']} frames = {_count(b['iterations'], 'iteration')} of batch {b['batch_size']}, "
                     f"{frozen}, SGD lr {b['lr']:g} poly to {b['min_lr']:g}, {b['precision']}; "
                     f"{rec['wall_seconds'] / 60:.1f} min ({rec['prefix_seconds'] / 60:.1f} min caching "
                     f"the frozen blocks)")
    if not lines:
        return ""
    return ("\nFine-tuned: every model starts from the same weights and trains with its method "
            "active, at the same budget (`algm-bench finetune`):" + "".join(lines) + "\n")


def _batched_note(records: list[RowRecord]) -> str:
    sizes = sorted({r.batch for r in records if r.batch is not None})
    if not sizes:
        return ""
    return (f"\nRows with batch=N (N = {', '.join(map(str, sizes))}): tokens kept, GFLOPs and mIoU on mixed "
            f"batches of N images, one fixed seeded grouping of the split for every row; their bN timing is on "
            f"the first of those batches. GFLOPs are per image and include the padding of per-image merging.\n")


def _untimed_note(records: list[RowRecord]) -> str:
    if not any(r.untimed for r in records):
        return ""
    return ("\nRows measured with `--untimed` have no timing yet (blank cells): a later run without it "
            "times them.\n")


def _setting_note(records: list[RowRecord]) -> str:
    return ("\nSetting: the knobs the suite sweeps, resolved by the method itself (its defaults for this "
            "backbone and dataset filled in); (default): the method's default setting.\n") if records else ""


FIGURE_TITLES = {  # figure file stem -> what it shows (others show their stem)
    "miou_vs_speedup": "mIoU against the measured speed-up, with the Pareto front",
    "miou_vs_gflops": "mIoU against GFLOPs",
    "speedup_vs_batch": "speed-up against batch size",
    "stage_time": "time per image against the baseline's, split by stage, per method",
    "tokens_per_layer": "tokens kept after each block",
    "gallery": "token maps of every method on fixed frames",
    "predictions": "predictions beside the ground truth, wrong pixels marked",
}


def figures_section(paths: list[Path], text: str) -> str:
    if not paths:
        return ""
    items = "".join(f"\n**{FIGURE_TITLES.get(p.stem, p.stem.replace('_', ' '))}** ({text}):\n\n"
                    f"![{p.stem}]({p.name})\n" for p in paths)
    return "\n## Figures\n" + items


def reproduction_table(records: list[RowRecord], published: dict) -> str:
    """Every measured cell beside its published value (``published[backbone][setting]``
    = {gflops, miou, speedup}), for the rows that have one. mIoU compares with the row's
    own weights (off the shelf, or trained with the method); speed-up is the paper
    table's largest batch's (absolute images/s depend on the GPU)."""
    lines = ["| backbone | setting | weights | quantity | ours | published | ours / published | ours - published |",
             "|---|---|---|---|---|---|---|---|"]
    sizes = table_sizes(records)
    for r in records:
        ref = (published.get(r.backbone) or {}).get(r.setting)
        if not ref:
            continue
        speed = r.speedup(sizes[-1]) if sizes else None
        ours = {"gflops": r.gflops, "miou": r.miou_trained if r.trained_with_method else r.miou,
                "speedup": math.nan if speed is None else speed}
        names = {"gflops": "GFLOPs", "miou": "mIoU", "speedup": f"speed-up b{sizes[-1]}" if sizes else "speed-up"}
        for cell, value in ref.items():
            mine = ours[cell]
            ok = not math.isnan(mine)
            lines.append(f"| {r.backbone} | {r.setting} | {weights_label(r)} | {names[cell]} "
                         f"| {f'{mine:.2f}' if ok else '–'} | {value} | {f'{mine / value:.4f}' if ok else '–'} "
                         f"| {f'{mine - value:+.2f}' if ok else '–'} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- files

def write_reports(rows: list, out_dir: Path, published: dict, title: str, *, split: str = "",
                  machine: dict | None = None, run: dict | None = None, label: str = "tab:results",
                  figures: bool = True, galleries: list[Path] = ()) -> list[Path]:
    """The tables, CSV and figures of ``rows`` (cached row dicts or :class:`RowRecord`)
    into ``out_dir``: results.csv, table.md, table.tex, diagnostics.md, equal_gflops.md,
    the figures and, with ``published`` figures, reproduction.md. ``machine``: the
    :func:`~suites.machine.machine_record` the rows were timed on (captions); ``run``:
    this run's ``{"wall_seconds", "rows_measured"}``; ``galleries``: pictures already in
    ``out_dir`` that table.md links too."""
    from suites.machine import machine_record

    out_dir.mkdir(parents=True, exist_ok=True)
    records = [r if isinstance(r, RowRecord) else RowRecord.from_row(r) for r in rows]
    machine = machine if machine is not None else machine_record()
    text = caption(records, split, machine)
    written = [atomic.write_text(out_dir / "results.csv", csv_text(records))]
    pictures = []
    if figures and records and any(not math.isnan(r.miou) or not math.isnan(r.miou_trained) for r in records):
        from suites.figures import write_figures
        pictures = list(write_figures(records, out_dir, text))
    equal = equal_gflops_markdown(records) if baselines(records) and table_sizes(records) else ""
    table = (f"# {title}\n\n{text}.\n\n{markdown_table(records)}{_setting_note(records)}{_untimed_note(records)}"
             f"{_missing_note(records)}{_finetune_note(records)}{_batched_note(records)}"
             + (f"\n## At equal GFLOPs\n{equal}" if equal else "")
             + figures_section(pictures + list(galleries), text) + duration_note(records, run)
             + "\nEvery other figure: [diagnostics.md](diagnostics.md); every column: `results.csv` "
               f"([schema]({Path(os.path.relpath(SCHEMA_DOC, out_dir)).as_posix()})).\n")
    written.append(atomic.write_text(out_dir / "table.md", table))
    written.append(atomic.write_text(out_dir / "table.tex", latex_table(records, f"{text} ({title}).", label)))
    written.append(atomic.write_text(out_dir / "diagnostics.md",
                                     f"# Diagnostics: {title}\n\n{text}.\n\n{diagnostics_markdown(records)}\n"
                                     f"{DIAGNOSTICS_NOTE}"))
    if equal:
        written.append(atomic.write_text(out_dir / "equal_gflops.md", f"# At equal GFLOPs: {title}\n\n{text}.\n{equal}"))
    written += pictures
    if published:
        written.append(atomic.write_text(out_dir / "reproduction.md",
                                         f"# Reproduction: {title}\n\n{reproduction_table(records, published)}"))
    return written


def write_galleries(suite, out: Path, data_root: str | None, opts, text: str) -> list[Path]:
    """Token maps and predictions (ground truth, error map) of every method of the suite
    at its default setting on the fixed CamVid frames, the baseline's off-the-shelf head
    on the first backbone."""
    from algm.config import get_backbone
    from algm.pictures.gallery import gallery_frames, method_variants, write_gallery, write_predictions
    from algm.training.head import load_head
    from suites.definition import Setting
    from suites.measure import setup_for, trained_head

    backbone = suite.backbones[0]
    base = setup_for(suite, backbone, Setting("none"), pretrained=get_backbone(backbone).weights is not None)
    if base.weights.kind != "random":
        load_head(base, trained_head(base, opts))
    methods = list(dict.fromkeys(s.method for s in suite.settings))
    models = method_variants(base.model, base.backbone, base.dataset, methods)
    frames = gallery_frames(root=data_root)
    return [write_gallery(models, frames, out / "gallery.png", window=base.window, caption=text),
            write_predictions(models, frames, out / "predictions.png", base.dataset, window=base.window,
                              caption=text)]


# ---------------------------------------------------------------------- entry point

def cached_rows(suite, opts) -> list[dict]:
    """The suite's planned rows as the row cache holds them under their keys (the same
    keys a run computes), measuring nothing. A ValueError names the first planned row
    the cache lacks."""
    from dataclasses import replace

    from algm.cache import cache_dir
    from suites.plan import plan
    from suites.runner import cached_row

    if suite.finetune is not None and not opts.flops_only:  # measured on the models it fine-tuned
        opts = replace(opts, checkpoints=str(cache_dir("finetuned", suite.name)))
    rows = []
    for planned in plan(suite, opts):
        row = cached_row(suite, planned, opts)
        if row is None:
            raise ValueError(f"--report-only: suite {suite.name} has no cached row for {planned.backbone} "
                             f"{planned.setting.label()}: run the suite first")
        rows.append(row)
    return rows


def _partial_report(rows: list[dict], planned: int, suite, out: Path, title: str, minutes: float) -> None:
    """The tables and CSV of the rows finished so far (no figures, no galleries), so a
    first answer (each method's default setting) is there before the sweeps are done."""
    from algm import distributed

    if not distributed.is_main():
        return
    with staging_dir(out) as staging:
        write_reports(rows, staging, suite.published, f"{title} (partial: {len(rows)} of {planned} rows, "
                      f"each method's first setting first; {minutes:.1f} min into the run)", split=suite.split,
                      label=f"tab:{suite.name}", figures=False)
        publish(staging, out)


def run_and_report(suite, opts, out: Path, *, report_only: bool = False, update_reference: bool = False,
                   title: str | None = None) -> list[Path] | None:
    """Run ``suite`` (or, ``report_only``, read its cached rows) and publish its report
    set into ``out``; returns the published paths (None on the other ranks of a
    distributed run). A ``REFERENCE`` folder is refused before anything runs unless
    ``update_reference``."""
    from algm import distributed
    from suites.machine import machine_record
    from suites.runner import run_suite

    check_reference(out, update_reference)
    title = title or f"{suite.name}: {suite.dataset} {suite.split}" + (" (GFLOPs only)" if opts.flops_only else "")
    start = time.perf_counter()
    if report_only:
        rows, run = cached_rows(suite, opts), None
    else:
        measured, first_answer = [], None

        def progress(done: list[dict], planned: int) -> None:
            nonlocal first_answer
            _partial_report(done, planned, suite, out, title, (time.perf_counter() - start) / 60)
            if first_answer is None:
                first_answer = time.perf_counter() - start

        rows = run_suite(suite, opts, on_measured=measured.append, on_progress=progress)
        run = {"wall_seconds": time.perf_counter() - start, "rows_measured": len(measured),
               "first_answer_seconds": first_answer}
    if not distributed.is_main():
        return None
    machine = machine_record(opts.device)
    kept = out / "machine.json"
    if report_only and kept.is_file():  # the machine the rows were measured on
        machine = json.loads(kept.read_text())
    if report_only and (out / "run.json").is_file():
        run = json.loads((out / "run.json").read_text())
    records = records_from_rows(rows)
    with staging_dir(out) as staging:  # the whole report set, or the old one stays
        galleries = []
        if suite.gallery and not opts.flops_only:
            galleries = write_galleries(suite, staging, opts.data_root, opts,
                                        caption(records, suite.split, machine))
        write_reports(records, staging, suite.published, title, split=suite.split, machine=machine, run=run,
                      label=f"tab:{suite.name}", galleries=galleries)
        atomic.write_json(staging / "machine.json", machine, indent=2)
        if run is not None:
            atomic.write_json(staging / "run.json", run, indent=2)
        return publish(staging, out)
