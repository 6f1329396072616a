"""Where the time of one Segmenter forward goes, stage by stage (issue 15).

The forward is stepped through the :data:`algm.model.vit.Stage` argument of
:meth:`Segmenter.run <algm.model.segmenter.Segmenter.run>`, so the timed forward is the
model's own (same loop, same ops, same output); every piece is timed on its own and the
pieces are grouped into stages:

* ``fixed``: ``patch embed`` (patch conv, position embedding, cls token), ``restore``
  (the method's map back to the patch grid) and ``upsample`` (the bilinear upsample of
  the n_cls logit maps). No method shrinks them: their work is set by the image size,
  the grid and the classes.
* ``encoder``: the transformer blocks, grouped between the method's steps and named by
  the block halves they span (``blocks 1.attn``, ``blocks 1.mlp-5.attn``, ``blocks
  5.mlp-12``; ``.attn`` is the attention residual, ``.mlp`` the MLP residual, a bare
  number the whole block; the final norm joins the last group).
* ``method``: the method's own hook calls that change the state, one stage each
  (``algm mid_block 1``): ``mid_block`` / ``after_block`` / ``before_decoder`` calls
  that return a new state
  (the identity hooks return their input), ``begin`` when the method overrides it, and
  ``<method> attn_bias``, every attention bias the method returns, summed. Hook calls
  that change nothing join the block group around them, so ``none`` has no method stage.
* ``decoder``: the decoder on the final tokens.

Blocks and decoder scale with the tokens; :func:`speedup_bound` is the speed-up the fixed
stages leave room for at a GFLOPs ratio. Each stage's time is the median over the timed
forwards; a stage's share is its median over the sum of the medians (``forward_s``), so
the shares sum to 1. On CUDA the device is synchronised before and after every piece
(the timer adds no other host-device sync), which serialises launch and compute: the
stepped forward is slower than an unstepped one, the shares are what to read.
"""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from algm.measure.allocator import freed_memory_kept
from algm.measure.throughput import cuda_settings
from algm.model.segmenter import Segmenter, SegmenterOutput
from algm.precision import autocast_context
from algm.reduction import TokenReduction

FIXED, ENCODER, METHOD, DECODER = "fixed", "encoder", "method", "decoder"
_FIXED_PIECES = {"embed": "patch embed", "cls": "patch embed", "restore": "restore", "upsample": "upsample"}


@dataclass(frozen=True)
class StageTime:
    """One stage: ``kind`` is fixed / encoder / method / decoder (module docstring)."""

    name: str
    kind: str
    seconds: float
    share: float


@dataclass(frozen=True)
class Breakdown:
    """Per-stage median seconds of one forward of ``batch_size`` images, in forward order."""

    stages: tuple[StageTime, ...]
    forward_s: float  # sum of the stage medians
    batch_size: int
    repeats: int
    warmup: int
    device: str
    precision: str

    def share(self, kind: str) -> float:
        """Share of the forward spent in the stages of ``kind``."""
        return sum(s.share for s in self.stages if s.kind == kind)

    @property
    def overhead_share(self) -> float:
        """The method's own hook calls over the forward (0 for ``none``)."""
        return self.share(METHOD)

    @property
    def fixed_share(self) -> float:
        """Patch embed, restore and upsample over the forward."""
        return self.share(FIXED)

    def bound(self, gflops_ratio: float, fixed_gflops_share: float = 0.0) -> float:
        """:func:`speedup_bound` with this breakdown's fixed share: call it on the
        unreduced (``none``) model's breakdown with a method's GFLOPs ratio."""
        return speedup_bound(self.fixed_share, gflops_ratio, fixed_gflops_share)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(overhead_share=self.overhead_share, fixed_share=self.fixed_share)
        return out


def speedup_bound(fixed_share: float, gflops_ratio: float, fixed_gflops_share: float = 0.0) -> float:
    """The speed-up over the unreduced forward that the fixed stages allow (Amdahl).

    Model: the fixed stages keep their time (``fixed_share`` of the unreduced forward);
    the rest (blocks and decoder) takes time in proportion to its GFLOPs; the method adds
    no overhead. ``gflops_ratio`` = unreduced / reduced GFLOPs of the whole model.
    ``fixed_gflops_share``, the fixed stages' part of the unreduced GFLOPs (the patch
    conv is 0.30 of ViT-S/16's 38.6 GFLOPs at 512 x 512, 0.8 %), makes the scaling part's
    ratio exact; left at 0 the bound is low by about that share times the scaling
    part's share of the time (< 1 % there).
    """
    if not 0.0 <= fixed_share < 1.0:
        raise ValueError(f"fixed_share must be in [0, 1), got {fixed_share}")
    if gflops_ratio <= 0 or not 0.0 <= fixed_gflops_share < min(1.0, 1.0 / gflops_ratio):
        raise ValueError(f"need gflops_ratio > 0 and 0 <= fixed_gflops_share < 1 / gflops_ratio, "
                         f"got {gflops_ratio}, {fixed_gflops_share}")
    scaled = (1.0 / gflops_ratio - fixed_gflops_share) / (1.0 - fixed_gflops_share)
    return 1.0 / (fixed_share + (1.0 - fixed_share) * scaled)


