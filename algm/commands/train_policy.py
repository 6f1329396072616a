"""``algm-bench train-policy``: train the CTS superpatch policy, report it next to ``variance``."""

from __future__ import annotations

import argparse

import torch

from baselines.cts_policy import ARCHS, DEFAULT_ARCH
from baselines.cts_train import train_policy


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``train-policy`` to the subparsers; its handler (``func``) returns an exit code."""
    p = sub.add_parser(
        "train-policy", help="train the CTS policy network (CPU, minutes)",
        description="Train the CTS superpatch policy on a dataset's train split (labels: 'this 2x2 "
                    "superpatch holds one class'), report its val accuracy and top-K precision "
                    "next to the training-free variance policy, and save it where "
                    "'--method cts --policy learned' finds it. Resumes an interrupted run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="camvid", help="dataset whose train split trains the policy")
    p.add_argument("--backbone", default="vit-s14",
                   help="backbone whose patch size and input window define the superpatches")
    p.add_argument("--arch", default=DEFAULT_ARCH, choices=ARCHS,
                   help="policy network: tiny CNN or the authors' EfficientNet-Lite0 (no pretrained weights)")
    p.add_argument("--epochs", type=int, default=12,
                   help="training epochs (val top-K precision peaks near 12 on CamVid, then overfits)")
    p.add_argument("--batch-size", type=int, default=16, help="images per step")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (cosine schedule)")
    p.add_argument("--seed", type=int, default=0, help="random seed (training is deterministic for it)")
    p.add_argument("--data-root", default=None, help="dataset root (default: $DATA_ROOT or the CamVid default)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N frames of each split")
    p.add_argument("--out", default=None, help="checkpoint path (default: the cache dir, where CTS looks)")
    p.add_argument("--no-resume", action="store_true", help="start over even if a training state exists")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    result = train_policy(args.dataset, args.backbone, args.epochs, arch=args.arch,
                          batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                          root=args.data_root, limit=args.limit, resume=not args.no_resume,
                          out=args.out, progress=not args.quiet)
    val = result["val"]
    print(f"saved {result['path']} ({result['seconds']:.0f} s)")
    print(f"val: accuracy {val['accuracy']:.3f}, loss {val['loss']:.3f}, top-{result['k']} precision "
          f"{val['topk_precision']:.3f} (variance policy {result['val_variance_topk_precision']:.3f})")
    return 0
