"""Numeric precision of a forward pass: autocast contexts and the CPU's bf16 support."""

from __future__ import annotations

from contextlib import nullcontext

import torch

PRECISIONS = ("fp32", "bf16", "fp16")


def autocast_context(device: torch.device, precision: str):
    """fp32 -> no autocast; 'bf16' / 'fp16' -> torch.autocast on the model's device."""
    if precision == "fp32":
        return nullcontext()
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    return torch.autocast(device_type=device.type, dtype=dtypes[precision])


def native_bf16() -> bool:
    """True if this CPU has bf16 matrix instructions (AMX or AVX512-BF16); elsewhere bf16
    autocast is emulated and slower than fp32."""
    return any(getattr(torch.cpu, probe, lambda: False)()
               for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