@dataclass
class _Group:
    """Consecutive block halves between two method steps, with their seconds."""

    first: tuple[int, str] | None = None
    last: tuple[int, str] | None = None
    seconds: float = 0.0

    def name(self) -> str:
        (a, start), (b, end) = self.first, self.last
        head = f"{a + 1}" if start == "attn" else f"{a + 1}.mlp"
        tail = f"{b + 1}" if end == "mlp" else f"{b + 1}.attn"
        if a == b:
            return f"block {b + 1}" + ("" if (start, end) == ("attn", "mlp") else f".{start}")
        return f"blocks {head}-{tail}"


class StageClock:
    """A :data:`~algm.model.vit.Stage` that times every piece of a forward and groups
    the pieces into named stages (module docstring); one instance per forward."""

    def __init__(self, method: TokenReduction, device: torch.device):
        self.method = method
        self.cuda = device.type == "cuda"
        self.device = device
        self.stages: dict[str, list] = {}  # name -> [kind, seconds], in forward order
        self.group = _Group()

    def __call__(self, name: str, layer: int | None, fn: Callable[..., Any], *args: Any) -> Any:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        out = fn(*args)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self._add(name, layer, time.perf_counter() - start, self._changes(name, args, out))
        return out

    def _changes(self, name: str, args: tuple, out: Any) -> bool:
        """Whether a hook call is a method step (identity-object checks: no device sync)."""
        if name == "begin":
            return type(self.method).begin is not TokenReduction.begin
        if name in ("mid_block", "after_block", "before_decoder"):
            return out is not args[0]
        if name == "attn_bias":
            return out is not None
        return False

    def _add(self, name: str, layer: int | None, seconds: float, changes: bool) -> None:
        if name in _FIXED_PIECES or (name == "begin" and not changes):
            self._stage(_FIXED_PIECES.get(name, "patch embed"), FIXED, seconds)
        elif name == "attn_bias" and changes:  # every block's bias, summed: no boundary
            self._stage(f"{self.method.name} attn_bias", METHOD, seconds)
        elif name in ("begin", "mid_block", "after_block", "before_decoder") and changes:
            self._close()
            where = "" if layer is None else f" {layer + 1}"
            self._stage(f"{self.method.name} {name}{where}", METHOD, seconds)
        elif name == "decoder":
            self._close()
            self._stage("decoder", DECODER, seconds)
        else:  # attend, feed, norm and hook calls that changed nothing
            if name in ("attend", "feed"):
                half = (layer, "attn" if name == "attend" else "mlp")
                self.group.first = self.group.first or half
                self.group.last = half
            self.group.seconds += seconds

    def _close(self) -> None:
        if self.group.first is not None:
            self._stage(self.group.name(), ENCODER, self.group.seconds)
        elif self.group.seconds:  # only the final norm can follow a method step directly
            self._stage("norm", ENCODER, self.group.seconds)
        self.group = _Group()

    def _stage(self, name: str, kind: str, seconds: float) -> None:
        entry = self.stages.setdefault(name, [kind, 0.0])
        entry[1] += seconds

    def result(self) -> list[StageTime]:
        """Every stage in forward order, shares of this forward."""
        self._close()
        total = sum(seconds for _, seconds in self.stages.values())
        return [StageTime(name, kind, seconds, seconds / total) for name, (kind, seconds) in self.stages.items()]


def time_stages(model: Segmenter, batch: Tensor) -> tuple[SegmenterOutput, list[StageTime]]:
    """One stepped forward of ``model.run(batch)``: its output and its stages. Call under
    ``torch.no_grad()`` in eval mode to time inference."""
    clock = StageClock(model.method, batch.device)
    out = model.run(batch, stage=clock)
    return out, clock.result()


def measure_breakdown(model: Segmenter, batch: Tensor, warmup: int = 5, repeats: int = 10,
                      precision: str = "fp32", *, tf32: bool = False,
                      cudnn_benchmark: bool = False) -> Breakdown:
    """Per-stage times of ``model.run(batch)`` (batch (B, 3, H, W) on the model's device),
    no_grad and eval mode (the training flag is restored), after ``warmup`` stepped
    forwards; options as in :func:`algm.measure.throughput.measure_throughput`."""
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got {warmup}, {repeats}")
    was_training = model.training
    model.eval()
    runs = []
    try:
        with torch.no_grad(), cuda_settings(batch.device, tf32, cudnn_benchmark), \
                autocast_context(batch.device, precision), \
                (nullcontext() if batch.device.type == "cuda" else freed_memory_kept()):  # as whole forwards
            for i in range(warmup + repeats):
                stages = time_stages(model, batch)[1]
                if i >= warmup:
                    runs.append(stages)
    finally:
        model.train(was_training)
    layout = [(s.name, s.kind) for s in runs[0]]
    if any([(s.name, s.kind) for s in run] != layout for run in runs):
        raise ValueError("the method's steps differ between forwards of the same batch; "
                         "a breakdown needs the same stages in every forward")
    medians = [statistics.median(run[i].seconds for run in runs) for i in range(len(layout))]
    total = sum(medians)
    return Breakdown(
        stages=tuple(StageTime(name, kind, s, s / total) for (name, kind), s in zip(layout, medians)),
        forward_s=total, batch_size=batch.shape[0], repeats=repeats, warmup=warmup,
        device=str(batch.device), precision=precision,
    )
