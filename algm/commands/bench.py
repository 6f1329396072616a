"""``algm-bench bench``: run a suite and write its report set (:func:`suites.report.run_and_report`)
under ``./results/<suite>/``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from algm.commands.common import DATA_ROOT_HELP, TRUSTED_WARNING, add_nproc_argument, device

if TYPE_CHECKING:
    from suites.definition import Suite


def check_writable(out: Path) -> None:
    """Fail now if ``out`` cannot be created or written (nothing is left behind)."""
    parent = next(p for p in (out, *out.parents) if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {out}: {parent} is not a writable folder")


def checked_mmseg_backbone(args: argparse.Namespace, suite: Suite) -> str | None:
    """The suite backbone of the ``--checkpoint`` / ``--mmseg-config`` pair (None without
    them), read from the config alone and checked against the suite's dataset and
    backbones and ``--backbones``: bad input fails before anything is converted or written."""
    from algm.build import checkpoint_facts

    if args.checkpoint is None and args.mmseg_config is None:
        return None
    if args.checkpoint is None or args.mmseg_config is None:
        raise ValueError("--mmseg-config CONFIG.py describes a --checkpoint FILE.pth: pass both "
                         "(official checkpoints: --checkpoints DIR)")
    if args.checkpoints:
        raise ValueError("give either --checkpoints DIR or --checkpoint with --mmseg-config, not both")
    backbone = checkpoint_facts(args.checkpoint, dataset=suite.dataset, mmseg_config=args.mmseg_config).backbone
    if backbone not in suite.backbones:
        raise ValueError(f"--checkpoint {args.checkpoint}: its backbone {backbone} is not in suite {suite.name} "
                         f"({', '.join(suite.backbones)})")
    if args.backbones and backbone not in args.backbones:
        raise ValueError(f"--backbones {','.join(args.backbones)} leaves out {backbone}, the --checkpoint's")
    return backbone


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        description="Run every row of a suite (suites/<dataset>.yaml): GFLOPs, images/s, mIoU "
                    "(off-the-shelf and trained-with-method heads) and tokens kept. Finished "
                    "rows are cached by their full config, so a killed run resumes.",
    )
    p.add_argument("--dataset", default="camvid",
                   help="suite name (suites/<name>.yaml) or a path to a suite YAML (default: camvid)")
    p.add_argument("--data-root", default=None, help=DATA_ROOT_HELP)
    p.add_argument("--flops-only", action="store_true",
                   help="only GFLOPs (random weights for the baseline; methods that adapt to "
                        "the image also need the data)")
    p.add_argument("--checkpoints", default=None,
                   help="official checkpoints as DIR/<dataset>/<backbone>/<method>/{checkpoint.pth,"
                        "variant.yml} (the layout `algm-bench fetch` writes): none/ is the baseline "
                        "every method is applied to, <method>/ a model trained with that method "
                        "(default: $ALGM_BENCH_CHECKPOINTS, else the cache's checkpoints/)")
    p.add_argument("--checkpoint", default=None, metavar="FILE.pth",
                   help="instead of --checkpoints: an mmsegmentation Segmenter checkpoint (with "
                        "--mmseg-config) as the none/ model of its backbone, converted once into the cache; "
                        "the suite is restricted to that backbone unless --backbones says otherwise")
    p.add_argument("--mmseg-config", default=None, metavar="CONFIG.py",
                   help="the --checkpoint's mmseg config, read without running it")
    p.add_argument("--trusted", action="store_true",
                   help="convert a --checkpoint whose metadata needs full unpickling (torch.load "
                        "weights_only=False RUNS CODE in the file: trusted files only)")
    p.add_argument("--backbones", default=None, type=lambda t: tuple(b for b in t.split(",") if b),
                   help="only these backbones of the suite, e.g. vit-s16,vit-b16")
    p.add_argument("--device", type=device, default="cpu", help="device for throughput (default: cpu)")
    add_nproc_argument(p)
    p.add_argument("--out", default=None,
                   help="output folder (default: results/<suite> under the current directory)")
    p.add_argument("--fresh", action="store_true", help="recompute every row even if cached")
    p.add_argument("--fresh-method", action="append", default=[], metavar="METHOD",
                   help="recompute the rows of this method only (repeatable)")
    p.add_argument("--untimed", action="store_true",
                   help="GFLOPs, mIoU and training now, no timing: a later run without it times "
                        "the cached rows (measure on a busy machine, time on a quiet one)")
    p.add_argument("--report-only", action="store_true",
                   help="measure nothing: write the report set from the suite's cached rows")
    p.add_argument("--update-reference", action="store_true",
                   help="allow writing into a folder holding a committed reference report (a REFERENCE file)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from algm import distributed
    from algm.fetch import checkpoints_dir
    from suites.definition import load_suite
    from suites.plan import RunOptions
    from suites.report import check_reference, run_and_report

    suite = load_suite(args.dataset)
    unknown = sorted(set(args.fresh_method) - {s.method for s in suite.settings})
    if unknown:
        raise ValueError(f"--fresh-method {unknown[0]}: suite {suite.name} has no such method; its methods: "
                         f"{', '.join(dict.fromkeys(s.method for s in suite.settings))}")
    out = Path(args.out) if args.out else Path.cwd() / "results" / suite.name
    check_reference(out, args.update_reference)  # before hours of measuring, not after
    mmseg_backbone = checked_mmseg_backbone(args, suite)
    distributed.init()
    if args.checkpoints and not Path(args.checkpoints).is_dir():
        raise NotADirectoryError(f"--checkpoints {args.checkpoints}: no such folder (expected "
                                 f"<dir>/{suite.dataset}/<backbone>/<method>/checkpoint.pth)")
    check_writable(out)
    backbones = args.backbones
    if mmseg_backbone is None:
        checkpoints = checkpoints_dir(args.checkpoints)
    else:
        from algm.weights.mmseg import converted_checkpoints

        if args.trusted:
            print(TRUSTED_WARNING, file=sys.stderr)
        checkpoints = distributed.broadcast_object(converted_checkpoints(
            args.mmseg_config, args.checkpoint, suite.dataset, args.trusted) if distributed.is_main() else None)
        backbones = backbones or (mmseg_backbone,)
    opts = RunOptions(data_root=args.data_root, flops_only=args.flops_only, device=args.device,
                      fresh=args.fresh, fresh_methods=tuple(args.fresh_method),
                      progress=not args.no_progress, checkpoints=str(checkpoints),
                      backbones=backbones, untimed=args.untimed)
    written = run_and_report(suite, opts, out, report_only=args.report_only,
                             update_reference=args.update_reference)
    for path in written or ():
        print(path)
    return 0
