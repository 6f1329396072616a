"""``algm-bench parts``: the trained parts the package ships (:mod:`algm.shipped`), and
``--verify``, which retrains each from scratch and compares (:func:`suites.shipped_parts.verify`)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from algm.commands.common import DATA_ROOT_HELP


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "parts",
        description="List the trained parts shipped with the package (heads and method networks of "
                    "the default suite, so that its first report needs no training), with their "
                    "sha256 and the rows that use them. --verify retrains every one in an empty "
                    "cache and compares: tensors, and the mIoU of the row that uses it (shipped vs "
                    "retrained). Exit status 1 if a part does not reproduce.")
    p.add_argument("--verify", action="store_true", help="retrain every shipped part and compare (about 25 "
                                                         "min on a 2-core CPU)")
    p.add_argument("--work", default=None,
                   help="folder of the verification's two caches and verify.json "
                        "(default: $ALGM_BENCH_CACHE/verify-parts); a rerun resumes there")
    p.add_argument("--tolerance", type=float, default=0.5,
                   help="largest mIoU difference, in points, of a part that reproduces (default 0.5)")
    p.add_argument("--data-root", default=None, help=DATA_ROOT_HELP)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from algm import shipped

    manifest = shipped.manifest()
    if not args.verify:
        print(f"{len(manifest['parts'])} part(s) shipped in {shipped.SHIPPED_DIR} "
              f"(suite {manifest.get('suite', '-')}):")
        for part in manifest["parts"]:
            print(f"  {part['path']}\n    {part['what']}; sha256 {part['sha256'][:16]}, "
                  f"{part['bytes'] / 1e6:.1f} MB; used by {_label(part['used_by'])}")
        return 0
    from algm.cache import cache_dir
    from suites.plan import RunOptions
    from suites.shipped_parts import verify

    work = Path(args.work) if args.work else cache_dir("verify-parts")
    results = verify(work, RunOptions(data_root=args.data_root, progress=not args.no_progress), args.tolerance)
    print(f"{'part':<48} {'row':<22} {'min':>5} {'max |dw|':>9} {'mIoU shipped':>13} {'retrained':>13}  reproduces")
    for r in results:
        print(f"{r['what'][:48]:<48} {r['row'][:22]:<22} {r['retrain_seconds'] / 60:>5.1f} "
              f"{r['max_abs_difference']:>9.2g} {_miou(r['miou_shipped']):>13} {_miou(r['miou_retrained']):>13}  "
              f"{'yes' if r['reproduces'] else 'NO'}")
    print(f"min: retraining time. mIoU in % of the row that uses the part: off-the-shelf / trained-with-method "
          f"head. A part reproduces "
          f"if its tensors are equal or its row's mIoU within {args.tolerance} points. Details: {work / 'verify.json'}")
    return 0 if all(r["reproduces"] for r in results) else 1


def _label(used_by: dict) -> str:
    options = ", ".join(f"{k}={v}" for k, v in sorted(used_by["options"].items()))
    return (f"{used_by['backbone']} {used_by['method']}" + (f"({options})" if options else "")
            + (" with its trained head" if used_by["train"] else ""))


def _miou(figures: dict) -> str:
    return "/".join("-" if math.isnan(figures[k]) else f"{figures[k]:.2f}" for k in ("miou", "miou_trained"))
