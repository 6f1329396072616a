"""``algm-bench fetch``: download the public checkpoints (and data) of a dataset."""

from __future__ import annotations

import argparse
from pathlib import Path

from algm.commands.common import comma_list
from algm.config import DATASETS

# The suites package sits beside algm (installed or in a checkout); found by path, not by
# importing ``suites``, which a folder of that name in the working directory could shadow.
DEFAULT_MANIFEST = Path(__file__).resolve().parents[2] / "suites" / "zoo.yaml"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fetch",
        description="Download a dataset's public checkpoints (suites/zoo.yaml) into "
                    "<checkpoints>/<dataset>/<backbone>/<method>/{checkpoint.pth,variant.yml} "
                    "(method 'none': the Segmenter baseline) and, with --data, the data set into "
                    "the data root, the root the other commands read (CamVid: the SegNet "
                    "tutorial's copy, converted into our layout there). Partial downloads resume; "
                    "each file is checked against the manifest's checksum, else against the sha256 "
                    "pinned on its first download in <root>/zoo.lock.json, and CamVid's labels "
                    "against suites/camvid-labels.sha256. Files already in place are checked, not "
                    "fetched.",
    )
    p.add_argument("--dataset", required=True, choices=list(DATASETS), help="dataset of the checkpoints")
    p.add_argument("--backbones", type=comma_list, default=None,
                   help="only these backbones, e.g. vit-s16,vit-b16 (default: all in the manifest)")
    p.add_argument("--data", action="store_true", help="also download and extract the data set")
    p.add_argument("--checkpoints", default=None,
                   help="checkpoints root (default: $ALGM_BENCH_CHECKPOINTS, else "
                        "$ALGM_BENCH_CACHE/checkpoints)")
    p.add_argument("--data-root", default=None,
                   help="data root for --data (default: where the other commands read it: $DATA_ROOT, else "
                        "$ALGM_BENCH_DATA/<dataset>)")
    p.add_argument("--manifest", default=str(DEFAULT_MANIFEST),
                   help="manifest YAML; its URLs may be local files downloaded by hand "
                        "(default: suites/zoo.yaml)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from algm.fetch import fetch

    fetched = fetch(args.dataset, args.manifest, backbones=args.backbones, data=args.data,
                    checkpoints_root=args.checkpoints, data_root=args.data_root,
                    progress=not args.no_progress)
    for item in fetched:
        digest = f"sha256 {item.sha256[:12]}" if item.sha256 else ""
        print(f"{item.status:<10} {item.path}  {digest}".rstrip())
    return 0
