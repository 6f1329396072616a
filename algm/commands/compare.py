"""``algm-bench compare``: several methods on one model, one table.

``--methods none,algm,tome:r=16,mpm`` names method specs: a method and its options,
``name:key=value:key=value`` (a list value keeps its commas: ``algm:layers=1,5``; a flag
is ``key`` alone, ``key=false`` turns it off). Each spec's options are parsed by the
method's own command-line options, so values, choices and errors are those of
``--method name --key value``. Every spec shares the encoder and decoder weights.

Per spec: GFLOPs per image (:func:`~algm.commands.common.gflops_per_image`) and its
change against ``none`` in percent, ``100 * (gflops / gflops_none - 1)``; the speed-up at
each batch size, ``images_per_s / images_per_s_none`` from one
:func:`~algm.measure.throughput.measure_interleaved` run of every model on the same batch
(each repeat times every model once in turn, so a machine that slows down slows all
alike); with ``--miou`` the mIoU in percent and its change in points,
``miou - miou_none``, with the off-the-shelf head (``none``'s) for every method, as
``eval`` does.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
from dataclasses import dataclass, field

from algm.commands.common import (add_data_arguments, add_model_arguments, check_data, comma_list, device,
                                  gflops_per_image, has_weights, no_head_message, positive_int, setup_from_args,
                                  setup_with_decoder)
from algm.methods import add_method_options, method_class


@dataclass(frozen=True)
class MethodSpec:
    """One column of the comparison: ``text`` as given, the method ``name`` and its
    parsed ``options`` (Config field -> value)."""

    text: str
    name: str
    options: dict = field(default_factory=dict)


class _SpecParser(argparse.ArgumentParser):
    """A method's own options, parsed from a spec; errors are raised, not printed."""

    def error(self, message: str):
        raise argparse.ArgumentTypeError(message)


def parse_spec(text: str) -> MethodSpec:
    """``"tome:r=16"`` -> MethodSpec("tome:r=16", "tome", {"r": 16}); argparse.ArgumentTypeError
    (one line) for an unknown method, option or value."""
    name, *pairs = text.strip().split(":")
    try:
        method_class(name)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    parser = _SpecParser(prog=name, add_help=False)
    add_method_options(parser, name)
    actions = {a.dest: a for a in parser._actions}
    argv = []
    for pair in pairs:
        key, equals, value = pair.partition("=")
        action = actions.get(key.strip().replace("-", "_"))
        if action is None:
            valid = ", ".join(actions) or "none"
            raise argparse.ArgumentTypeError(f"{text}: method {name!r} has no option {key!r}; its options: {valid}")
        flag = action.option_strings[0]
        if action.nargs == 0:  # a flag: key, key=true or key=false
            if value.lower() not in ("", "true", "false"):
                raise argparse.ArgumentTypeError(f"{text}: {key} is a flag: give {key}, {key}=true or {key}=false")
            off = value.lower() == "false"
            negative = next((s for s in action.option_strings if s.startswith("--no-")), None)
            argv += [negative] if off and negative else [] if off else [flag]
        elif not equals:
            raise argparse.ArgumentTypeError(f"{text}: {key} takes a value: give {key}=VALUE")
        else:
            argv += [flag, *(value.split() if action.nargs in ("+", "*") else [value])]
    try:
        parsed = parser.parse_args(argv)
    except argparse.ArgumentTypeError as err:
        raise argparse.ArgumentTypeError(f"{text}: {err}") from None
    return MethodSpec(text.strip(), name, {k: v for k, v in vars(parsed).items() if v is not None})


def method_specs(text: str) -> list[MethodSpec]:
    """argparse type of ``--methods``: comma-separated specs. A comma followed by
    something that cannot start a method name (a digit, a sign, a dot) continues the
    previous spec's value (``algm:layers=1,5``)."""
    pieces = []
    for piece in text.split(","):
        if pieces and re.match(r"[\d.+-]", piece.strip() or "0"):
            pieces[-1] += "," + piece
        elif piece.strip():
            pieces.append(piece)
    if not pieces:
        raise argparse.ArgumentTypeError(f"expected comma-separated method specs (name:key=value:...), got {text!r}")
    return [parse_spec(p) for p in pieces]


