"""``algm-bench train-prune-heads``: train the pruning method's exit heads on the frozen encoder."""

from __future__ import annotations

import argparse

from algm.config import BACKBONES, DATASETS, get_backbone, get_dataset, parse_crop
from baselines.prune import TRAIN_COMMAND, parse_layers, resolve_layers, train_heads


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``train-prune-heads`` (``args.func(args)`` runs it and returns 0)."""
    p = sub.add_parser(
        TRAIN_COMMAND, help="train the token-pruning (DToP) auxiliary heads on frozen features",
        description="Train the auxiliary heads of the `prune` method (LayerNorm + linear per "
                    "token) on features of the real frozen encoder. Features are extracted once "
                    "and cached under $ALGM_BENCH_CACHE/prune; training checkpoints every epoch "
                    "and resumes when rerun. The heads land where `--method prune` finds them. "
                    "CamVid train with vit-s14 takes a few minutes on 2 CPU cores.")
    p.add_argument("--backbone", default="vit-s14", choices=[n for n, c in BACKBONES.items() if c.weights],
                   help="encoder with real weights (default: vit-s14)")
    p.add_argument("--dataset", default="camvid", choices=list(DATASETS), help="dataset (default: camvid)")
    p.add_argument("--split", default="train", help="split to train on (default: train)")
    p.add_argument("--data-root", default=None, help="dataset root (default: $DATA_ROOT; CamVid: ../shared/data/camvid)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images")
    p.add_argument("--crop", default=None, help="window N or HxW (default: the dataset's)")
    p.add_argument("--exit-layers", type=parse_layers, default=None,
                   help="1-based blocks with a head, e.g. 6,8 (default: 6,8 for 12 layers, 8,16 for 24)")
    p.add_argument("--epochs", type=int, default=10, help="epochs over the cached features (default: 10)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: 1e-3)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default: 1e-4)")
    p.add_argument("--batch-tokens", type=int, default=4096, help="tokens per step (default: 4096)")
    p.add_argument("--seed", type=int, default=0, help="seed for init and shuffling (default: 0)")
    p.add_argument("--restart", action="store_true", help="ignore a training checkpoint and start over")
    p.add_argument("--out", default=None, help="heads file (default: the cache entry `--method prune` reads)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    window = parse_crop(args.crop) if args.crop else None
    if args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
    backbone, dataset = get_backbone(args.backbone), get_dataset(args.dataset)
    layers = resolve_layers(args.exit_layers, backbone.depth)
    res = train_heads(backbone, dataset, layers, seed=args.seed, out=args.out, epochs=args.epochs,
                      window=window, split=args.split, data_root=args.data_root, limit=args.limit,
                      lr=args.lr, weight_decay=args.weight_decay, batch_tokens=args.batch_tokens,
                      restart=args.restart, progress=not args.quiet)
    print(f"heads written to {res.path} ({res.epochs} epochs, final loss {res.train_loss[-1]:.4f}, "
          f"token acc {res.train_acc[-1]:.3f}; {res.seconds:.0f} s, of which features "
          f"{res.extract_seconds:.0f} s)")
    return 0


__all__ = ["register", "run"]
