"""Arguments and helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from algm.config import (BACKBONES, DATASETS, DEFAULT_BACKBONE, DEFAULT_DATASET, DecoderConfig, get_backbone,
                         parse_crop)
from algm.methods import add_method_arguments, method_options

if TYPE_CHECKING:  # torch and the model load when a command runs, not while it parses
    from algm.build import Setup

DATA_ROOT_HELP = ("dataset root (default: $DATA_ROOT, else $ALGM_BENCH_DATA/<dataset>, else "
                  "<cache>/data/<dataset>)")
TRUSTED_WARNING = ("algm-bench: warning: --trusted unpickles the checkpoint with "
                   "weights_only=False, which runs any code the file holds; use it only for files "
                   "from a source you trust")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def comma_list(text: str) -> list[str]:
    """argparse type: ``"a,b"`` -> ["a", "b"]."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return names


def backbone_arg(text: str) -> str:
    """argparse type: a suite backbone, or ``timm:<model>`` (checked when the model is
    built: naming it here would import timm before the arguments are parsed)."""
    if text in BACKBONES or (text.startswith("timm:") and len(text) > len("timm:")):
        return text
    raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(BACKBONES)} "
                                     f"or timm:<model>)")


def device(text: str) -> str:
    """argparse type: a torch device this machine has (``cuda`` needs a visible GPU);
    ``auto`` (the commands' default): :func:`default_device`."""
    import torch

    if text == "auto":
        return default_device()
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: CUDA is not available on this machine")
    return text


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def add_model_arguments(parser: argparse.ArgumentParser, methods: bool = True) -> None:
    """--backbone, --dataset, --crop, --decoder, --checkpoint, --trusted and (with
    ``methods``) the method options."""
    group = parser.add_argument_group("model")
    group.add_argument("--backbone", default=None, type=backbone_arg, metavar="NAME",
                       help=f"ViT encoder: {', '.join(BACKBONES)} or timm:<model>, any timm plain ViT "
                            f"(default: {DEFAULT_BACKBONE}, or the --checkpoint's)")
    group.add_argument("--dataset", default=None, choices=list(DATASETS),
                       help=f"dataset: classes and window size (default: {DEFAULT_DATASET}, or the "
                            f"--checkpoint's variant.yml dataset_kwargs.dataset)")
    group.add_argument("--crop", default=None,
                       help="window N or HxW pixels, multiple of the patch size "
                            "(default: the dataset's, CamVid 24x32 patches; the checkpoint's window)")
    group.add_argument("--decoder", default="mask", choices=["mask", "linear"],
                       help="mask transformer or linear decoder (default: mask)")
    group.add_argument("--checkpoint", default=None,
                       help="official Segmenter/ALGM checkpoint.pth, variant.yml beside it: backbone, "
                            "classes, window, stride, normalisation and dataset come from there")
    group.add_argument("--mmseg-config", default=None, metavar="CONFIG.py",
                       help="the --checkpoint is mmsegmentation's (a Segmenter: VisionTransformer + "
                            "SegmenterMaskTransformerHead or FCNHead); its config, read without running it")
    group.add_argument("--weights", default=None, metavar="FILE",
                       help="encoder weights for a timm:<model> backbone: a timm state dict (default: "
                            "timm's cached pretrained file if there is one, else random)")
    group.add_argument("--trusted", action="store_true",
                       help="load a checkpoint whose metadata needs full unpickling "
                            "(torch.load weights_only=False RUNS CODE in the file: trusted files only)")
    if methods:
        add_method_arguments(parser)


def add_data_arguments(parser: argparse.ArgumentParser, split: str = "val") -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data-root", default=None, help=DATA_ROOT_HELP)
    group.add_argument("--split", default=split, help=f"split to read (default: {split})")
    group.add_argument("--limit", type=positive_int, default=None, help="use only the first N images")


def add_training_output_arguments(parser: argparse.ArgumentParser) -> None:
    """The final evaluation of a training command (--eval-split, --eval-limit, --no-eval),
    --quiet and --json."""
    group = parser.add_argument_group("evaluation")
    group.add_argument("--eval-split", default="val", help="split for the final mIoU (default: val)")
    group.add_argument("--eval-limit", type=positive_int, default=None, help="evaluate on the first N images only")
    group.add_argument("--no-eval", action="store_true", help="skip the final mIoU")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def add_nproc_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nproc", type=positive_int, default=1,
                        help="split the work over N processes on this machine via torchrun "
                             "(one per GPU; docs/distributed.md) (default: 1)")


