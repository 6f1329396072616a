"""``algm-bench predict`` and ``algm-bench compare-methods``: look at what a model does.

``predict`` writes, per image, the prediction as a palette PNG, the prediction blended
over the image with a legend, and the token map (every final token's patches in its own
colour, patch grid, tokens kept in the title); ``--save-logits`` adds the logits.
``compare-methods`` puts ``none`` and every method at its default setting side by side
on one image (prediction overlay above, token map below).

The model is fed what evaluation feeds it: the centre window of the image at test scale
(:func:`algm.data.windows.center_window`; the window is the dataset's crop for suite
backbones, the variant's ``window_size`` square for an official ``--checkpoint``),
normalised as the encoder expects; the pictures show that window's region at the
image's own scale (the whole image where the window covers it, e.g. CamVid frames).
Labels are the method's own (``method.label()``). The decoder is the official
checkpoint's, a ``--head``, or the suite's off-the-shelf head; when none was trained
yet the decoder is random (seeded), a warning says so and every picture title says so.
Every image is read and predicted before the first file is written.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from algm.commands.common import (DATA_ROOT_HELP, add_model_arguments, device, no_head_message,
                                  setup_from_args, setup_with_decoder)
from algm.config import DatasetSpec, ViTConfig
from algm.files import regular_file
from algm.methods import method_name, method_names, methods

if TYPE_CHECKING:  # numpy, torch and the model load when the command runs
    import numpy as np

    from algm.pictures.predict import Prediction

RANDOM_DECODER = "RANDOM decoder (no trained head yet): the prediction means nothing"


def _add_weights_arguments(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("weights")
    group.add_argument("--head", default=None, help="head.pt written by `algm-bench train-head`")
    group.add_argument("--data-root", default=None,
                       help="dataset root, used to find the suite's off-the-shelf head; " + DATA_ROOT_HELP)
    group.add_argument("--device", type=device, default="auto",
                       help="torch device (default: cuda if available, else cpu)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        description="For every --image write <name>_pred.png (palette PNG: the colours of the "
                    "dataset, pixel values = class indices, at the image's scale over the centre "
                    "window the model saw: the whole image where the window covers it), "
                    "<name>_overlay.png (prediction over the image, legend of the classes "
                    "present) and <name>_tokens.png (each final token's patches in its own "
                    "colour, patch grid, tokens kept in the title) to --out. --save-logits "
                    "adds <name>_logits.pt: the (1, n_cls, h, w) float32 logits exactly as the "
                    "model returned them for the window (no softmax, no argmax).",
    )
    p.add_argument("--image", action="append", required=True, metavar="PATH",
                   help="image file; repeat for more images")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--save-logits", action="store_true", help="also write <name>_logits.pt")
    add_model_arguments(p)
    _add_weights_arguments(p)
    p.set_defaults(func=run_predict)

    c = sub.add_parser(
        "compare-methods",
        description="One figure: a column per method at its default setting (none first), "
                    "the prediction over the image on top and the token map below, with "
                    "the tokens kept. All methods share the encoder and decoder weights.",
    )
    c.add_argument("--image", required=True, metavar="PATH", help="image file")
    c.add_argument("--out", required=True, help="figure file, e.g. fig.png (.pdf, .svg work too)")
    c.add_argument("--methods", nargs="+", default=None, type=method_name, metavar="METHOD",
                   help=f"columns, in order (default: every method: {' '.join(method_names())})")
    add_model_arguments(c, methods=False)
    _add_weights_arguments(c)
    c.set_defaults(func=run_compare, method="none")


# ============================================================================ loading
@dataclass
class Loaded:
    """A model ready for pictures: feed it ``window``-sized inputs."""

    model: object  # Segmenter
    window: tuple[int, int]
    backbone: ViTConfig
    dataset: DatasetSpec
    weights: str  # where the weights come from, for titles
    random_decoder: bool


def load_for_pictures(args: argparse.Namespace) -> Loaded:
    """The model of ``--checkpoint`` / ``--head`` / the off-the-shelf head
    (:func:`~algm.commands.common.setup_with_decoder`); without any trained head a seeded
    random decoder on the real encoder, with a warning."""
    import torch

    torch.manual_seed(0)  # a random decoder, if it comes to that, is the same every run
    setup = setup_with_decoder(args)
    if setup is not None:
        if args.checkpoint:
            weights = f"checkpoint {Path(args.checkpoint).name} ({setup.backbone.name})"
        elif args.head:
            weights = f"{setup.backbone.name}, head {Path(args.head).name}"
        else:
            weights = f"{setup.backbone.name}, off-the-shelf head"
        return Loaded(setup.model.eval(), tuple(setup.window), setup.backbone, setup.dataset, weights, False)
    torch.manual_seed(0)
    setup = setup_from_args(args)
    print(f"algm-bench: warning: {no_head_message(setup, args.decoder)}; the decoder is random, so "
          f"the prediction means nothing (the token map is real).", file=sys.stderr)
    encoder = setup.backbone.name + ("" if setup.weights.kind != "random" else " (RANDOM encoder weights)")
    return Loaded(setup.model.eval(), tuple(setup.window), setup.backbone, setup.dataset,
                  f"{encoder}, {RANDOM_DECODER}", True)


def _check_out_dir(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"--out {path} exists and is not a folder")


# ============================================================================ predict
def prediction_files(pred: Prediction, out: Path, name: str, classes: Sequence[str], palette: np.ndarray,
                     title: str, save_logits: bool) -> list[Callable[[], Path]]:
    """The files of one prediction, drawn but not yet written: one call each writes
    ``<name>_pred.png``, ``<name>_overlay.png``, ``<name>_tokens.png`` (and with
    ``save_logits`` ``<name>_logits.pt``, the (1, n_cls, h, w) float32 logits) into ``out``."""
    from algm.atomic import save_torch
    from algm.pictures.figures import TokenPanel, overlay_figure, save_figure, tokens_figure
    from algm.pictures.maps import save_label_png

    labels, image = pred.labels().numpy(), pred.rgb()
    overlay = overlay_figure(image, labels, classes, palette, title)
    tokens = tokens_figure(image, TokenPanel(title, pred.source.numpy(), pred.caption()))
    writes = [partial(save_label_png, labels, palette, out / f"{name}_pred.png"),
              partial(save_figure, overlay, out / f"{name}_overlay.png"),
              partial(save_figure, tokens, out / f"{name}_tokens.png")]
    if save_logits:
        writes.append(partial(save_torch, pred.logits.contiguous(), out / f"{name}_logits.pt"))
    return writes


def run_predict(args: argparse.Namespace) -> int:
    from algm.pictures.maps import class_meta
    from algm.pictures.predict import check_image, predict, read_image

    out = Path(args.out)
    _check_out_dir(out)
    images = [regular_file(p, "image") for p in args.image]  # a FIFO or device is no image (and would block)
    for path in images:
        check_image(path)
    stems: dict[str, Path] = {}
    for path in images:
        if path.stem in stems:
            raise ValueError(f"{stems[path.stem]} and {path} would write the same files "
                             f"({path.stem}_*.png); rename one")
        stems[path.stem] = path
    loaded = load_for_pictures(args)
    classes, palette = class_meta(loaded.dataset.name, loaded.model.n_cls)
    model = loaded.model.to(args.device)
    label = model.method.label()
    # Read, predict and draw every image first: a file damaged past its header fails
    # here, before any picture of an earlier image is written.
    writes = []
    for path in images:
        pred = predict(model, read_image(path), loaded.window)
        title = f"{path.name}: {label}\n{loaded.weights}"
        writes += prediction_files(pred, out, path.stem, classes, palette, title, args.save_logits)
    out.mkdir(parents=True, exist_ok=True)
    for write in writes:
        print(write())
    return 0


# ==================================================================== compare-methods
def run_compare(args: argparse.Namespace) -> int:
    from matplotlib.figure import Figure

    from algm.pictures.figures import TokenPanel, compare_figure, save_figure
    from algm.pictures.gallery import method_variants
    from algm.pictures.maps import class_meta
    from algm.pictures.predict import check_image, predict, read_image

    out = Path(args.out)
    formats = Figure().canvas.get_supported_filetypes()
    if out.suffix.lstrip(".").lower() not in formats:
        raise ValueError(f"--out {out}: give a file name ending in one of "
                         f"{', '.join('.' + f for f in sorted(formats))} (e.g. fig.png)")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name such as {out / 'fig.png'}")
    check_image(regular_file(args.image, "image"))
    loaded = load_for_pictures(args)
    classes, palette = class_meta(loaded.dataset.name, loaded.model.n_cls)
    image = read_image(args.image)
    model = loaded.model.to(args.device)
    variants = method_variants(model, loaded.backbone, loaded.dataset, args.methods or list(methods()))
    preds = {label: predict(variant.to(args.device), image, loaded.window) for label, variant in variants.items()}
    if not preds:
        raise ValueError("no method to compare: every one chosen still needs training")
    panels = [TokenPanel(label, pred.source.numpy(), pred.caption()) for label, pred in preds.items()]
    view = next(iter(preds.values())).rgb()
    title = f"{Path(args.image).name}: each method at its default setting\n{loaded.weights}"
    fig = compare_figure(view, panels, [p.labels().numpy() for p in preds.values()], classes, palette, title)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(save_figure(fig, out))
    return 0
