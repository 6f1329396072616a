"""Arguments and helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import json
import sys

from algm.build import Setup, make_setup
from algm.config import BACKBONES, DATASETS, DecoderConfig, get_backbone, parse_crop
from algm.methods import add_method_arguments, method_options


def add_model_arguments(parser: argparse.ArgumentParser, backbone: str = "vit-s14") -> None:
    """--backbone, --dataset, --crop, --decoder and the method options."""
    group = parser.add_argument_group("model")
    group.add_argument("--backbone", default=backbone, choices=list(BACKBONES),
                       help=f"ViT encoder (default: {backbone})")
    group.add_argument("--dataset", default="camvid", choices=list(DATASETS),
                       help="dataset: sets classes and window size (default: camvid)")
    group.add_argument("--crop", default=None,
                       help="window N or HxW pixels, multiple of the patch size "
                            "(default: the dataset's, CamVid 24x32 patches)")
    group.add_argument("--decoder", default="mask", choices=["mask", "linear"],
                       help="mask transformer or linear decoder (default: mask)")
    add_method_arguments(parser)


def add_data_arguments(parser: argparse.ArgumentParser, split: str = "val") -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data-root", default=None,
                       help="dataset root (default: $DATA_ROOT; CamVid: ../shared/data/camvid)")
    group.add_argument("--split", default=split, help=f"split to read (default: {split})")
    group.add_argument("--limit", type=int, default=None, help="use only the first N images")


def add_nproc_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nproc", type=int, default=1,
                        help="split the work over N processes on this machine via torchrun "
                             "(one per GPU; docs/distributed.md) (default: 1)")


def setup_from_args(args: argparse.Namespace, pretrained: bool = False, method: str | None = None) -> Setup:
    """The Setup the arguments describe; ``method`` overrides ``--method`` (and drops its options)."""
    window = parse_crop(args.crop) if args.crop else None
    options = method_options(args, args.method) if method is None else {}
    return make_setup(
        args.backbone, args.dataset, method or args.method, window=window,
        decoder=DecoderConfig(args.decoder), pretrained=pretrained, **options,
    )


def emit(result: dict, as_json: bool, lines: list[str]) -> None:
    """Print one JSON object, or human-readable lines."""
    if as_json:
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
    else:
        print("\n".join(lines))


def has_weights(backbone: str) -> bool:
    """True for backbones with real offline weights (measured with them by default)."""
    return get_backbone(backbone).weights is not None
