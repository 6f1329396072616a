"""The suites' gallery: token maps and predictions of several methods on fixed frames.

:func:`gallery_frames` reads the fixed CamVid frames (:data:`CAMVID_GALLERY_FRAMES`,
chosen by :func:`spread_frames`), :func:`method_variants` puts one model under every
method at its default setting, :func:`write_gallery` draws every variant's token map on
every frame and :func:`write_predictions` every variant's prediction beside the ground
truth, with its error map.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterable, Mapping, NamedTuple, Sequence

from torch import Tensor

from algm.config import DatasetSpec, ViTConfig
from algm.methods import build_method, methods as registered, required_training
from algm.pictures.figures import LabelPanel, TokenPanel, gallery_figure, predictions_figure, save_figure
from algm.pictures.maps import class_meta
from algm.pictures.predict import label_view, predict, read_image

# CamVid's val split is a single sequence (0016E5, 101 frames from 7 s of driving), so
# frames of different scenes come from both splits no model trains on: val and test
# (sequences 0001TP and Seq05VD; train's 0006R0 stays out, its frames trained the heads).
# The rule is spread_frames(4) over val.txt then test.txt: one frame per sequence, the
# fourth to the longest (Seq05VD), each sequence's frames at the middles of equal parts
# of it. Fixed so that galleries of different runs compare; tests check it against the rule.
GALLERY_SPLITS = ("val", "test")
CAMVID_GALLERY_FRAMES = (("val", "0016E5_08059"), ("test", "0001TP_009480"),
                         ("test", "Seq05VD_f01260"), ("test", "Seq05VD_f03840"))

GALLERY_TITLE = "Token maps: every final token in its own colour (patch grid light, token borders dark)"
PREDICTIONS_TITLE = "Predictions: ground truth, every method's classes, and its wrong pixels in red"


class GalleryFrame(NamedTuple):
    """One frame of the gallery: ``name``, ``image`` (3, H, W) uint8, ``label`` (H, W)
    long ground truth. Its first two fields make it a (name, image) pair."""

    name: str
    image: Tensor
    label: Tensor


def sequence(name: str) -> str:
    """The CamVid sequence of a frame name (``0016E5_08059`` -> ``0016E5``)."""
    return name.split("_", 1)[0]


def spread_frames(names: Mapping[str, Sequence[str]], n: int = 4) -> list[tuple[str, str]]:
    """(split, name) of ``n`` frames of distinct scenes out of ``{split: frame names}``:
    the frames grouped by :func:`sequence`; every sequence gets n // s frames (s
    sequences), the longest ones one more until n are given (with n < s, only the n
    longest get one); a sequence's k frames are the middles of k equal parts of it.
    Sequences in order of first appearance."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for split, frames in names.items():
        for name in frames:
            groups.setdefault(sequence(name), []).append((split, name))
    longest = sorted(groups, key=lambda seq: -len(groups[seq]))  # stable: ties keep their order
    share = {seq: n // len(groups) + (rank < n % len(groups)) for rank, seq in enumerate(longest)}
    return [frames[int((j + 0.5) * len(frames) / share[seq])]
            for seq, frames in groups.items() for j in range(share[seq])]


def gallery_frames(root: str | Path | None = None,
                   frames: Sequence[tuple[str, str]] = CAMVID_GALLERY_FRAMES) -> list[GalleryFrame]:
    """The fixed CamVid frames of the gallery, ``frames`` as (split, name), read with
    their ground truth."""
    from algm.data.datasets import build_dataset

    out = []
    for split in dict.fromkeys(split for split, _ in frames):
        dataset = build_dataset("camvid", split, root=root)
        index = {name: i for i, (_, _, name) in enumerate(dataset.files)}
        wanted = [name for s, name in frames if s == split]
        missing = [name for name in wanted if name not in index]
        if missing:
            raise ValueError(f"camvid {split} has no frame(s) {', '.join(missing)}")
        for name in wanted:
            sample = dataset[index[name]]
            out.append(GalleryFrame(name, sample.image, sample.label))
    order = [name for _, name in frames]
    return sorted(out, key=lambda frame: order.index(frame.name))


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


def _write(fig, out_path: str | Path) -> Path:
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, out)


def write_gallery(models: Mapping[str, object], frames: Sequence, out_path: str | Path, *,
                  window: tuple[int, int] | None = None, title: str | None = None,
                  caption: str | None = None) -> Path:
    """Token maps of every model on every frame, one row per frame: the image, then one
    column per model with its token count. Writes ``out_path`` (PNG) and returns it.

    models: ``{label: Segmenter}`` (e.g. :func:`method_variants`). window: the model
    input (default: each encoder's pos-embed grid in pixels). frames: ``(name, (3, H, W)
    uint8)`` pairs (:func:`gallery_frames`), bare tensors, or image paths. caption: one
    line under the title (dataset, split, backbone, window...). Everything is computed
    before the file is written.
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
    return _write(gallery_figure(views, rows, title or GALLERY_TITLE, caption), out_path)


def write_predictions(models: Mapping[str, object], frames: Sequence[tuple[str, Tensor, Tensor]],
                      out_path: str | Path, dataset: DatasetSpec, *, window: tuple[int, int] | None = None,
                      title: str | None = None, caption: str | None = None) -> Path:
    """Every model's prediction on every frame beside the ground truth, with its error
    map (wrong pixels red, ignored ones excluded); two rows per frame
    (:func:`~algm.pictures.figures.predictions_figure`). Writes ``out_path`` (PNG) and
    returns it.

    models: ``{label: Segmenter}`` (e.g. :func:`method_variants`). frames: ``(name,
    image (3, H, W) uint8, label (H, W) long)`` triples (:func:`gallery_frames`).
    dataset: the classes, palette and ignore index. window: the model input (default:
    each encoder's pos-embed grid in pixels). The ground truth is cut to the region the
    model saw (:func:`~algm.pictures.predict.label_view`). Everything is computed before
    the file is written.
    """
    if not models:
        raise ValueError("write_predictions: no models")
    if not frames:
        raise ValueError("write_predictions: no frames")
    classes, palette = class_meta(dataset.name, dataset.n_cls)
    views, rows = [], []
    for name, image, label in frames:
        panels = []
        for model_label, model in models.items():
            size = window or _pos_embed_window(model)
            pred = predict(model.eval(), image, size)
            panels.append(LabelPanel(model_label, pred.labels().numpy(), pred.caption()))
        truth = label_view(label, size, dataset.ignore_index).numpy()
        views.append((name, pred.rgb(), truth))
        rows.append(panels)
    fig = predictions_figure(views, rows, classes, palette, dataset.ignore_index, title or PREDICTIONS_TITLE, caption)
    return _write(fig, out_path)
