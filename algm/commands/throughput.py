"""``algm-bench throughput``: images/s under the shared timing protocol."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from algm.commands.common import (add_data_arguments, add_model_arguments, check_data, device, emit, has_weights,
                                  setup_from_args)

if TYPE_CHECKING:
    from algm.measure.breakdown import Breakdown


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "throughput",
        description="Time whole forwards (encoder, decoder, restore, upsample) under no_grad/eval "
                    "after a warm-up, synchronising the device around each timed forward. "
                    "images/s = batch / mean latency; median and spread are reported too.",
    )
    add_model_arguments(p)
    add_data_arguments(p)
    p.add_argument("--batch-size", type=int, default=1, help="images per forward (default: 1)")
    p.add_argument("--batch-kind", default="mixed", choices=["mixed", "repeated"],
                   help="mixed: distinct frames of the split; repeated: one frame repeated "
                        "(the authors' protocol, every copy merges alike) (default: mixed)")
    p.add_argument("--device", type=device, default="auto",
                   help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="fp32 (default) or autocast to bf16 / fp16")
    p.add_argument("--amp", action="store_true",
                   help="shorthand for --precision fp16 on CUDA, bf16 on CPU")
    p.add_argument("--tf32", action="store_true",
                   help="CUDA: allow TF32 for fp32 matmuls and convolutions (default: off, IEEE fp32)")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="CUDA: cuDNN autotuning (torch.backends.cudnn.benchmark) during the warm-up")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the whole model; it compiles during the warm-up")
    p.add_argument("--warmup", type=int, default=5, help="untimed forwards first (default: 5)")
    p.add_argument("--repeats", type=int, default=10, help="timed forwards (default: 10)")
    p.add_argument("--breakdown", action="store_true",
                   help="also time each stage of the forward (patch embed, block groups, the method's "
                        "steps, decoder, restore, upsample) and print its share (algm.measure.breakdown)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from algm.measure.breakdown import measure_breakdown
    from algm.measure.flops import count_flops
    from algm.measure.throughput import CONTENDED_BELOW, measure_throughput

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.breakdown and args.compile:
        raise ValueError("--breakdown times the eager forward stage by stage; drop --compile")
    device = torch.device(args.device)
    precision = args.precision
    if args.amp:
        precision = "fp16" if device.type == "cuda" else "bf16"
    check_data(args, args.split)
    setup = setup_from_args(args, pretrained=has_weights(args.backbone))
    batch = setup.batch(args.split, args.batch_size, args.batch_kind, args.data_root)
    # an adaptive method's GFLOPs depend on the frames: these are the timed batch's own
    gflops = count_flops(setup.model, batch) / batch.shape[0]
    batch = batch.to(device)
    backbone, dataset = setup.backbone.name, setup.dataset.name
    source = f"{dataset}/{args.split}"
    model = setup.model.to(device)
    settings = dict(tf32=args.tf32, cudnn_benchmark=args.cudnn_benchmark)
    result = measure_throughput(model, batch, args.warmup, args.repeats, precision,
                                compile=args.compile, **settings)
    stages = (measure_breakdown(model, batch, args.warmup, args.repeats, precision, **settings)
              if args.breakdown else None)
    out = {
        **result.to_dict(),
        "backbone": backbone, "dataset": dataset, "method": args.method,
        "settings": setup.model.method.settings(), "crop": list(setup.window),
        "batch_kind": args.batch_kind, "images": source, "threads": torch.get_num_threads(),
        "gflops": gflops,
    }
    if stages is not None:
        out["breakdown"] = stages.to_dict()
    emit(out, args.json, [
        f"{backbone} / {dataset} / {args.method}, batch {args.batch_size} "
        f"({args.batch_kind}, {source}), {precision}{' +tf32' * args.tf32}"
        f"{' +cudnn.benchmark' * args.cudnn_benchmark}{' compiled' * args.compile} on {device}:",
        f"  {result.images_per_s:.2f} images/s (median {result.median_images_per_s:.2f}, "
        f"std {result.std_images_per_s:.2f}, latency {result.min_latency_s * 1e3:.1f}-"
        f"{result.max_latency_s * 1e3:.1f} ms over {result.repeats} runs)",
        f"  {gflops:.2f} GFLOPs per image of this batch",
    ] + ([f"  peak GPU memory {result.peak_memory_mib:.0f} MiB"] if result.peak_memory_mib is not None else [])
      + ([f"  CPU utilisation {result.cpu_utilisation:.2f} of {torch.get_num_threads()} threads"
          + (" (other processes competed for the cores)" if result.cpu_utilisation < CONTENDED_BELOW else "")]
         if result.cpu_utilisation is not None else [])
      + (breakdown_lines(stages) if stages is not None else []))
    return 0


def breakdown_lines(result: Breakdown) -> list[str]:
    """One line per stage (median ms, share, kind), then the method's overhead share."""
    width = max(len(s.name) for s in result.stages)
    return ([f"  stages (median of {result.repeats} stepped forwards, {result.forward_s * 1e3:.1f} ms in all):"]
            + [f"    {s.name:<{width}}  {s.seconds * 1e3:9.2f} ms  {s.share * 100:5.1f} %  {s.kind}"
               for s in result.stages]
            + [f"  method overhead {result.overhead_share * 100:.1f} %, fixed stages "
               f"{result.fixed_share * 100:.1f} % of the forward"])
