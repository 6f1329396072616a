"""The suites' gallery: token maps of several methods on fixed frames, one figure.

:func:`gallery_frames` reads the fixed CamVid frames (:data:`CAMVID_GALLERY_FRAMES`),
:func:`method_variants` puts one model under every method at its default setting, and
:func:`write_gallery` draws every variant's token map on every frame.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from torch import Tensor

from algm.config import DatasetSpec, ViTConfig
from algm.methods import build_method, methods as registered, required_training
from algm.pictures.figures import TokenPanel, gallery_figure, save_figure
from algm.pictures.predict import predict, read_image

# Four CamVid val frames spread over the split (val.txt lines 1, 41, 71, 101): parked and
# moving cars with cyclists, a convertible close by, pedestrians at a bike lane, a cyclist
# at a junction. Fixed so that galleries of different runs compare.
CAMVID_GALLERY_FRAMES = ("0016E5_07959", "0016E5_08039", "0016E5_08099", "0016E5_08159")

GALLERY_TITLE = "Token maps: every final token in its own colour (patch grid light, token borders dark)"


def gallery_frames(root: str | Path | None = None, names: Sequence[str] = CAMVID_GALLERY_FRAMES,
                   split: str = "val") -> list[tuple[str, Tensor]]:
    """The fixed CamVid frames of the gallery as (name, (3, H, W) uint8)."""
    from algm.data.datasets import build_dataset

    dataset = build_dataset("camvid", split, root=root)
    index = {name: i for i, (_, _, name) in enumerate(dataset.files)}
    missing = [n for n in names if n not in index]
    if missing:
        raise ValueError(f"camvid {split} has no frame(s) {', '.join(missing)}")
    return [(n, dataset[index[n]].image) for n in names]


def method_variants(model, backbone: ViTConfig, dataset: DatasetSpec,
                    methods: Iterable[str] | None = None) -> dict[str, object]:
    """``{label: Segmenter}``: ``model``'s encoder and decoder (shared, not copied) driven
    by every method at its default setting (default: all registered methods), keyed by
    the method's own :meth:`~algm.reduction.TokenReduction.label`.

    A method with parts still to be trained (:func:`algm.methods.required_training`
    non-empty, e.g. exit heads or a learned policy not trained yet) is left out, and a
    note on stderr names it and what it lacks."""
    out = {}
    for name in (methods if methods is not None else registered()):
        missing = required_training(name, backbone, dataset)
        if missing:
            parts = ", ".join(f"{task.name} ({task.path})" for task in missing)
            print(f"algm-bench: note: {name} left out of the pictures: not trained yet: {parts}",
                  file=sys.stderr)
            continue
        method = build_method(name, backbone, dataset)
        out[method.label()] = model.with_method(method).eval()
    return out


def _named_frames(frames: Sequence) -> list[tuple[str, Tensor]]:
    """(name, (3, H, W) uint8) of (name, image) pairs, bare images or image paths."""
    items = []
    for k, frame in enumerate(frames):
        if isinstance(frame, (str, Path)):
            items.append((Path(frame).stem, read_image(frame)))
        elif isinstance(frame, Tensor):
            items.append((f"frame {k}", frame))
        else:
            items.append((str(frame[0]), frame[1]))
    return items


def _pos_embed_window(model) -> tuple[int, int]:
    """The input size in pixels that the encoder's position embedding was made for."""
    cfg = model.encoder.cfg
    return (cfg.pos_grid[0] * cfg.patch_size, cfg.pos_grid[1] * cfg.patch_size)


def write_gallery(models: Mapping[str, object], frames: Sequence, out_path: str | Path, *,
                  window: tuple[int, int] | None = None, title: str | None = None) -> Path:
    """Token maps of every model on every frame, one row per frame: the image, then one
    column per model with its token count. Writes ``out_path`` (PNG) and returns it.

    models: ``{label: Segmenter}`` (e.g. :func:`method_variants`). window: the model
    input (default: each encoder's pos-embed grid in pixels). frames: ``(name, (3, H, W)
    uint8)`` pairs (:func:`gallery_frames`), bare tensors, or image paths. Everything
    is computed before the file is written.
    """
    if not models:
        raise ValueError("write_gallery: no models")
    items = _named_frames(frames)
    if not items:
        raise ValueError("write_gallery: no frames")
    views, rows = [], []
    for name, image in items:
        panels = []
        for label, model in models.items():
            pred = predict(model.eval(), image, window or _pos_embed_window(model))
            panels.append(TokenPanel(label, pred.source.numpy(), pred.caption()))
        views.append((name, pred.rgb()))
        rows.append(panels)
    fig = gallery_figure(views, rows, title or GALLERY_TITLE)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, out)
