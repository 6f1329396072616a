"""Confusion-matrix mIoU (SPEC section 4), the same numbers as mmseg's ``IoUMetric``.

Pixels labelled ``ignore_index`` are never counted. Per-class IoU = TP / (TP + FP + FN);
a class with an empty union (neither in the labels nor predicted over the whole split) is
NaN and left out of the mean, so mIoU = nanmean over the classes present. All values are
percentages in 0..100, as mmseg prints them and every table of this project reports them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor


@dataclass(frozen=True)
class MIoUResult:
    """miou: nanmean of ``per_class_iou``; acc: pixel accuracy over non-ignored pixels;
    per_class_iou: (n_cls,) with NaN for absent classes (all three in percent, 0..100); n_images: images accumulated;
    confusion: (n_cls, n_cls) int64 counts, rows = ground truth, columns = prediction."""

    miou: float
    acc: float
    per_class_iou: tuple[float, ...]
    n_images: int
    confusion: Tensor = field(repr=False)

    def to_dict(self, classes: Sequence[str] | None = None) -> dict:
        """JSON-ready: NaN becomes None; per-class IoU keyed by ``classes`` if given."""
        ious = [None if math.isnan(v) else v for v in self.per_class_iou]
        per_class = dict(zip(classes, ious)) if classes is not None else ious
        return {
            "miou": None if math.isnan(self.miou) else self.miou,
            "acc": None if math.isnan(self.acc) else self.acc,
            "n_images": self.n_images,
            "per_class_iou": per_class,
        }


class ConfusionMatrix:
    """Accumulates an (n_cls, n_cls) confusion matrix on the device of the first update."""

    def __init__(self, n_cls: int, ignore_index: int):
        self.n_cls = n_cls
        self.ignore_index = ignore_index
        self.matrix: Tensor | None = None
        self.n_images = 0

    def update(self, pred: Tensor, label: Tensor) -> None:
        """pred, label: integer class maps of one shape, (H, W) for one image or (B, H, W)."""
        if pred.shape != label.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in shape")
        if label.dim() not in (2, 3):
            raise ValueError(f"expected (H, W) or (B, H, W) maps, got shape {tuple(label.shape)}")
        keep = label != self.ignore_index
        gt, pr = label[keep].long(), pred[keep].long()
        for what, values in (("label", gt), ("prediction", pr)):
            if values.numel() and (values.min() < 0 or values.max() >= self.n_cls):
                raise ValueError(f"{what} values must be in 0..{self.n_cls - 1} (or the ignore index "
                                 f"{self.ignore_index}), got {values.min().item()}..{values.max().item()}")
        counts = torch.bincount(gt * self.n_cls + pr, minlength=self.n_cls ** 2).view(self.n_cls, self.n_cls)
        self.matrix = counts if self.matrix is None else self.matrix + counts.to(self.matrix.device)
        self.n_images += 1 if label.dim() == 2 else label.shape[0]

    def result(self) -> MIoUResult:
        if self.matrix is None:
            return metrics_from_confusion(torch.zeros(self.n_cls, self.n_cls, dtype=torch.long), 0)
        return metrics_from_confusion(self.matrix.cpu(), self.n_images)


def metrics_from_confusion(matrix: Tensor, n_images: int = 0) -> MIoUResult:
    """mIoU, pixel accuracy and per-class IoU, in percent, of a (n_cls, n_cls) confusion
    matrix (rows = truth)."""
    m = matrix.double()
    tp = m.diagonal()
    union = m.sum(0) + m.sum(1) - tp
    iou = torch.where(union > 0, 100 * tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    total = m.sum()
    acc = (100 * tp.sum() / total).item() if total > 0 else float("nan")
    return MIoUResult(miou=iou.nanmean().item(), acc=acc, per_class_iou=tuple(iou.tolist()),
                      n_images=n_images, confusion=matrix)
