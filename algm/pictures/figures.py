"""Figures of label maps and token maps: arrays and titles in, matplotlib figures out.

* :func:`overlay_figure`: a prediction over its image, legend of the classes present.
* :func:`tokens_figure`: one token map over its image.
* :func:`compare_figure`: one column per model, prediction overlay above, token map below.
* :func:`gallery_figure`: one row per frame, the frame then one token map per model.
* :func:`predictions_figure`: per frame, the image, the ground truth and every model's
  prediction above, every prediction's error map below.
* :func:`save_figure`: written atomically, the format from the file name.

A token map to draw comes as a :class:`TokenPanel`. Matplotlib is used through
``matplotlib.figure.Figure`` only (Agg canvas, no pyplot, no global backend switch), so
this module is safe to import in servers and tests.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from algm.atomic import write_with
from algm.pictures.maps import (ERROR_COLOR, IGNORE_COLOR, PRUNED_COLOR, colorize, error_map_rgb, error_mask,
                                 label_rgb, overlay_rgb, token_map_rgb)

LEGEND_MAX = 14
CELL_WIDTH = 3.6  # inches per image cell of a grid figure


class TokenPanel(NamedTuple):
    """One token map to draw: ``title`` (the model's label), ``source`` (gh, gw) token
    index per patch (-1 where no token holds it), ``caption`` (how many tokens were kept)."""

    title: str
    source: np.ndarray
    caption: str


def _wrap(text: str, width_in: float) -> str:
    chars = max(30, int(width_in * 13))
    return "\n".join(textwrap.fill(line, chars) for line in text.split("\n"))


def _present(labels: np.ndarray, classes: Sequence[str], palette: np.ndarray, limit: int = LEGEND_MAX):
    """Legend handles of the classes present in ``labels`` (any shape), largest share first."""
    counts = np.bincount(np.asarray(labels).reshape(-1), minlength=len(classes))
    order = [int(c) for c in np.argsort(-counts, kind="stable") if counts[c] > 0]
    total = counts.sum()
    handles = [Patch(facecolor=np.asarray(palette[c]) / 255, edgecolor="black", linewidth=0.5,
                     label=f"{classes[c]}  {100 * counts[c] / total:.1f} %") for c in order[:limit]]
    if len(order) > limit:
        handles.append(Patch(facecolor="white", edgecolor="white", label=f"+ {len(order) - limit} more"))
    return handles


def _single_figure(rgb: np.ndarray, title: str, handles: list | None = None,
                   legend_title: str | None = None) -> Figure:
    """The (H, W, 3) picture at (at least) its own pixel size, a title above, a legend right."""
    h, w = rgb.shape[:2]
    dpi = 100
    scale = max(1.0, 420 / w)
    img_w, img_h = w * scale / dpi, h * scale / dpi
    legend_w = 2.3 if handles else 0.0
    fig_w = img_w + legend_w
    title = _wrap(title, fig_w)
    title_h = 0.22 * (title.count("\n") + 1) + 0.15
    fig_h = img_h + title_h
    fig = Figure(figsize=(fig_w, fig_h), dpi=dpi)
    ax = fig.add_axes((0, 0, img_w / fig_w, img_h / fig_h))
    ax.imshow(rgb, interpolation="nearest")
    ax.set_axis_off()
    fig.text(0.5 * img_w / fig_w if not handles else 0.5, 1 - 0.08 / fig_h, title, ha="center", va="top",
             fontsize=10)
    if handles:
        fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(img_w / fig_w + 0.01, img_h / fig_h),
                   fontsize=8, title=legend_title, title_fontsize=8, frameon=False, handlelength=1.2)
    return fig


class LabelPanel(NamedTuple):
    """One model's prediction to draw: ``title`` (the model's label), ``labels`` (H, W)
    predicted classes, ``caption`` (e.g. its token count)."""

    title: str
    labels: np.ndarray
    caption: str


def _grid_figure(n_rows: int, n_cols: int, cell: tuple[int, int], title: str,
                 title_lines: int = 2, bottom: float = 0.0,
                 caption: str | None = None) -> tuple[Figure, list[list[Axes]]]:
    """A figure of n_rows x n_cols image cells of ``cell`` (h, w) pixels (shown
    :data:`CELL_WIDTH` inches wide), room for a title per cell, ``caption`` in small
    type under the figure's title; returns (fig, axes[row][col])."""
    h, w = cell
    cell_h = CELL_WIDTH * h / w
    pad_h = 0.2 * title_lines + 0.1
    top = 0.25 * (title.count("\n") + 1) + 0.2 + (0.18 * (caption.count("\n") + 1) if caption else 0.0)
    bottom += 0.1
    fig_w, fig_h = n_cols * CELL_WIDTH + 0.1 * (n_cols + 1), n_rows * (cell_h + pad_h) + top + bottom
    fig = Figure(figsize=(fig_w, fig_h), dpi=100)
    axes = []
    for r in range(n_rows):
        row = []
        for c in range(n_cols):
            left = (0.1 + c * (CELL_WIDTH + 0.1)) / fig_w
            y = (fig_h - top - (r + 1) * (cell_h + pad_h)) / fig_h
            ax = fig.add_axes((left, y, CELL_WIDTH / fig_w, cell_h / fig_h))
            ax.set_axis_off()
            row.append(ax)
        axes.append(row)
    fig.text(0.5, 1 - 0.1 / fig_h, title, ha="center", va="top", fontsize=12)
    if caption:
        fig.text(0.5, 1 - (0.15 + 0.25 * (title.count("\n") + 1)) / fig_h, caption, ha="center", va="top",
                 fontsize=8, color="0.3")
    return fig, axes


