"""``algm-bench predict`` and ``algm-bench compare-methods``: look at what a model does.

``predict`` writes, per image, the prediction as a palette PNG, the prediction blended
over the image with a legend, and the token map (every final token's patches in its own
colour, patch grid, tokens kept in the title); ``--save-logits`` adds the logits.
``compare-methods`` puts ``none`` and every method at its default setting side by side
on one image (prediction overlay above, token map below).

The model is fed one window: the image resized to the window (the dataset's crop for
suite backbones, the variant's ``window_size`` square for an official ``--checkpoint``)
and normalised as the encoder expects. The decoder is the official checkpoint's, a
``--head``, or the suite's off-the-shelf head; when none was trained yet the decoder is
random (seeded), a warning says so and every picture title says so.
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from algm.commands.common import add_model_arguments, has_weights, setup_from_args
from algm.config import BACKBONES, DATASETS, DatasetSpec, ViTConfig, get_dataset
from algm.methods import METHODS

RANDOM_DECODER = "RANDOM decoder (no trained head yet): the prediction means nothing"


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _add_weights_arguments(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("weights")
    group.add_argument("--checkpoint", default=None,
                       help="official Segmenter/ALGM checkpoint.pth (variant.yml beside it); the "
                            "image is resized to the variant's window and normalised its way")
    group.add_argument("--head", default=None, help="head.pt written by `algm-bench train-head`")
    group.add_argument("--data-root", default=None,
                       help="dataset root, used to find the suite's off-the-shelf head "
                            "(default: $DATA_ROOT; CamVid: ../shared/data/camvid)")
    group.add_argument("--device", default=_default_device(),
                       help="torch device (default: cuda if available, else cpu)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="prediction, overlay and token-map pictures of images",
        description="For every --image write <name>_pred.png (palette PNG: the colours of the "
                    "dataset, pixel values = class indices, at the image's size), "
                    "<name>_overlay.png (prediction over the image, legend of the classes "
                    "present) and <name>_tokens.png (each final token's patches in its own "
                    "colour, patch grid, tokens kept in the title) to --out. --save-logits "
                    "adds <name>_logits.pt: the (1, n_cls, h, w) float32 logits exactly as the "
                    "model returned them for the resized window (no softmax, no argmax).",
    )
    p.add_argument("--image", action="append", required=True, metavar="PATH",
                   help="image file; repeat for more images")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--save-logits", action="store_true", help="also write <name>_logits.pt")
    add_model_arguments(p)
    _add_weights_arguments(p)
    p.set_defaults(func=run_predict)

    c = sub.add_parser(
        "compare-methods", help="none vs every method side by side on one image",
        description="One figure: a column per method at its default setting (none first), "
                    "the prediction over the image on top and the token map below, with "
                    "the tokens kept. All methods share the encoder and decoder weights.",
    )
    c.add_argument("--image", required=True, metavar="PATH", help="image file")
    c.add_argument("--out", required=True, help="figure file, e.g. fig.png (.pdf, .svg work too)")
    c.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                   metavar="METHOD", help=f"columns, in order (default: {' '.join(METHODS)})")
    group = c.add_argument_group("model")
    group.add_argument("--backbone", default="vit-s14", choices=list(BACKBONES),
                       help="ViT encoder (default: vit-s14)")
    group.add_argument("--dataset", default="camvid", choices=list(DATASETS),
                       help="dataset: classes, palette, window and method defaults (default: camvid)")
    group.add_argument("--crop", default=None, help="window N or HxW pixels (default: the dataset's)")
    group.add_argument("--decoder", default="mask", choices=["mask", "linear"],
                       help="mask transformer or linear decoder (default: mask)")
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
    """The model of ``--checkpoint`` / ``--head`` / the off-the-shelf head (through
    :func:`algm.commands.eval.load_model`); without any trained head a seeded random
    decoder on the real encoder, with a warning."""
    from algm.commands.eval import load_model
    from algm.train import trained_head_path

    spec = get_dataset(args.dataset)
    if args.checkpoint or args.head:
        model, window, _, backbone = load_model(args)
        if args.checkpoint:
            weights = f"checkpoint {Path(args.checkpoint).name} ({backbone.name})"
        else:
            weights = f"{backbone.name}, head {Path(args.head).name}"
        return Loaded(model.eval(), tuple(window), backbone, spec, weights, False)
    pretrained = has_weights(args.backbone)
    encoder = args.backbone + ("" if pretrained else " (RANDOM encoder weights)")
    torch.manual_seed(0)  # a random decoder, if it comes to that, is the same every run
    baseline = setup_from_args(args, pretrained=pretrained, method="none")
    try:
        path = trained_head_path(baseline, root=args.data_root)
    except FileNotFoundError:  # the training split is not on disk: no head can exist
        path = None
    if path is not None:
        with_head = copy.copy(args)
        with_head.head = str(path)
        model, window, _, backbone = load_model(with_head)
        return Loaded(model.eval(), tuple(window), backbone, spec, f"{encoder}, off-the-shelf head", False)
    print(f"algm-bench: warning: no trained head for {args.backbone} / {args.dataset} / "
          f"{args.decoder} decoder; the decoder is random, so the prediction means nothing "
          f"(the token map is real). Train one with `algm-bench train-head --backbone "
          f"{args.backbone} --dataset {args.dataset} --decoder {args.decoder}`.", file=sys.stderr)
    if args.method == "none":
        setup = baseline
    else:
        torch.manual_seed(0)
        setup = setup_from_args(args, pretrained=pretrained)
    return Loaded(setup.model.eval(), tuple(setup.window), setup.backbone, spec,
                  f"{encoder}, {RANDOM_DECODER}", True)


def _check_out_dir(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"--out {path} exists and is not a folder")


# ============================================================================ predict
def run_predict(args: argparse.Namespace) -> int:
    from algm.visualize import check_image, class_meta, method_label, predict, read_image, save_prediction

    out = Path(args.out)
    _check_out_dir(out)
    images = [Path(p) for p in args.image]
    for path in images:
        check_image(path)
    stems: dict[str, Path] = {}
    for path in images:
        if path.stem in stems:
            raise ValueError(f"{stems[path.stem]} and {path} would write the same files "
                             f"({path.stem}_*.png); rename one")
        stems[path.stem] = path
    loaded = load_for_pictures(args)
    classes, palette = class_meta(args.dataset, loaded.model.n_cls)
    model = loaded.model.to(args.device)
    label = method_label(model.method.name, model.method.settings())
    for path in images:
        pred = predict(model, read_image(path), loaded.window)
        title = f"{path.name}: {label}\n{loaded.weights}"
        for written in save_prediction(pred, out, path.stem, classes, palette, title, args.save_logits):
            print(written)
    return 0


# ==================================================================== compare-methods
def run_compare(args: argparse.Namespace) -> int:
    from matplotlib.figure import Figure

    from algm.visualize import (check_image, class_meta, compare_figure, method_variants, predict,
                                read_image, save_figure)

    out = Path(args.out)
    formats = Figure().canvas.get_supported_filetypes()
    if out.suffix.lstrip(".").lower() not in formats:
        raise ValueError(f"--out {out}: give a file name ending in one of "
                         f"{', '.join('.' + f for f in sorted(formats))} (e.g. fig.png)")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name such as {out / 'fig.png'}")
    check_image(args.image)
    loaded = load_for_pictures(args)
    classes, palette = class_meta(args.dataset, loaded.model.n_cls)
    image = read_image(args.image)
    model = loaded.model.to(args.device)
    variants = method_variants(model, loaded.backbone, loaded.dataset, args.methods)
    preds = [(label, predict(variant.to(args.device), image, loaded.window))
             for label, variant in variants.items()]
    title = f"{Path(args.image).name}: each method at its default setting\n{loaded.weights}"
    fig = compare_figure(preds, classes, palette, title)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(save_figure(fig, out))
    return 0
