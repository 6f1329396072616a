"""``algm-bench bench``: run a suite and write its reports under ``results/<suite>/``."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from algm import distributed
from algm.commands.common import add_nproc_argument, has_weights

REPO_RESULTS = Path(__file__).resolve().parents[2] / "results"


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
    p.add_argument("--device", default="cpu", help="device for throughput (default: cpu)")
    add_nproc_argument(p)
    p.add_argument("--out", default=None, help="output folder (default: results/<suite>)")
    p.add_argument("--fresh", action="store_true", help="recompute rows even if cached")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from suites.definition import load_suite
    from suites.report import write_reports
    from suites.runner import RunOptions, run_suite, write_machine

    suite = load_suite(args.dataset)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available on this machine")
    distributed.init()
    opts = RunOptions(data_root=args.data_root, flops_only=args.flops_only, device=args.device,
                      fresh=args.fresh, progress=not args.no_progress)
    rows = run_suite(suite, opts)
    if not distributed.is_main():
        return 0
    out = Path(args.out) if args.out else REPO_RESULTS / suite.name
    title = f"{suite.name}: {suite.dataset} {suite.split}" + (" (GFLOPs only)" if args.flops_only else "")
    written = write_reports(rows, out, suite.published_flops, title)
    if suite.gallery and not args.flops_only:
        written.append(write_suite_gallery(suite, out, args.data_root))
    write_machine(out, opts)
    for path in written + [out / "machine.json"]:
        print(path)
    return 0


def write_suite_gallery(suite, out: Path, data_root: str | None) -> Path:
    """Token maps of every method of the suite (default settings) on the fixed CamVid
    frames, linked from table.md."""
    from algm.visualize import gallery_frames, method_variants, write_gallery
    from suites.definition import Setting
    from suites.runner import _setup

    backbone = suite.backbones[0]
    base = _setup(suite, backbone, Setting("none"), pretrained=has_weights(backbone))
    methods = list(dict.fromkeys(s.method for s in suite.settings))
    models = method_variants(base.model, base.backbone, base.dataset, methods)
    path = write_gallery(models, gallery_frames(root=data_root), out / "gallery.png", window=base.window)
    with open(out / "table.md", "a") as table:
        table.write(f"\n## Token maps\n\nEach method at its default setting on fixed {suite.dataset} "
                    f"{suite.split} frames ({backbone}):\n\n![token maps](gallery.png)\n")
    return path
