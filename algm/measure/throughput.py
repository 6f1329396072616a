"""Throughput (images/s), one protocol for every method (SPEC section 4).

no_grad + eval, warm-up, the device synchronised around every timed forward (CUDA
events on GPU, ``perf_counter`` on CPU), whole model including decoder and restore.
images/s = batch / mean latency; the spread across repeats is kept, since CPU timings
here vary a lot between runs.
"""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ThroughputResult:
    """Latencies are per batch in seconds; rates are images per second."""

    images_per_s: float
    median_images_per_s: float
    std_images_per_s: float
    min_latency_s: float
    max_latency_s: float
    batch_size: int
    repeats: int
    warmup: int
    device: str
    precision: str

    def to_dict(self) -> dict:
        return asdict(self)


def autocast_context(device: torch.device, precision: str):
    """fp32 -> no autocast; 'bf16' / 'fp16' -> torch.autocast on the model's device."""
    if precision == "fp32":
        return nullcontext()
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    return torch.autocast(device_type=device.type, dtype=dtypes[precision])


def _timed(model: nn.Module, batch: Tensor, device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        model(batch)
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    model(batch)
    return time.perf_counter() - t0


def measure_throughput(model: nn.Module, batch: Tensor, warmup: int = 5, repeats: int = 10,
                       precision: str = "fp32") -> ThroughputResult:
    """Time ``model(batch)``; batch: (B, 3, H, W) already on the model's device."""
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got {warmup}, {repeats}")
    device = batch.device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast_context(device, precision):
            for _ in range(warmup):
                model(batch)
            latencies = [_timed(model, batch, device) for _ in range(repeats)]
    finally:
        model.train(was_training)
    b = batch.shape[0]
    rates = [b / t for t in latencies]
    return ThroughputResult(
        images_per_s=b / statistics.fmean(latencies),
        median_images_per_s=statistics.median(rates),
        std_images_per_s=statistics.stdev(rates) if len(rates) > 1 else 0.0,
        min_latency_s=min(latencies),
        max_latency_s=max(latencies),
        batch_size=b,
        repeats=repeats,
        warmup=warmup,
        device=str(device),
        precision=precision,
    )
