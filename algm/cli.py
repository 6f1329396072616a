"""``algm-bench``: measure token reduction in ViT segmenters.

Every subcommand has ``--help``. Errors in user input (unknown names, bad sizes,
missing data) print one line and exit with status 2; nothing is written.
"""

from __future__ import annotations

import argparse
import sys

from algm import distributed
from algm.commands import (bench, fetch, finetune, flops, predict, throughput, train_head, train_policy,
                           train_prune_heads)
from algm.commands import eval as eval_command  # (not the builtin)

# Each module's register(sub) adds its subcommand(s) to the parser.
COMMANDS = (flops, throughput, eval_command, bench, predict, train_head, finetune, train_policy,
            train_prune_heads, fetch)


class Parser(argparse.ArgumentParser):
    """Usage errors in one line (``--help`` shows the usage), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="algm-bench",
        description="Benchmark token reduction (ALGM, ToMe, CTS, pruning) in ViT segmenters: "
                    "GFLOPs, images/s and mIoU under one protocol.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "nproc", 1) > 1 and not distributed.launched():
            return distributed.launch(args.nproc, argv)  # re-runs these arguments under torchrun
        return args.func(args) or 0
    except (ValueError, OSError) as err:  # FileNotFoundError, PermissionError, ... name the file
        print(f"algm-bench {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # finished rows and epochs are cached: rerunning resumes
        print(f"algm-bench {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
