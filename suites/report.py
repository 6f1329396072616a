"""Reports of a suite run: CSV, paper-style tables (Markdown, LaTeX), trade-off plots,
and a reproduction table against the published GFLOPs."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from algm.measure.throughput import CONTENDED_BELOW  # noqa: E402

# (column, header, format, which value is best: "max", "min" or None); the throughput
# columns are added per batch size found in the rows.
HEAD_COLUMNS = [
    ("gflops", "GFLOPs", "{:.2f}", "min"),
    ("d_gflops", "ΔGFLOPs %", "{:+.1f}", None),
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
                  (f"speedup_b{b}", f"speed-up b{b}", "{:.2f}x", "max")]
    return HEAD_COLUMNS + speed + TAIL_COLUMNS


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
    best = df[["miou", "miou_trained"]].max(axis=1)
    df["d_miou"] = best - ref("miou")
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
    present = [c for c in columns(df) if df[c[0]].notna().any()]
    out = [["backbone", "method", "setting"] + [h for _, h, _, _ in present]]
    for backbone, group in df.groupby("backbone", sort=False):
        best = {col: (group[col].max() if rule == "max" else group[col].min())
                for col, _, _, rule in present if rule}
        for _, r in group.iterrows():
            line = [backbone, r.method, r.setting]
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
    lines = [r"\begin{tabular}{lll" + "r" * (len(cells[0]) - 3) + "}", r"\toprule",
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
    for (backbone, method), group in data.groupby(["backbone", "method"], sort=False):
        group = group.sort_values(x)
        style = dict(marker="*", markersize=14, linestyle="none") if method == "none" else dict(marker="o")
        ax.plot(group[x], group.score, label=f"{method} ({backbone})", **style)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mIoU (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def reproduction_table(df: pd.DataFrame, published: dict) -> str:
    """Our GFLOPs beside the published ones; ``published[backbone][setting label]``."""
    lines = ["| backbone | setting | ours GFLOPs | published | ratio |", "|---|---|---|---|---|"]
    for _, r in df.iterrows():
        ref = (published.get(r.backbone) or {}).get(r.setting)
        if ref is not None:
            lines.append(f"| {r.backbone} | {r.setting} | {r.gflops:.2f} | {ref} | {r.gflops / ref:.4f} |")
    return "\n".join(lines) + "\n"


def _time_note(df: pd.DataFrame) -> str:
    """How long measuring the rows took (one-off training they needed included)."""
    if "seconds" not in df or df.seconds.isna().all():
        return ""
    return (f"\nMeasuring these rows took {df.seconds.sum() / 60:.1f} min on the recorded machine "
            f"(`machine.json`), including the one-off training of the heads, pruning heads and "
            f"policies they needed that were not cached yet.\n")


def _speedup_note(df: pd.DataFrame) -> str:
    if not any(c.startswith("base_ims_b") for c in df.columns):
        return ""
    return ("\nSpeed-up: a row's images/s over those of the baseline timed interleaved with it "
            "(same batch, forward by forward), so a change in machine speed between rows "
            "does not enter the ratio.\n")


def write_reports(rows: list[dict], out_dir: Path, published: dict, title: str) -> list[Path]:
    """Write results.csv, table.md, table.tex, the two plots and reproduction.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    df = to_frame(rows)
    written = []
    csv = out_dir / "results.csv"
    df.to_csv(csv, index=False)
    written.append(csv)
    md = out_dir / "table.md"
    md.write_text(f"# {title}\n\n{markdown_table(df)}{_speedup_note(df)}{_time_note(df)}")
    written.append(md)
    tex = out_dir / "table.tex"
    tex.write_text(latex_table(df))
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
        rep.write_text(f"# Reproduction: {title}\n\n{reproduction_table(df, published)}")
        written.append(rep)
    return written
