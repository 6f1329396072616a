"""Timing of ALGM (pytest-benchmark; skipped unless run with ``--benchmark-enable`` or
``--benchmark-only``), and a one-shot summary when run as a script.

* the local and global stages alone on ViT-S-sized tensors (24 x 32 grid, D 384,
  B 1 and 8, both batch policies);
* the whole Segmenter forward, vit-s14 with random weights at CamVid's window
  (336 x 448), ``none`` against ``algm`` at batch 1 and 8. Inputs are CamVid val
  frames when the data is there (random weights still merge flat regions such as
  sky and road), else smooth synthetic images.

``python tests/bench/test_bench_algm.py`` prints, for each batch size and policy, the
merging overhead (% of the ALGM forward), the measured speed-up over ``none``, the
GFLOPs ratio (fvcore, ``algm.measure.flops.count_flops``) and their quotient
(implementation efficiency; 1 means the time falls exactly with the FLOPs).
"""

from __future__ import annotations

import statistics
import sys
import time
from functools import lru_cache

import pytest
import torch
import torch.nn.functional as F

from algm.build import make_setup
from algm.merging.bipartite import global_merge
from algm.merging.local import gather_windows, local_merge, window_index
from algm.reduction import TokenState, prepend_cls

WINDOW = (336, 448)
GRID = (24, 32)
D = 384
TAU = 0.88


def stage_input(batch: int, similar: float = 0.4) -> TokenState:
    """Unreduced (B, 1 + 768, 384) tokens where a fraction of the 2x2 windows holds
    near-identical tokens (they merge at tau 0.88), the rest is noise."""
    g = torch.Generator().manual_seed(batch)
    n = GRID[0] * GRID[1]
    windows = window_index(GRID)
    x = torch.randn(batch, n, D, generator=g)
    sel = torch.rand(batch, windows.shape[0], generator=g) < similar
    base = torch.randn(batch, windows.shape[0], 1, D, generator=g)
    xw = gather_windows(x, GRID)
    xw = torch.where(sel[..., None, None], base + 0.1 * torch.randn(xw.shape, generator=g), xw)
    x[:, windows.reshape(-1)] = xw.reshape(batch, -1, D)
    return prepend_cls(TokenState.identity(x, GRID), torch.randn(1, 1, D, generator=g))


def images(batch: int) -> torch.Tensor:
    """(B, 3, 336, 448) normalised CamVid val frames, or smooth synthetic images."""
    try:
        from algm.data.windows import frames_batch

        backbone = _setup("none").backbone
        return frames_batch("camvid", "val", WINDOW, backbone.mean, backbone.std, batch, "mixed")
    except Exception:  # no data on this machine: low-frequency noise has flat regions too
        g = torch.Generator().manual_seed(batch)
        low = torch.randn(batch, 3, 6, 8, generator=g)
        return F.interpolate(low, size=WINDOW, mode="bilinear", align_corners=False)


@lru_cache(maxsize=None)
def _setup(method: str, policy: str = "batch_min"):
    torch.manual_seed(0)
    options = {"batch_policy": policy} if method == "algm" else {}
    setup = make_setup("vit-s14", "camvid", method, window=WINDOW, **options)
    setup.model.eval()
    return setup


# ---------------------------------------------------------------- stages alone


@pytest.mark.parametrize("policy", ["batch_min", "per_image"])
@pytest.mark.parametrize("batch", [1, 8])
def test_local_stage(benchmark, batch, policy):
    state = stage_input(batch)
    per_image = policy == "per_image"
    out = local_merge(state, TAU, per_image)
    benchmark.extra_info["tokens"] = out.alive().tolist()

    def step():
        with torch.no_grad():
            return local_merge(state, TAU, per_image)

    benchmark.pedantic(step, rounds=20, warmup_rounds=3, iterations=1)


@pytest.mark.parametrize("policy", ["batch_min", "per_image"])
@pytest.mark.parametrize("batch", [1, 8])
def test_global_stage(benchmark, batch, policy):
    per_image = policy == "per_image"
    state = local_merge(stage_input(batch), TAU, per_image)
    out = global_merge(state, 5, per_image)
    benchmark.extra_info["tokens_in"] = state.alive().tolist()
    benchmark.extra_info["tokens_out"] = out.alive().tolist()

    def step():
        with torch.no_grad():
            return global_merge(state, 5, per_image)

    benchmark.pedantic(step, rounds=20, warmup_rounds=3, iterations=1)


