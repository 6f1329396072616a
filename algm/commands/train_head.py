"""``algm-bench train-head``: train a decoder on the frozen encoder, then report mIoU."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from algm.commands.common import (add_data_arguments, add_model_arguments, add_training_output_arguments, emit,
                                  has_weights, setup_from_args)
from algm.training.defaults import (HEAD_BATCH_SIZE, HEAD_EPOCHS, HEAD_LR, HEAD_PRECISION, HEAD_SCALE_LR_MULT,
                                    HEAD_SCHEDULE, HEAD_SEED, HEAD_WARMUP, HEAD_WEIGHT_DECAY, TRAIN_PRECISIONS)

if TYPE_CHECKING:  # torch loads when the command runs, not while it parses
    from algm.training.head import TrainConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-head",
        description="Train the mask-transformer (or linear) decoder on the frozen encoder with a "
                    "token-reduction method active. The encoder runs once per training window "
                    "and its final token state is cached on disk (keyed by backbone, weights, "
                    "dataset, split, window, method and its settings), so an epoch costs only the "
                    "decoder. Checkpoints are written every epoch; running the same command again "
                    "resumes (or returns the finished head). Prints the mIoU on --eval-split at "
                    "the end. Baseline ViT-S/14 + mask decoder on CamVid (2 CPU cores with AMX): "
                    "one-off feature extraction of the 367 train frames (about 2 min), then "
                    "about 40 s per epoch in bf16 (default 6 epochs), 52 mIoU on val.",
    )
    add_model_arguments(p)
    add_data_arguments(p, split="train")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=HEAD_EPOCHS, help=f"epochs (default: {HEAD_EPOCHS})")
    g.add_argument("--lr", type=float, default=None,
                   help="AdamW peak learning rate (default: "
                        + ", ".join(f"{k} {v:g}" for k, v in HEAD_LR.items()) + ")")
    g.add_argument("--weight-decay", type=float, default=HEAD_WEIGHT_DECAY,
                   help=f"AdamW weight decay (default: {HEAD_WEIGHT_DECAY})")
    g.add_argument("--batch-size", type=int, default=HEAD_BATCH_SIZE,
                   help=f"cached windows per step (default: {HEAD_BATCH_SIZE})")
    g.add_argument("--lr-schedule", dest="lr_schedule", choices=["cosine", "poly"], default=HEAD_SCHEDULE,
                   help=f"learning-rate decay after the warm-up (default: {HEAD_SCHEDULE})")
    g.add_argument("--warmup", type=float, default=HEAD_WARMUP,
                   help=f"linear warm-up: fraction of all steps if < 1, else steps (default: {HEAD_WARMUP})")
    g.add_argument("--scale-lr-mult", type=float, default=HEAD_SCALE_LR_MULT,
                   help="learning-rate multiplier of the mask decoder's mask_norm, the logits' "
                        f"temperature (default: {HEAD_SCALE_LR_MULT:g})")
    g.add_argument("--seed", type=int, default=HEAD_SEED, help="initialisation and shuffling seed")
    g.add_argument("--precision", choices=TRAIN_PRECISIONS, default=HEAD_PRECISION,
                   help="decoder forward in fp32 or under bf16 autocast (mixed precision, about "
                        "1.8x faster on CPUs with AMX); auto: bf16 where the CPU has bf16 "
                        f"instructions, else fp32 (default: {HEAD_PRECISION})")
    g.add_argument("--flip", action="store_true",
                   help="also train on horizontally flipped windows (encoded once, cached as a "
                        "second copy: doubles extraction and epoch time)")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--resume", dest="restart", action="store_false", default=False,
                      help="continue from the last epoch checkpoint of this config (default)")
    mode.add_argument("--restart", dest="restart", action="store_true",
                      help="discard checkpoints and the finished head of this config, train anew")
    g.add_argument("--random-weights", action="store_true",
                   help="random encoder weights instead of the real ones (a lower bound)")
    add_training_output_arguments(p)
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    from algm.training.head import TrainConfig

    return TrainConfig(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
                       batch_size=args.batch_size, schedule=args.lr_schedule, warmup=args.warmup,
                       seed=args.seed, flip=args.flip, scale_lr_mult=args.scale_lr_mult,
                       precision=args.precision)


def run(args: argparse.Namespace) -> int:
    from algm.training.head import evaluate_head, load_head, train_head

    if not args.random_weights and not has_weights(args.backbone, args.weights):
        raise ValueError(f"backbone {args.backbone!r} has no offline weights; train heads on "
                         f"vit-s14 or vit-s16-dinov2, pass --weights FILE (timm:<model>) or --random-weights")
    config = config_from_args(args)
    setup = setup_from_args(args, pretrained=not args.random_weights)
    path = train_head(setup, args.split, config=config, root=args.data_root, limit=args.limit,
                      restart=args.restart, progress=not args.quiet)
    meta = load_head(setup, path)
    result = {
        "head": str(path),
        "backbone": setup.backbone.name, "dataset": setup.dataset.name, "decoder": args.decoder,
        "method": args.method, "settings": setup.model.method.settings(),
        "window": list(setup.window), "train_split": args.split,
        "train": meta["train"], "n_windows": meta["n_windows"],
        "final_loss": meta["history"][-1]["loss"] if meta["history"] else None,
        "epoch_seconds": [round(h["seconds"], 1) for h in meta["history"]],
        "extract_seconds": round(meta["extract_seconds"], 1),
        "train_seconds": round(meta["train_seconds"], 1),
    }
    lines = [
        f"head: {path}",
        f"{setup.backbone.name} / {setup.dataset.name} / {args.method} {setup.model.method.settings() or ''} "
        f"/ {args.decoder} decoder: {meta['n_windows']} windows, {len(meta['history'])} epochs, "
        f"final loss {result['final_loss']:.4f}",
        f"time: features {meta['extract_seconds']:.0f} s (one-off, 0 if cached), training "
        f"{meta['train_seconds']:.0f} s ({', '.join(f'{s:.0f}' for s in result['epoch_seconds'])} s per epoch)",
    ]
    if not args.no_eval:
        row = evaluate_head(setup, args.eval_split, root=args.data_root, limit=args.eval_limit,
                            folder=path.parent, progress=not args.quiet)
        result["eval"] = {k: row[k] for k in ("split", "miou", "acc", "n_images", "per_class_iou")}
        lines.append(f"mIoU on {setup.dataset.name} {args.eval_split} ({row['n_images']} images): "
                     f"{row['miou']:.2f}  (pixel acc {row['acc']:.2f})")
    emit(result, args.json, lines)
    return 0


__all__ = ["config_from_args", "register", "run"]
