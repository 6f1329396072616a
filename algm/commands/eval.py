"""``algm-bench eval``: mIoU of a segmenter + method on a dataset split."""

from __future__ import annotations

import argparse
import sys

from algm.commands.common import (add_data_arguments, add_model_arguments, add_nproc_argument,
                                  check_data, device, emit, no_head_message, positive_int,
                                  setup_from_args, setup_with_decoder)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        description="Sliding-window mIoU (window = crop, stride = crop - 32 or the checkpoint's "
                    "window_stride, cut to the window where longer; overlapping logits averaged) at the dataset's test scale, one "
                    "confusion matrix over the split. The decoder is an official --checkpoint's "
                    "(backbone, dataset, window and stride come from its variant.yml), a --head "
                    "trained by `algm-bench train-head`, or by default the head this suite trained "
                    "for the backbone without reduction (the off-the-shelf head).",
    )
    add_model_arguments(p)
    add_data_arguments(p)
    p.add_argument("--head", default=None, help="head.pt written by `algm-bench train-head`")
    p.add_argument("--window-batch-size", type=positive_int, default=1,
                   help="windows of one image per forward; the authors' evaluation batches 4, so "
                        "ALGM's batch minimum acts across them (default: 1, every window alone)")
    p.add_argument("--device", type=device, default="auto",
                   help="torch device (default: cuda if available, else cpu; under torchrun "
                        "cuda means cuda:LOCAL_RANK)")
    add_nproc_argument(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from algm import distributed
    from algm.data.datasets import build_dataset, check_files
    from algm.data.windows import covering_stride
    from algm.evaluate import evaluate

    distributed.init()
    dataset = check_data(args, args.split, args.limit)  # before the model
    setup = setup_with_decoder(args)
    if setup is None:
        raise FileNotFoundError(no_head_message(setup_from_args(args, method="none"), args.decoder))
    if dataset is None:  # the --checkpoint's dataset
        dataset = build_dataset(setup.dataset.name, args.split, root=args.data_root, limit=args.limit)
        check_files(dataset)  # the first unreadable file fails now, naming it
    stride, note = covering_stride(setup.window, setup.stride)  # e.g. --crop under a checkpoint's stride
    if note and distributed.is_main():
        print(f"algm-bench eval: note: {note}", file=sys.stderr)
    model = setup.model
    distributed.broadcast_module(model)  # the same weights everywhere, random ones included
    result = evaluate(model.to(distributed.device(args.device)), dataset, setup.window, stride,
                      backbone_cfg=setup.backbone, limit=args.limit, progress=not args.no_progress,
                      batch_size=args.window_batch_size, distributed=True)
    if not distributed.is_main():
        return 0
    out = {
        "miou": result.miou, "acc": result.acc, "images": result.n_images,
        "dataset": setup.dataset.name, "split": args.split, "backbone": setup.backbone.name,
        "method": model.method.name, "settings": model.method.settings(),
        "window": list(setup.window), "stride": list(stride),
        "window_batch_size": args.window_batch_size, "weights": setup.weights.describe(),
        "processes": distributed.world_size(),
        **{k: v for k, v in result.to_dict(dataset.classes).items() if k == "per_class_iou"},
    }
    emit(out, args.json, [
        f"{setup.backbone.name} / {setup.dataset.name} {args.split} / {model.method.label()}: mIoU "
        f"{result.miou:.2f}  acc {result.acc:.2f}  ({result.n_images} images)",
    ] + [f"  {name:>14s} {iou:6.2f}" if iou is not None else f"  {name:>14s}      -"
         for name, iou in out["per_class_iou"].items()])
    return 0
