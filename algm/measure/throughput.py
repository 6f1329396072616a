"""Throughput (images/s), one protocol for every method (SPEC section 4).

no_grad + eval, warm-up, the device synchronised around every timed forward (CUDA
events on GPU, ``perf_counter`` on CPU), whole model including decoder and restore.
images/s = batch / mean latency; the spread across repeats is kept, since CPU timings
here vary a lot between runs. On CPU the result also says how busy this process kept
its intra-op threads during the timed forwards (``cpu_utilisation``: process CPU time
over wall time x threads): well below 1, other processes competed for the cores and the
figure understates the method's speed. Freed host memory stays in the process while CPU
forwards are timed (:mod:`algm.measure.allocator`), as GPU memory does in the CUDA
caching allocator, so no timed forward pays page faults for its large tensors.

On CUDA the numeric settings are explicit and recorded with the result: ``precision``
(fp32, or autocast to bf16 / fp16), ``tf32`` (TF32 for the fp32 matmuls and convolutions;
off unless asked, although PyTorch's own default allows it for cuDNN convolutions),
``cudnn_benchmark`` (cuDNN autotuning, done during the warm-up), ``compile``
(``torch.compile`` of the whole model, compiled during the warm-up), and the peak GPU
memory allocated during the timed forwards.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from algm.measure.allocator import freed_memory_kept
from algm.precision import autocast_context


# cpu_utilisation below this: the timing competed with other processes.
CONTENDED_BELOW = 0.8


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
    tf32: bool = False
    cudnn_benchmark: bool = False
    compile: bool = False
    peak_memory_mib: float | None = None  # CUDA only: peak allocated during the timed forwards
    cpu_utilisation: float | None = None  # CPU only: process CPU time / (wall time x threads)

    def to_dict(self) -> dict:
        return asdict(self)


@contextmanager
def cuda_settings(device: torch.device, tf32: bool, cudnn_benchmark: bool):
    """Set TF32 (matmul and cuDNN) and cuDNN autotuning for the measurement, then restore them.
    Both are CUDA settings: asking for them on another device is an error."""
    if device.type != "cuda":
        if tf32 or cudnn_benchmark:
            raise ValueError(f"tf32 and cudnn_benchmark are CUDA settings; the device is {device}")
        yield
        return
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark
    matmul.allow_tf32 = cudnn.allow_tf32 = tf32
    cudnn.benchmark = cudnn_benchmark
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark = saved


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
                       precision: str = "fp32", *, tf32: bool = False, cudnn_benchmark: bool = False,
                       compile: bool = False) -> ThroughputResult:
    """Time ``model(batch)``; batch: (B, 3, H, W) already on the model's device.

    ``tf32``, ``cudnn_benchmark`` (CUDA only) and ``compile`` as in the module doc; with
    ``compile`` the warm-up (at least one forward) includes the compilation."""
    return measure_interleaved([model], batch, warmup, repeats, precision, tf32=tf32,
                               cudnn_benchmark=cudnn_benchmark, compile=compile)[0]


def measure_interleaved(models: Sequence[nn.Module], batch: Tensor, warmup: int = 5, repeats: int = 10,
                        precision: str = "fp32", *, tf32: bool = False, cudnn_benchmark: bool = False,
                        compile: bool = False) -> list[ThroughputResult]:
    """Time several models on the same batch, one result each, in the order given.

    After every model's warm-up, each repeat times every model once in turn, so a change
    in the machine's speed during the measurement (other tenants, clock frequency) slows
    all of them alike and their ratio (a method's speed-up over the baseline) stays fair.
    Options as in :func:`measure_throughput`.
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got {warmup}, {repeats}")
    if compile and warmup < 1:
        raise ValueError("compile needs a warm-up of at least one forward (it compiles there)")
    device = batch.device
    cuda = device.type == "cuda"
    was_training = [m.training for m in models]
    runs = []
    for m in models:
        m.eval()
        runs.append(torch.compile(m) if compile else m)
    latencies: list[list[float]] = [[] for _ in runs]
    cpu_seconds = [0.0] * len(runs)
    peaks = [0] * len(runs)
    try:
        with torch.no_grad(), cuda_settings(device, tf32, cudnn_benchmark), autocast_context(device, precision), \
                (nullcontext() if cuda else freed_memory_kept()):
            for run in runs:
                for _ in range(warmup):
                    run(batch)
            for _ in range(repeats):
                for i, run in enumerate(runs):
                    if cuda:
                        torch.cuda.synchronize(device)
                        torch.cuda.reset_peak_memory_stats(device)
                    cpu_start = time.process_time()
                    latencies[i].append(_timed(run, batch, device))
                    cpu_seconds[i] += time.process_time() - cpu_start
                    if cuda:
                        peaks[i] = max(peaks[i], torch.cuda.max_memory_allocated(device))
    finally:
        for m, training in zip(models, was_training):
            m.train(training)
    b = batch.shape[0]
    results = []
    for times, cpu, peak in zip(latencies, cpu_seconds, peaks):
        rates = [b / t for t in times]
        results.append(ThroughputResult(
            images_per_s=b / statistics.fmean(times),
            median_images_per_s=statistics.median(rates),
            std_images_per_s=statistics.stdev(rates) if len(rates) > 1 else 0.0,
            min_latency_s=min(times),
            max_latency_s=max(times),
            batch_size=b,
            repeats=repeats,
            warmup=warmup,
            device=str(device),
            precision=precision,
            tf32=tf32,
            cudnn_benchmark=cudnn_benchmark,
            compile=compile,
            peak_memory_mib=peak / 2**20 if cuda else None,
            cpu_utilisation=None if cuda else cpu / (sum(times) * torch.get_num_threads()),
        ))
    return results