def overlay_figure(image: np.ndarray, labels: np.ndarray, classes: Sequence[str], palette: np.ndarray,
                   title: str) -> Figure:
    """(H, W) predicted classes blended over the (H, W, 3) uint8 image, a legend of the
    classes present."""
    rgb = overlay_rgb(image, labels, palette)
    return _single_figure(rgb, title, _present(labels, classes, palette), "predicted classes")


def tokens_figure(image: np.ndarray, panel: TokenPanel) -> Figure:
    """The token map over the (H, W, 3) uint8 image; title, then the caption."""
    rgb = token_map_rgb(panel.source, image=image)
    handles = None
    if (np.asarray(panel.source) < 0).any():
        handles = [Patch(facecolor=np.asarray(PRUNED_COLOR) / 255, label="pruned (no token)")]
    return _single_figure(rgb, f"{panel.title}\n{panel.caption}", handles)


def compare_figure(image: np.ndarray, panels: Sequence[TokenPanel], labels: Sequence[np.ndarray],
                   classes: Sequence[str], palette: np.ndarray, title: str) -> Figure:
    """One column per model on one (H, W, 3) uint8 image: ``labels[c]`` (H, W) overlaid
    on top under the panel's title, its token map below under the caption; one legend."""
    if not panels:
        raise ValueError("nothing to compare")
    if len(panels) != len(labels):
        raise ValueError(f"{len(panels)} token maps but {len(labels)} predictions")
    fig, axes = _grid_figure(2, len(panels), image.shape[:2], title, bottom=0.9)
    for c, (panel, pred) in enumerate(zip(panels, labels)):
        axes[0][c].imshow(overlay_rgb(image, pred, palette), interpolation="nearest")
        axes[0][c].set_title(_wrap(panel.title, CELL_WIDTH), fontsize=9)
        axes[1][c].imshow(token_map_rgb(panel.source, image=image), interpolation="nearest")
        axes[1][c].set_title(_wrap(panel.caption, CELL_WIDTH), fontsize=9)
    handles = _present(np.stack(labels), classes, palette, limit=24)
    fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=8,
               frameon=False, handlelength=1.2, bbox_to_anchor=(0.5, 0.0))
    return fig


def _same_size(frames: Sequence[tuple], rows: Sequence[Sequence], what: str) -> tuple[int, int]:
    """The (H, W) of every frame's image (``frame[1]``); a ValueError if they differ or
    the rows do not match the frames."""
    if not frames or len(frames) != len(rows):
        raise ValueError(f"{len(frames)} frames but {len(rows)} rows of {what}")
    size = frames[0][1].shape[:2]
    if any(frame[1].shape[:2] != size for frame in frames):
        raise ValueError("frames must all have the same size")
    return size


