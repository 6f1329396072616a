"""``algm-bench finetune``: train encoder and decoder with a method active, write a checkpoint."""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from typing import TYPE_CHECKING

from algm.commands.common import (add_data_arguments, add_model_arguments, add_training_output_arguments,
                                  device, emit, no_head_message, positive_int,
                                  setup_from_args, setup_with_decoder)
from algm.training.defaults import (FINETUNE_BATCH_SIZE, FINETUNE_EPOCHS, FINETUNE_FREEZE_BLOCKS, FINETUNE_LR,
                                    FINETUNE_MIN_LR, FINETUNE_PRECISION, FINETUNE_SEED, FINETUNE_VIEWS,
                                    TRAIN_PRECISIONS)

if TYPE_CHECKING:  # torch loads when the command runs, not while it parses
    from algm.training.finetune import FinetuneConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        description="Fine-tune the segmenter with the token-reduction method in the forward pass, as "
                    "the paper trains ALGM: SGD (momentum 0.9), poly learning-rate decay per "
                    "iteration, random rescale 0.5-2.0 / crop / flip. The start model is --checkpoint, "
                    "or the offline --backbone with its off-the-shelf head (or --head). With "
                    "--freeze-blocks K the first K blocks stay frozen and their output is computed "
                    "once for --views random views per frame (the CPU protocol); 0 trains everything. "
                    "Writes OUT/checkpoint.pth + variant.yml (default OUT: "
                    "finetuned/<dataset>/<backbone>/<method>), which --checkpoint and `bench "
                    "--checkpoints finetuned` read. A killed run resumes from its last epoch when "
                    "run again; a finished one is returned as is.",
    )
    add_model_arguments(p)
    add_data_arguments(p, split="train")
    p.add_argument("--head", default=None, help="start decoder: head.pt written by `algm-bench train-head`")
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--freeze-blocks", type=int, default=FINETUNE_FREEZE_BLOCKS,
                   help=f"leading encoder blocks kept frozen (default: {FINETUNE_FREEZE_BLOCKS})")
    budget = g.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=positive_int, default=None,
                        help=f"passes over the training items (default: {FINETUNE_EPOCHS})")
    budget.add_argument("--iters", type=positive_int, default=None,
                        help="iterations instead of epochs (rounded up to whole epochs)")
    g.add_argument("--views", type=positive_int, default=FINETUNE_VIEWS,
                   help=f"random views cached per frame with frozen blocks (default: {FINETUNE_VIEWS})")
    g.add_argument("--batch-size", type=positive_int, default=FINETUNE_BATCH_SIZE,
                   help=f"images per iteration (default: {FINETUNE_BATCH_SIZE})")
    g.add_argument("--lr", type=float, default=FINETUNE_LR, help=f"peak learning rate (default: {FINETUNE_LR:g})")
    g.add_argument("--min-lr", type=float, default=FINETUNE_MIN_LR,
                   help=f"learning rate at the end of the poly decay (default: {FINETUNE_MIN_LR:g})")
    g.add_argument("--seed", type=int, default=FINETUNE_SEED, help="views and shuffling seed")
    g.add_argument("--precision", choices=TRAIN_PRECISIONS, default=FINETUNE_PRECISION,
                   help="fp32 or bf16 autocast; auto: bf16 on CUDA and on CPUs with bf16 "
                        f"instructions, else fp32 (default: {FINETUNE_PRECISION})")
    g.add_argument("--device", type=device, default="auto",
                   help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--out", default=None, help="output folder (default: finetuned/<dataset>/<backbone>/<method>)")
    g.add_argument("--overwrite", action="store_true", help="replace another model in --out")
    add_training_output_arguments(p)
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace, n_frames: int) -> FinetuneConfig:
    """The config the arguments describe; ``--iters`` becomes whole epochs."""
    from algm.training.finetune import FinetuneConfig, items_per_epoch

    config = FinetuneConfig(freeze_blocks=args.freeze_blocks, views=args.views, batch_size=args.batch_size,
                            lr=args.lr, min_lr=args.min_lr, seed=args.seed, precision=args.precision,
                            epochs=args.epochs or FINETUNE_EPOCHS)
    if args.iters is None:
        return config
    steps = math.ceil(items_per_epoch(n_frames, config) / config.batch_size)
    return dataclasses.replace(config, epochs=math.ceil(args.iters / steps))


def run(args: argparse.Namespace) -> int:
    from algm.data.datasets import build_dataset, check_files
    from algm.data.windows import covering_stride
    from algm.evaluate import evaluate
    from algm.fetch import layout_dir
    from algm.training.finetune import finetune

    setup = setup_with_decoder(args)
    if setup is None:
        raise FileNotFoundError(no_head_message(setup_from_args(args, method="none"), args.decoder))
    data = build_dataset(setup.dataset.name, args.split, root=args.data_root, limit=args.limit)
    check_files(data)
    config = config_from_args(args, len(data))
    config.check_depth(setup.model.encoder.depth, setup.backbone.name, "--freeze-blocks")
    if not args.no_eval:  # fail on a missing evaluation split now, not after training
        evaluation = build_dataset(setup.dataset.name, args.eval_split, root=args.data_root, limit=args.eval_limit)
        check_files(evaluation)
    out = args.out or layout_dir("finetuned", setup.dataset.name, setup.backbone.name, args.method)
    result = finetune(setup, config, out, split=args.split, dataset=data, device=args.device,
                      progress=not args.quiet, overwrite=args.overwrite)
    record, budget = result.record, result.record["budget"]
    lines = [f"checkpoint: {result.checkpoint}",
             f"{setup.backbone.name} / {setup.dataset.name} / {setup.model.method.label()}: "
             f"epochs {budget['epochs']} x items {budget['items']} = iterations {budget['iterations']} "
             f"(batch {budget['batch_size']}, frozen blocks {budget['freeze_blocks']}, {budget['precision']}), "
             f"{record['wall_seconds'] / 60:.1f} min when it ran"]
    out_json = {"checkpoint": str(result.checkpoint), **record}
    if not args.no_eval:
        stride, note = covering_stride(setup.window, setup.stride)  # e.g. --crop under a checkpoint's stride
        if note:
            print(f"algm-bench finetune: note: {note}", file=sys.stderr)
        res = evaluate(setup.model.to(args.device), evaluation, setup.window, stride,
                       progress=not args.quiet)
        setup.model.to("cpu")
        out_json["eval"] = {"split": args.eval_split, "miou": res.miou, "acc": res.acc, "images": res.n_images}
        lines.append(f"mIoU on {setup.dataset.name} {args.eval_split} ({res.n_images} images): {res.miou:.2f}")
    emit(out_json, args.json, lines)
    return 0