def batch_sizes(text: str) -> list[int]:
    """argparse type of ``--batch-sizes``: ``"1,4"`` -> [1, 4]."""
    try:
        return [positive_int(p) for p in comma_list(text)]
    except argparse.ArgumentTypeError as err:
        raise argparse.ArgumentTypeError(f"expected batch sizes like 1,4: {err}") from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        description="Compare token-reduction methods on one model in one run: per method spec "
                    "(name:key=value:key=value, a list value keeping its commas: layers=1,5) the GFLOPs "
                    "per image and their change against none (%), the speed-up over none at each "
                    "batch size from one interleaved timing of every model on the same batch "
                    "(each repeat times every model in turn), and with --miou the mIoU (off-the-shelf "
                    "head, as eval) and its change in points. Every spec shares the weights. "
                    "GFLOPs of methods that adapt to the image are averaged over --limit frames.",
    )
    p.add_argument("--methods", type=method_specs, required=True,
                   help="comma-separated method specs name[:key=value...], e.g. none,M1,M2:key=value "
                        "(none is added first if missing; docs/cli.md)")
    add_model_arguments(p, methods=False)
    add_data_arguments(p)
    p.add_argument("--head", default=None, help="head.pt written by `algm-bench train-head` (for --miou)")
    p.add_argument("--batch-sizes", type=batch_sizes, default=[1], help="timed batch sizes (default: 1)")
    p.add_argument("--warmup", type=int, default=3, help="untimed forwards of each model first (default: 3)")
    p.add_argument("--repeats", type=positive_int, default=10,
                   help="timed forwards of each model, interleaved (default: 10)")
    p.add_argument("--device", type=device, default="auto",
                   help="torch device for timing and mIoU (default: cuda if available, else cpu)")
    p.add_argument("--miou", action="store_true",
                   help="also the mIoU on --split (--limit images), with the off-the-shelf head, "
                        "a --head or the --checkpoint's decoder")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print one JSON object")
    out.add_argument("--csv", action="store_true", help="print CSV, one row per method spec")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from algm.data.windows import covering_stride
    from algm.evaluate import evaluate
    from algm.measure.throughput import CONTENDED_BELOW, measure_interleaved
    from algm.methods import build_method, required_training

    specs = args.methods if any(s.text == "none" for s in args.methods) else [MethodSpec("none", "none")] + args.methods
    specs = sorted(specs, key=lambda s: s.text != "none")  # the baseline first: deltas are against it
    say = (lambda line: None) if args.quiet or args.json or args.csv else (
        lambda line: print(f"algm-bench compare: {line}", file=sys.stderr, flush=True))
    flops_limit = args.limit if args.limit is not None else 20
    check_data(args, args.split)  # every file of the split, before the model
    say("building the model")
    if args.miou:
        base = setup_with_decoder(args, method="none")
        if base is None:
            raise FileNotFoundError(no_head_message(setup_from_args(args, method="none"), args.decoder))
    else:
        base = setup_from_args(args, method="none", pretrained=has_weights(args.backbone))
    for spec in specs:
        if required_training(spec.name, base.backbone, base.dataset, **spec.options):
            raise ValueError(f"{spec.text} needs parts trained first: algm-bench train --method {spec.name} "
                             f"--backbone {base.backbone.name} --dataset {base.dataset.name}")
    models = [base.model.with_method(build_method(s.name, base.backbone, base.dataset, **s.options)).eval()
              for s in specs]
    rows = [{"method": s.text, "name": s.name, "options": _plain(s.options),
             "settings": _plain(m.method.settings())} for s, m in zip(specs, models)]

    for spec, model, row in zip(specs, models, rows):
        say(f"GFLOPs of {spec.text}" + (f" over {flops_limit} frames" if spec.name != "none" else ""))
        windows = base.split_windows(args.split, flops_limit, args.data_root) if spec.name != "none" else None
        per_image = gflops_per_image(model, base.window, windows)
        row["gflops"] = sum(per_image) / len(per_image)

    dev = torch.device(args.device)
    for b in args.batch_sizes:
        say(f"timing {len(models)} models interleaved at batch {b} ({args.repeats} repeats each)")
        batch = base.batch(args.split, b, "mixed", args.data_root).to(dev)
        results = measure_interleaved([m.to(dev) for m in models], batch, args.warmup, args.repeats)
        for row, result in zip(rows, results):
            row[f"images_per_s_b{b}"] = result.images_per_s
            row[f"contended_b{b}"] = (result.cpu_utilisation is not None
                                      and result.cpu_utilisation < CONTENDED_BELOW)

    if args.miou:
        from algm.data.datasets import build_dataset

        dataset = build_dataset(base.dataset.name, args.split, root=args.data_root, limit=args.limit)
        stride, _ = covering_stride(base.window, base.stride)
        for spec, model, row in zip(specs, models, rows):
            say(f"mIoU of {spec.text} on {len(dataset)} {args.split} images")
            row["miou_pct"] = evaluate(model.to(dev), dataset, base.window, stride,
                                       backbone_cfg=base.backbone, progress=False).miou

    add_deltas(rows, args.batch_sizes)
    result = {"backbone": base.backbone.name, "dataset": base.dataset.name, "split": args.split,
              "window": list(base.window), "device": str(dev), "batch_sizes": args.batch_sizes,
              "warmup": args.warmup, "repeats": args.repeats, "weights": base.weights.describe(), "rows": rows}
    if args.json:
        print(json.dumps(result))
    elif args.csv:
        print(to_csv(rows), end="")
    else:
        print("\n".join(table_lines(result)))
    return 0


