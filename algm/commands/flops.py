"""``algm-bench flops``: fvcore GFLOPs per image at batch 1."""

from __future__ import annotations

import argparse

from algm.commands.common import (add_data_arguments, add_model_arguments, check_data, emit, gflops_per_image,
                                  has_weights, setup_from_args)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "flops",
        description="Count GFLOPs with fvcore at batch 1: encoder + decoder + restore + upsample, "
                    "one window-sized forward. Methods whose token counts depend on the image "
                    "are averaged over --limit images of the split; "
                    "the baseline is counted on one random image (its count does not depend on "
                    "content or weights).",
    )
    add_model_arguments(p)
    add_data_arguments(p)
    p.add_argument("--pretrained", action="store_true",
                   help="load the real encoder weights (vit-s14, vit-s16-dinov2); "
                        "default for methods other than none")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    content_dependent = args.method != "none"
    limit = args.limit if args.limit is not None else 20
    if content_dependent:
        check_data(args, args.split, limit)
    setup = setup_from_args(args, pretrained=args.pretrained or (content_dependent and has_weights(args.backbone)))
    images = setup.split_windows(args.split, limit, args.data_root) if content_dependent else None
    per_image = gflops_per_image(setup.model, setup.window, images)
    gflops = sum(per_image) / len(per_image)
    result = {
        "gflops": gflops,
        "gflops_std": float(torch.tensor(per_image).std()) if len(per_image) > 1 else 0.0,
        "images": len(per_image),
        "backbone": setup.backbone.name,
        "dataset": setup.dataset.name,
        "crop": list(setup.window),
        "method": args.method,
        "settings": setup.model.method.settings(),
        "weights": setup.weights.describe(),
    }
    emit(result, args.json, [
        f"{setup.backbone.name} / {setup.dataset.name} / {setup.model.method.label()} at {setup.window[0]}x{setup.window[1]}: "
        f"{gflops:.2f} GFLOPs per image ({len(per_image)} image(s))",
    ])
    return 0