def gallery_figure(frames: Sequence[tuple[str, np.ndarray]], rows: Sequence[Sequence[TokenPanel]],
                   title: str, caption: str | None = None) -> Figure:
    """One row per frame: the (name, (H, W, 3) uint8) frame, then its panels, one per
    model. Every frame must have the same size."""
    size = _same_size(frames, rows, "token maps")
    fig, axes = _grid_figure(len(frames), max(map(len, rows)) + 1, size, title, title_lines=3, caption=caption)
    for r, ((name, rgb), panels) in enumerate(zip(frames, rows)):
        axes[r][0].imshow(rgb, interpolation="nearest")
        axes[r][0].set_title(name, fontsize=9)
        for c, panel in enumerate(panels, start=1):
            axes[r][c].imshow(token_map_rgb(panel.source, image=rgb), interpolation="nearest")
            axes[r][c].set_title(_wrap(f"{panel.title}\n{panel.caption}", CELL_WIDTH), fontsize=8)
    return fig


def predictions_figure(frames: Sequence[tuple[str, np.ndarray, np.ndarray]], rows: Sequence[Sequence[LabelPanel]],
                       classes: Sequence[str], palette: np.ndarray, ignore_index: int, title: str,
                       caption: str | None = None) -> Figure:
    """Two rows per frame ``(name, image (H, W, 3) uint8, ground truth (H, W))``: the
    image, the ground truth (ignored pixels black) and every panel's prediction above;
    under each prediction its error map (:func:`~algm.pictures.maps.error_map_rgb`) with
    the share of labelled pixels it gets wrong; a legend of the frame's classes under
    the image. Every frame must have the same size."""
    size = _same_size(frames, rows, "predictions")
    fig, axes = _grid_figure(2 * len(frames), max(map(len, rows)) + 2, size, title, title_lines=2, caption=caption)
    error_handles = [Patch(facecolor=np.asarray(ERROR_COLOR) / 255, label="wrong"),
                     Patch(facecolor=np.asarray(IGNORE_COLOR) / 255, label="ignored (not scored)")]
    for r, ((name, rgb, truth), panels) in enumerate(zip(frames, rows)):
        top, bottom = axes[2 * r], axes[2 * r + 1]
        top[0].imshow(rgb, interpolation="nearest")
        top[0].set_title(name, fontsize=9)
        top[1].imshow(label_rgb(truth, palette, ignore_index), interpolation="nearest")
        top[1].set_title("ground truth", fontsize=9)
        scored = np.asarray(truth) != ignore_index
        present = np.concatenate([np.asarray(truth)[scored].reshape(-1)] + [np.asarray(p.labels).reshape(-1)
                                                                          for p in panels])
        bottom[0].legend(handles=_present(present, classes, palette), loc="upper left", fontsize=7,
                         frameon=False, handlelength=1.2, ncol=2, title="classes (share over these panels)",
                         title_fontsize=7)
        bottom[1].legend(handles=error_handles, loc="upper left", fontsize=7, frameon=False,
                         handlelength=1.2, title="error maps", title_fontsize=7)
        for c, panel in enumerate(panels, start=2):
            top[c].imshow(colorize(panel.labels, palette), interpolation="nearest")
            top[c].set_title(_wrap(f"{panel.title}\n{panel.caption}", CELL_WIDTH), fontsize=8)
            wrong = error_mask(panel.labels, truth, ignore_index).sum() / max(int(scored.sum()), 1)
            bottom[c].imshow(error_map_rgb(rgb, panel.labels, truth, ignore_index), interpolation="nearest")
            bottom[c].set_title(f"{100 * wrong:.1f} % of labelled pixels wrong", fontsize=8)
    return fig


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` atomically; the format follows the file name (.png, .pdf, .svg ...)."""
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    return write_with(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=fig.dpi, facecolor="white"))
