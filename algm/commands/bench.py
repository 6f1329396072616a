"""``algm-bench bench``: run a suite and write its reports under ``results/<suite>/``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from algm import atomic, distributed
from algm.commands.common import add_nproc_argument, device, has_weights
from algm.fetch import CHECKPOINTS_ENV, checkpoints_dir

REPO_RESULTS = Path(__file__).resolve().parents[2] / "results"


def check_writable(out: Path) -> None:
    """Fail now if ``out`` cannot be created or written (nothing is left behind)."""
    parent = next(p for p in (out, *out.parents) if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {out}: {parent} is not a writable folder")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="run a benchmark suite and write CSV, tables and plots",
        description="Run every row of a suite (suites/<dataset>.yaml): GFLOPs, images/s, mIoU "
                    "(off-the-shelf and trained-with-method heads) and tokens kept. Finished "
                    "rows are cached by their full config, so a killed run resumes.",
    )
    p.add_argument("--dataset", default="camvid",
                   help="suite name (suites/<name>.yaml) or a path to a suite YAML (default: camvid)")
    p.add_argument("--data-root", default=None,
                   help="dataset root (default: $DATA_ROOT; CamVid: ../shared/data/camvid)")
    p.add_argument("--flops-only", action="store_true",
                   help="only GFLOPs (random weights for the baseline; methods that adapt to "
                        "the image also need the data)")
    p.add_argument("--checkpoints", default=None,
                   help="official checkpoints as DIR/<dataset>/<backbone>/<method>/{checkpoint.pth,"
                        "variant.yml} (the layout `algm-bench fetch` writes): none/ is the baseline "
                        "every method is applied to, <method>/ a model trained with that method "
                        f"(default: ${CHECKPOINTS_ENV}, else the cache's checkpoints/)")
    p.add_argument("--backbones", default=None, type=lambda t: tuple(b for b in t.split(",") if b),
                   help="only these backbones of the suite, e.g. vit-s16,vit-b16")
    p.add_argument("--device", type=device, default="cpu", help="device for throughput (default: cpu)")
    add_nproc_argument(p)
    p.add_argument("--out", default=None, help="output folder (default: results/<suite>)")
    p.add_argument("--fresh", action="store_true", help="recompute every row even if cached")
    p.add_argument("--fresh-method", action="append", default=[], metavar="METHOD",
                   help="recompute the rows of this method only (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from suites.definition import load_suite
    from suites.report import publish, staging_dir, write_reports
    from suites.plan import RunOptions
    from suites.runner import run_suite, write_machine

    suite = load_suite(args.dataset)
    unknown = sorted(set(args.fresh_method) - {s.method for s in suite.settings})
    if unknown:
        raise ValueError(f"--fresh-method {unknown[0]}: suite {suite.name} has no such method; its methods: "
                         f"{', '.join(dict.fromkeys(s.method for s in suite.settings))}")
    distributed.init()
    if args.checkpoints and not Path(args.checkpoints).is_dir():
        raise NotADirectoryError(f"--checkpoints {args.checkpoints}: no such folder (expected "
                                 f"<dir>/{suite.dataset}/<backbone>/<method>/checkpoint.pth)")
    checkpoints = checkpoints_dir(args.checkpoints)
    out = Path(args.out) if args.out else REPO_RESULTS / suite.name
    check_writable(out)  # before hours of measuring, not after
    opts = RunOptions(data_root=args.data_root, flops_only=args.flops_only, device=args.device,
                      fresh=args.fresh, fresh_methods=tuple(args.fresh_method),
                      progress=not args.no_progress, checkpoints=str(checkpoints),
                      backbones=args.backbones)
    rows = run_suite(suite, opts)
    if not distributed.is_main():
        return 0
    title = f"{suite.name}: {suite.dataset} {suite.split}" + (" (GFLOPs only)" if args.flops_only else "")
    with staging_dir(out) as staging:  # the whole report set, or the old one stays
        write_reports(rows, staging, suite.published, title)
        if suite.gallery and not args.flops_only:
            write_suite_gallery(suite, staging, args.data_root)
        write_machine(staging, opts)
        written = publish(staging, out)
    for path in written:
        print(path)
    return 0


def write_suite_gallery(suite, out: Path, data_root: str | None) -> Path:
    """Token maps of every method of the suite (default settings) on the fixed CamVid
    frames, linked from table.md."""
    from algm.pictures.gallery import gallery_frames, method_variants, write_gallery
    from suites.definition import Setting
    from suites.measure import setup_for

    backbone = suite.backbones[0]
    base = setup_for(suite, backbone, Setting("none"), pretrained=has_weights(backbone))
    methods = list(dict.fromkeys(s.method for s in suite.settings))
    models = method_variants(base.model, base.backbone, base.dataset, methods)
    path = write_gallery(models, gallery_frames(root=data_root), out / "gallery.png", window=base.window)
    table = out / "table.md"
    atomic.write_text(table, table.read_text() + (
        f"\n## Token maps\n\nEach method at its default setting on fixed {suite.dataset} "
        f"{suite.split} frames ({backbone}):\n\n![token maps](gallery.png)\n"))
    return path
