"""``algm-bench``: measure token reduction in ViT segmenters.

Every subcommand has ``--help``. Errors in user input (unknown names, bad sizes,
missing data) print one line and exit with status 2; nothing is written.
"""

from __future__ import annotations

import argparse
import sys

from algm import distributed, shadowing
from algm.methods import add_method_options, chosen_method, option_owners
from algm.commands import bench, fetch, finetune, flops, predict, throughput, train, train_head
from algm.commands import eval as eval_command  # (not the builtin)

# Each module's register(sub) adds its subcommand(s) to the parser.
COMMANDS = (flops, throughput, eval_command, bench, predict, train_head, train, finetune, fetch)


class Parser(argparse.ArgumentParser):
    """Usage errors in one line (``--help`` shows the usage), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}{_method_hint(message)} (see {self.prog} --help)\n")


def _method_hint(message: str) -> str:
    """For an unrecognised option that belongs to a method: which one, since only the
    ``--method`` chosen on the command line has its options."""
    if not message.startswith("unrecognized arguments:"):
        return ""
    owned = {flag: option_owners(flag) for flag in message.split()[2:] if flag.startswith("--")}
    hints = [f"{flag.split('=')[0]} is an option of {', '.join(owners)}" for flag, owners in owned.items() if owners]
    return f"; {'; '.join(hints)} (choose it with --method)" if hints else ""


def build_parser(argv: list[str] = ()) -> argparse.ArgumentParser:
    """The whole parser; every command that takes ``--method`` also gets the options of
    the method ``argv`` chooses (and no other method's)."""
    parser = Parser(
        prog="algm-bench",
        description="Benchmark token reduction methods in ViT segmenters: "
                    "GFLOPs, images/s and mIoU under one protocol.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    method = chosen_method(list(argv)) or "none"
    for command_parser in sub.choices.values():
        if command_parser.get_default("method") is not None:
            add_method_options(command_parser, method)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:  # first: before any command imports suites or baselines
        shadowing.guard()
    except ImportError as err:
        print(f"algm-bench: error: {err}", file=sys.stderr)
        return 2
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
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
