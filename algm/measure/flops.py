"""GFLOPs with fvcore (one fused multiply-add = one FLOP), SPEC section 4.

fvcore has no handle for the fused ``scaled_dot_product_attention``; we register one
that counts what the explicit ``softmax(q k^T) v`` matmuls would: B*H*Lq*Lk*(E+Ev).
Token-reduction methods make the count data dependent, so a split is averaged over
images; traces are memoised by the per-layer token-count signature.

fvcore skips ops it has no handle for. By its convention (and the ALGM tables') the
elementwise, reduction and indexing ops cost nothing (:data:`FREE_OPS`); any other
skipped op would make a method's step cost 0 GFLOPs by accident, so a method declares a
handle for it (``TokenReduction.flop_handles``) and :func:`uncounted_ops` lists the ops
still skipped (the contract test requires none).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from algm import distributed as dist
from algm.reduction import TokenReduction

with warnings.catch_warnings():
    # fvcore imports torch.jit.script, which torch 2.14 marks deprecated at import time.
    warnings.simplefilter("ignore", FutureWarning)
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import get_shape

SDPA_OP = "aten::scaled_dot_product_attention"

# Ops fvcore skips that cost no FLOPs by the one-multiply-add convention: elementwise
# arithmetic and activations, comparisons, reductions, sorting, indexing and copies, and
# the per-pixel resampling of the position embedding and average pooling of pixels.
FREE_OPS = frozenset(f"aten::{op}" for op in """
    abs add add_ addcmul amax amin any all argmax argmin argsort avg_pool2d bitwise_and
    bitwise_or __and__ __or__ __xor__ __invert__ clamp_min clamp_max clamp cos cumsum div div_
    elu exp exp_ expand_as eq ne ge gt le lt gelu silu sigmoid tanh relu gather index_add_
    index_select isfinite isnan linalg_vector_norm norm log log_ logsumexp log_softmax softmax
    masked_fill masked_fill_ masked_scatter max maximum mean min minimum mul mul_ neg ones_like
    pow reciprocal rsqrt rsub scatter scatter_ scatter_add scatter_add_ scatter_reduce sort sqrt
    square sub sub_ sum topk upsample_bicubic2d var std where zeros_like new_zeros new_ones
    new_full new_empty empty_like fill_ one_hot sign floor_divide round remainder bucketize searchsorted repeat
    repeat_interleave roll flip tril triu diagonal diag_embed nan_to_num
    """.split())


def sdpa_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore handle: q (B, H, Lq, E), k (B, H, Lk, E), v (B, H, Lk, Ev)."""
    q, k, v = (get_shape(x) for x in inputs[:3])
    *batch, lq, e = q
    lk, ev = k[-2], v[-1]
    n = 1
    for s in batch:
        n *= s
    return n * lq * lk * (e + ev)


def op_handles(model: nn.Module) -> dict[str, Callable]:
    """The SDPA handle plus the ``flop_handles`` of every method inside ``model``."""
    handles = {SDPA_OP: sdpa_flop_jit}
    for module in model.modules():
        if isinstance(module, TokenReduction):
            handles.update(module.flop_handles)
    return handles


def _analyse(model: nn.Module, inputs: Tensor | tuple, reader: Callable[[FlopCountAnalysis], Any]) -> Any:
    """``reader(analysis)`` of one fvcore trace of ``model(*inputs)`` (eval, no grad)."""
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            analysis = FlopCountAnalysis(model, inputs).set_op_handle(**op_handles(model))
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            logging.getLogger("fvcore").setLevel(logging.ERROR)
            return reader(analysis)
    finally:
        model.train(was_training)


def count_flops(model: nn.Module, inputs: Tensor | tuple) -> float:
    """Total GFLOPs of ``model(*inputs)`` (eval mode, no grad), one trace."""
    return _analyse(model, inputs, lambda analysis: analysis.total() / 1e9)


def uncounted_ops(model: nn.Module, inputs: Tensor | tuple) -> dict[str, int]:
    """``{op: calls}`` of the ops of ``model(*inputs)`` that fvcore skipped and that are
    not in :data:`FREE_OPS`: each needs a handle (``TokenReduction.flop_handles``)."""
    def read(analysis: FlopCountAnalysis) -> dict[str, int]:
        analysis.total()
        return {op: n for op, n in sorted(analysis.unsupported_ops().items()) if op not in FREE_OPS}
    return _analyse(model, inputs, read)


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