def check_data(args: argparse.Namespace, split: str, limit: int | None = None):
    """The split's dataset, its files listed and checked (:func:`~algm.data.datasets.check_files`),
    before any model is built or weight converted: a missing root or file fails in about
    a second, naming the expected layout. None with ``--checkpoint``, whose variant.yml
    names the dataset (the model must be read first)."""
    if getattr(args, "checkpoint", None):
        return None
    from algm.data.datasets import build_dataset, check_files

    dataset = build_dataset(args.dataset or DEFAULT_DATASET, split, root=args.data_root, limit=limit)
    check_files(dataset)
    return dataset


def gflops_per_image(model, window: tuple[int, int], windows=None) -> list[float]:
    """fvcore GFLOPs of ``model`` (eval mode) per image: with ``windows`` (an iterable of
    (1, 3, h, w) inputs, for a method whose token counts depend on the image) one count
    each, images that keep the same tokens sharing a trace; else one count on a random
    (1, 3, h, w) image (the baseline's count depends on neither content nor weights)."""
    import torch

    from algm.measure.flops import average_flops, count_flops

    model.eval()
    if windows is None:
        return [count_flops(model, torch.randn(1, 3, *window))]

    def signature(image):
        with torch.no_grad():
            return tuple(model.run(image).tokens[0].tolist())

    return average_flops(model, windows, signature)[1]


def has_weights(backbone: str | None, weights: str | None = None) -> bool:
    """True when the encoder gets real weights: a ``--weights`` file, or a backbone with
    real offline weights (measured with them by default)."""
    return weights is not None or get_backbone(backbone or DEFAULT_BACKBONE).weights is not None


def setup_from_args(args: argparse.Namespace, pretrained: bool | None = None, method: str | None = None) -> Setup:
    """The Setup the arguments describe; ``method`` overrides ``--method`` (and drops its
    options). ``pretrained`` (default: where the backbone has real weights) loads them;
    with ``--checkpoint`` the weights are the checkpoint's."""
    from algm.build import make_setup

    if getattr(args, "trusted", False):
        print(TRUSTED_WARNING, file=sys.stderr)
    window = parse_crop(args.crop) if args.crop else None
    name = method or getattr(args, "method", "none")
    options = method_options(args, name) if method is None else {}
    if args.checkpoint:
        return make_setup(args.backbone, args.dataset, name, window=window, checkpoint=args.checkpoint,
                          trusted=args.trusted, mmseg_config=getattr(args, "mmseg_config", None), **options)
    if pretrained is None:
        pretrained = has_weights(args.backbone, getattr(args, "weights", None))
    return make_setup(args.backbone, args.dataset, name, window=window,
                      decoder=DecoderConfig(args.decoder), pretrained=pretrained,
                      weights=getattr(args, "weights", None), trusted=getattr(args, "trusted", False),
                      mmseg_config=getattr(args, "mmseg_config", None), **options)


def setup_with_decoder(args: argparse.Namespace, method: str | None = None) -> Setup | None:
    """The Setup with a trained decoder: the ``--checkpoint``'s own, a ``--head`` file, or
    the off-the-shelf head this suite trained for the backbone without reduction; None
    when there is none of these."""
    from algm.training.head import load_head, trained_head_path

    if args.checkpoint:
        if getattr(args, "head", None):
            raise ValueError("give either --checkpoint or --head, not both")
        return setup_from_args(args, method=method)
    setup = setup_from_args(args, method=method)
    if args.head:
        load_head(setup, args.head)
        return setup
    baseline = setup if setup.model.method.name == "none" else setup_from_args(args, method="none")
    try:
        path = trained_head_path(baseline, root=args.data_root)
    except FileNotFoundError:  # the training split is not on disk: no head can exist
        path = None
    if path is None:
        return None
    load_head(setup, path)
    return setup


def no_head_message(setup: Setup, decoder: str) -> str:
    b, d = setup.backbone.name, setup.dataset.name
    return (f"no trained head for {b} / {d} / {decoder} decoder; train one with `algm-bench "
            f"train-head --backbone {b} --dataset {d} --decoder {decoder}` or pass --head / --checkpoint")


def emit(result: dict, as_json: bool, lines: list[str]) -> None:
    """Print one JSON object, or human-readable lines."""
    if as_json:
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
    else:
        print("\n".join(lines))
