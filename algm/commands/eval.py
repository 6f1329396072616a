"""``algm-bench eval``: mIoU of a segmenter + method on a dataset split."""

from __future__ import annotations

import argparse

import torch

from algm import distributed
from algm.commands.common import (add_data_arguments, add_model_arguments, add_nproc_argument, emit,
                                  has_weights, setup_from_args)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="mIoU with sliding-window inference",
        description="Sliding-window mIoU (window = crop, stride = crop - 32, overlapping logits "
                    "averaged) at the dataset's test scale, one confusion matrix over the split. "
                    "The decoder is an official --checkpoint (with its variant.yml), a --head "
                    "trained by `algm-bench train-head`, or by default the head this suite "
                    "trained for the backbone without reduction (the off-the-shelf head).",
    )
    add_model_arguments(p)
    add_data_arguments(p)
    p.add_argument("--checkpoint", default=None,
                   help="official Segmenter/ALGM checkpoint.pth (variant.yml beside it)")
    p.add_argument("--head", default=None, help="head.pt written by `algm-bench train-head`")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda if available, else cpu; under torchrun "
                        "cuda means cuda:LOCAL_RANK)")
    add_nproc_argument(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from algm.data.datasets import build_dataset
    from algm.evaluate import evaluate

    distributed.init()
    dataset = build_dataset(args.dataset, args.split, root=args.data_root)
    model, window, stride, backbone = load_model(args)
    distributed.broadcast_module(model)  # the same weights everywhere, random ones included
    result = evaluate(model.to(distributed.device(args.device)), dataset, window, stride,
                      backbone_cfg=backbone, limit=args.limit, progress=not args.no_progress,
                      batch_size=1, distributed=True)
    if not distributed.is_main():
        return 0
    out = {
        "miou": result.miou, "acc": result.acc, "images": result.n_images,
        "dataset": args.dataset, "split": args.split, "backbone": backbone.name,
        "method": args.method, "settings": model.method.settings(),
        "window": list(window), "stride": list(stride), "processes": distributed.world_size(),
        **{k: v for k, v in result.to_dict(dataset.classes).items() if k == "per_class_iou"},
    }
    emit(out, args.json, [
        f"{backbone.name} / {args.dataset} {args.split} / {args.method}: mIoU {result.miou * 100:.2f}  "
        f"acc {result.acc * 100:.2f}  ({result.n_images} images)",
    ] + [f"  {name:>14s} {iou * 100:6.2f}" if iou is not None else f"  {name:>14s}      -"
         for name, iou in out["per_class_iou"].items()])
    return 0


def load_model(args: argparse.Namespace):
    """(model, window, stride, backbone config) for the --checkpoint / --head / default head."""
    from algm.evaluate import default_stride
    from algm.methods import build_method, method_options

    if args.checkpoint:
        if args.head:
            raise ValueError("give either --checkpoint or --head, not both")
        from algm.config import get_dataset
        from algm.weights import load_checkpoint

        model, info = load_checkpoint(args.checkpoint)
        method = build_method(args.method, model.encoder.cfg, get_dataset(args.dataset),
                              **method_options(args, args.method))
        window = (info.window_size, info.window_size)
        return model.with_method(method), window, (info.window_stride,) * 2, model.encoder.cfg
    from algm.train import load_head, train_head, trained_head_path

    setup = setup_from_args(args, pretrained=has_weights(args.backbone))
    if args.head:
        load_head(setup, args.head)
    else:
        baseline = setup_from_args(args, pretrained=has_weights(args.backbone), method="none")
        path = trained_head_path(baseline, root=args.data_root)
        if path is None:
            raise FileNotFoundError(
                f"no trained head for {args.backbone} / {args.dataset} / {args.decoder} decoder; "
                f"train one with `algm-bench train-head --backbone {args.backbone} --dataset "
                f"{args.dataset} --decoder {args.decoder}` or pass --head / --checkpoint")
        load_head(setup, path)
    return setup.model, setup.window, default_stride(setup.window), setup.backbone
