"""``algm-bench``: measure token reduction in ViT segmenters.

Every subcommand has ``--help``. Errors in user input (unknown names, bad sizes,
missing data) print one line and exit with status 2; nothing is written.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from algm import distributed

# "module:function", the function adds its subcommand(s) to the parser.
COMMANDS = [
    "algm.commands.flops:register",
    "algm.commands.throughput:register",
    "algm.commands.eval:register",
    "algm.commands.bench:register",
    "algm.commands.predict:register",
    "algm.commands.train_head:register",
    "baselines.policy:add_train_policy_parser",
    "baselines.prune:add_train_parser",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="algm-bench",
        description="Benchmark token reduction (ALGM, ToMe, CTS, pruning) in ViT segmenters: "
                    "GFLOPs, images/s and mIoU under one protocol.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for target in COMMANDS:
        module, function = target.split(":")
        getattr(importlib.import_module(module), function)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "nproc", 1) > 1 and not distributed.launched():
            return distributed.launch(args.nproc, argv)  # re-runs these arguments under torchrun
        return args.func(args) or 0
    except (ValueError, FileNotFoundError, NotADirectoryError) as err:
        print(f"algm-bench {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
