"""``algm-bench train``: train the parts a method needs (pruning's exit heads, a learned
CTS policy, ...), whatever the method: the method lists them (``training_tasks``)."""

from __future__ import annotations

import argparse

from algm.commands.common import DATA_ROOT_HELP
from algm.config import (BACKBONES, DATASETS, DEFAULT_BACKBONE, DEFAULT_DATASET, get_backbone, get_dataset,
                         parse_crop)
from algm.methods import add_method_arguments, method_class, method_config, method_options, required_training


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``train`` (``args.func(args)`` runs it and returns 0)."""
    p = sub.add_parser(
        "train",
        description="Train what --method needs besides the decoder head, on the frozen encoder with "
                    "real weights, into the cache where the method finds it. Only the missing parts "
                    "train (parts the package ships are copied instead), unless --retrain. A retrained "
                    "part gives the method a new identity, so suite rows measured with the old one are "
                    "measured again.")
    p.add_argument("--backbone", default=DEFAULT_BACKBONE, choices=[n for n, c in BACKBONES.items() if c.weights],
                   help=f"encoder with real weights (default: {DEFAULT_BACKBONE})")
    p.add_argument("--dataset", default=DEFAULT_DATASET, choices=list(DATASETS),
                   help=f"dataset whose train split trains the parts (default: {DEFAULT_DATASET})")
    p.add_argument("--crop", default=None, help="window N or HxW (default: the dataset's)")
    p.add_argument("--data-root", default=None, help=DATA_ROOT_HELP)
    p.add_argument("--retrain", action="store_true", help="train every part again, even those already there")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_method_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from algm.training.features import training_context

    backbone, dataset = get_backbone(args.backbone), get_dataset(args.dataset)
    options = method_options(args, args.method)
    every = method_class(args.method).training_tasks(method_config(args.method, **options), backbone, dataset)
    tasks = every if args.retrain else required_training(args.method, backbone, dataset, **options)
    if not tasks:
        print(f"{args.method}: nothing to train" + (f" ({len(every)} part(s) already trained or shipped; "
                                                     f"--retrain trains them again)" if every else ""))
        return 0
    context = training_context(args.data_root, parse_crop(args.crop) if args.crop else None,
                               progress=not args.quiet)
    for task in tasks:
        if not args.quiet:
            print(f"training {task.name}")
        task.run(context)
        print(f"{task.name}: written to {task.path}")
    return 0


__all__ = ["register", "run"]
