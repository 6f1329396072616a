"""``algm-bench``: measure token reduction in ViT segmenters.

Every subcommand has ``--help``. Errors in user input (unknown names, bad sizes,
missing data) print one line and exit with status 2; nothing is written.

Parsing imports only the chosen command's module and, for ``--method M``, M's plugin:
``--help`` and usage errors answer without torch (the commands import it when they run;
``train-head`` and ``finetune`` read their defaults from the torch-free
:mod:`algm.training.defaults`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from algm import shadowing
from algm.methods import (PLUGINS_ENV, add_method_options, add_plugin_files, chosen_method, option_owners,
                          plugin_file, plugin_files)

# command -> (module under algm.commands whose register(sub) adds it, summary for --help)
COMMANDS = {
    "flops": ("flops", "count GFLOPs (fvcore, batch 1)"),
    "throughput": ("throughput", "measure images/s"),
    "compare": ("compare", "GFLOPs, interleaved speed-up and mIoU of several methods, one table"),
    "eval": ("eval", "mIoU with sliding-window inference"),
    "bench": ("bench", "run a benchmark suite and write CSV, tables and plots"),
    "predict": ("predict", "prediction, overlay and token-map pictures of images"),
    "compare-methods": ("predict", "none vs every method side by side on one image"),
    "train-head": ("train_head", "train the decoder on the frozen encoder (cached features), report mIoU"),
    "train": ("train", "train the parts a method needs besides the decoder (exit heads, a learned policy, ...)"),
    "parts": ("parts", "the trained parts shipped with the package; --verify retrains them and compares"),
    "finetune": ("finetune", "fine-tune encoder + decoder with a method active (official-format checkpoint)"),
    "fetch": ("fetch", "download the public Segmenter / ALGM checkpoints and the data set"),
}


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


def _chosen_command(argv: list[str]) -> str | None:
    """The subcommand of a command line: its first word (the top level has no option
    that takes a value), if it is one."""
    first = next((arg for arg in argv if not arg.startswith("-")), None)
    return first if first in COMMANDS else None


def build_parser(argv: list[str] = ()) -> argparse.ArgumentParser:
    """The parser of the command ``argv`` names; a command that takes ``--method`` also
    gets the options of the method ``argv`` chooses (and no other method's), after the
    ``--plugin`` files ``argv`` names are registered. When ``argv`` names no command
    (``--help``, a usage error) every command is listed by its summary, unimported."""
    argv = list(argv)
    parser = Parser(
        prog="algm-bench",
        description="Benchmark token reduction methods in ViT segmenters: "
                    "GFLOPs, images/s and mIoU under one protocol.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = _chosen_command(argv)
    if chosen is None:
        for name, (_, summary) in COMMANDS.items():
            sub.add_parser(name, help=summary)
        return parser
    importlib.import_module(f"algm.commands.{COMMANDS[chosen][0]}").register(sub)
    add_plugin_files(plugin_files(argv))
    method = chosen_method(argv)
    for command_parser in sub.choices.values():
        command_parser.add_argument(
            "--plugin", action="append", default=[], type=plugin_file, metavar="FILE.py",
            help=f"register the token-reduction methods this Python file defines (repeatable; "
                 f"also ${PLUGINS_ENV}, files separated by {os.pathsep!r})")
        if method is not None and command_parser.get_default("method") is not None:
            add_method_options(command_parser, method)  # (none, the default, has no options)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:  # first: before any command imports suites or baselines
        shadowing.guard()
    except ImportError as err:
        print(f"algm-bench: error: {err}", file=sys.stderr)
        return 2
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    from algm import distributed  # (imports torch)

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