def add_deltas(rows: list[dict], batch_sizes: list[int]) -> None:
    """Against the first row (none): ``gflops_delta_pct``, ``speedup_bN`` and, where
    measured, ``miou_delta_pp`` (points)."""
    base = rows[0]
    for row in rows:
        row["gflops_delta_pct"] = 100 * (row["gflops"] / base["gflops"] - 1)
        for b in batch_sizes:
            row[f"speedup_b{b}"] = row[f"images_per_s_b{b}"] / base[f"images_per_s_b{b}"]
        if "miou_pct" in row:
            row["miou_delta_pp"] = row["miou_pct"] - base["miou_pct"]


def table_lines(result: dict) -> list[str]:
    """The compact table: method | GFLOPs (Δ%) | speed-up per batch size | mIoU (Δ)."""
    rows, sizes = result["rows"], result["batch_sizes"]
    head = ["method", "GFLOPs (Δ%)"] + [f"speed-up b{b}" for b in sizes] + (["mIoU (Δ)"] if "miou_pct" in rows[0] else [])
    body = []
    for row in rows:
        cells = [row["method"], f"{row['gflops']:.2f} ({row['gflops_delta_pct']:+.1f})"]
        cells += [f"{row[f'speedup_b{b}']:.3f}" + ("*" if row[f"contended_b{b}"] else "") for b in sizes]
        if "miou_pct" in row:
            cells.append(f"{row['miou_pct']:.2f} ({row['miou_delta_pp']:+.2f})")
        body.append(cells)
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    lines = [f"{result['backbone']} / {result['dataset']} {result['split']} at "
             f"{result['window'][0]}x{result['window'][1]} on {result['device']} ({result['weights']}); "
             f"speed-up: images/s over none's, all models timed interleaved"]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
              for r in [head] + body]
    if any(row[f"contended_b{b}"] for row in rows for b in sizes):
        lines.append("* other processes competed for the cores during this timing")
    return lines


def to_csv(rows: list[dict]) -> str:
    """One line per method spec; options and settings as JSON."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in row.items()})
    return out.getvalue()


def _plain(options: dict) -> dict:
    """JSON-ready: tuples become lists."""
    return json.loads(json.dumps(options, default=list))