# ---------------------------------------------------------------- whole forward


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("case", ["none", "algm-batch_min", "algm-per_image"])
def test_forward(benchmark, case, batch):
    method, _, policy = case.partition("-")
    model = _setup(method, policy or "batch_min").model
    x = images(batch)
    with torch.no_grad():
        benchmark.extra_info["tokens_after_last_block"] = model.run(x).tokens[:, -1].tolist()

    def forward():
        with torch.no_grad():
            return model(x)

    benchmark.pedantic(forward, rounds=5, warmup_rounds=2, iterations=1)


# ---------------------------------------------------------------- summary script


class _StageTimer:
    """Wraps a method's ``mid_block`` and sums its wall time (CPU: synchronous)."""

    def __init__(self, method):
        self.method, self.total = method, 0.0
        self.inner = method.mid_block

    def __call__(self, state, layer, keys):
        t0 = time.perf_counter()
        out = self.inner(state, layer, keys)
        self.total += time.perf_counter() - t0
        return out


def summary(batches=(1, 8), repeats: int = 7) -> list[dict]:
    """Overhead, speed-up, GFLOPs ratio and efficiency of ALGM on vit-s14 / CamVid."""
    from algm.measure.flops import count_flops

    rows = []
    none = _setup("none").model
    for batch in batches:
        x = images(batch)
        for policy in ("batch_min", "per_image"):
            model = _setup("algm", policy).model
            timer = _StageTimer(model.method)
            model.method.mid_block = timer
            with torch.no_grad():
                for _ in range(2):  # warm-up
                    none(x), model(x)
                t_none, t_algm, t_merge = [], [], []
                for _ in range(repeats):  # interleaved: both see the same machine load
                    t0 = time.perf_counter()
                    none(x)
                    t_none.append(time.perf_counter() - t0)
                    timer.total = 0.0
                    t0 = time.perf_counter()
                    model(x)
                    t_algm.append(time.perf_counter() - t0)
                    t_merge.append(timer.total)
                tokens = model.run(x).tokens
            del model.method.mid_block
            # GFLOPs: protocol (batch 1, mean over the images) and as executed in this batch
            f_none = count_flops(none, x[:1])
            f_proto = statistics.fmean(count_flops(model, x[i: i + 1]) for i in range(batch))
            f_batch = count_flops(model, x) / batch if batch > 1 else f_proto
            speedup = statistics.median(t_none) / statistics.median(t_algm)
            rows.append({
                "batch": batch, "policy": policy,
                "ms_none": 1e3 * statistics.median(t_none), "ms_algm": 1e3 * statistics.median(t_algm),
                "merge_ms": 1e3 * statistics.median(t_merge),
                "merge_pct": 100 * statistics.median(m / t for m, t in zip(t_merge, t_algm)),
                "speedup": speedup,
                "gflops_none": f_none, "gflops_algm": f_proto, "gflops_algm_batch": f_batch,
                "gflops_ratio": f_none / f_proto, "gflops_ratio_batch": f_none / f_batch,
                "efficiency": speedup / (f_none / f_batch),
                "tokens_local": tokens[:, 0].tolist(), "tokens_final": tokens[:, -1].tolist(),
            })
            print(_format(rows[-1]), flush=True)
    return rows


def _format(r: dict) -> str:
    return (f"B={r['batch']} {r['policy']:9s}  none {r['ms_none']:.0f} ms  algm {r['ms_algm']:.0f} ms  "
            f"merging {r['merge_ms']:.1f} ms ({r['merge_pct']:.2f} %)  speed-up {r['speedup']:.3f}  "
            f"GFLOPs {r['gflops_none']:.2f} -> {r['gflops_algm']:.2f} (batch-1 ratio {r['gflops_ratio']:.3f}, "
            f"as executed {r['gflops_ratio_batch']:.3f})  speed-up / GFLOPs ratio {r['efficiency']:.3f}  "
            f"tokens local {r['tokens_local']} final {r['tokens_final']}")


if __name__ == "__main__":
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads())
    summary()
