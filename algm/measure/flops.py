"""GFLOPs with fvcore (one fused multiply-add = one FLOP), SPEC section 4.

fvcore has no handle for the fused ``scaled_dot_product_attention``; we register one
that counts what the explicit ``softmax(q k^T) v`` matmuls would: B*H*Lq*Lk*(E+Ev).
Token-reduction methods make the count data dependent, so a split is averaged over
images; traces are memoised by the per-layer token-count signature.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from algm import distributed as dist

with warnings.catch_warnings():
    # fvcore imports torch.jit.script, which torch 2.14 marks deprecated at import time.
    warnings.simplefilter("ignore", FutureWarning)
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import get_shape

SDPA_OP = "aten::scaled_dot_product_attention"


def sdpa_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore handle: q (B, H, Lq, E), k (B, H, Lk, E), v (B, H, Lk, Ev)."""
    q, k, v = (get_shape(x) for x in inputs[:3])
    *batch, lq, e = q
    lk, ev = k[-2], v[-1]
    n = 1
    for s in batch:
        n *= s
    return n * lq * lk * (e + ev)


def count_flops(model: nn.Module, inputs: Tensor | tuple) -> float:
    """Total GFLOPs of ``model(*inputs)`` (eval mode, no grad), one trace."""
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            analysis = FlopCountAnalysis(model, inputs).set_op_handle(SDPA_OP, sdpa_flop_jit)
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            logging.getLogger("fvcore").setLevel(logging.ERROR)
            return analysis.total() / 1e9
    finally:
        model.train(was_training)


def average_flops(model: nn.Module, images: Iterable[Tensor],
                  signature: Callable[[Tensor], tuple] | None = None,
                  distributed: bool = False) -> tuple[float, list[float]]:
    """Mean GFLOPs per image over ``images`` (each (1, 3, H, W)), and the per-image list.
    (Batches (B, 3, H, W) work too: the list then holds each batch's total.)

    ``signature(image)`` returns a hashable key that determines the count (e.g. the
    tokens kept per layer); images with a known key reuse that count instead of a
    new trace. Without it every image is traced. With ``distributed`` each process of the
    :mod:`algm.distributed` group counts its :func:`~algm.distributed.shard` of ``images``
    and every process gets the whole per-image list, in the order of ``images``.
    """
    cache: dict[tuple, float] = {}
    per_image = []
    for image in dist.shard(images) if distributed else images:
        key = signature(image) if signature is not None else None
        if key is None or key not in cache:
            value = count_flops(model, image)
            if key is None:
                per_image.append(value)
                continue
            cache[key] = value
        per_image.append(cache[key])
    if distributed:
        per_image = dist.gather_in_order(per_image)
    if not per_image:
        raise ValueError("no images to count GFLOPs on")
    return sum(per_image) / len(per_image), per_image
