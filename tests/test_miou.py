"""Confusion-matrix mIoU: a hand-computed case, ignore handling, and mmseg's IoUMetric."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from algm.measure.miou import ConfusionMatrix

IGNORE = 255


def test_hand_computed():
    label = torch.tensor([[0, 0, 1], [1, 2, IGNORE]])
    pred = torch.tensor([[0, 1, 1], [1, 1, 0]])
    cm = ConfusionMatrix(4, IGNORE)
    cm.update(pred, label)
    res = cm.result()
    # class 0: TP 1, FN 1 (->1), FP 0 -> 1/2; class 1: TP 2, FP 2 (0->1, 2->1) -> 2/4;
    # class 2: TP 0, FN 1 -> 0; class 3: absent -> NaN; the ignored pixel's 0 is not a FP.
    # Every figure in percent.
    assert res.per_class_iou[:3] == (50.0, 50.0, 0.0) and math.isnan(res.per_class_iou[3])
    assert res.miou == pytest.approx(100 / 3)
    assert res.acc == pytest.approx(60.0)
    assert res.n_images == 1
    assert res.confusion.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    assert res.to_dict(["a", "b", "c", "d"]) == {
        "miou": pytest.approx(100 / 3), "acc": pytest.approx(60.0), "n_images": 1,
        "per_class_iou": {"a": 50.0, "b": 50.0, "c": 0.0, "d": None},
    }


def test_ignore_never_counts():
    gen = torch.Generator().manual_seed(0)
    label = torch.randint(0, 5, (3, 20, 30), generator=gen)
    label[:, :7] = IGNORE
    pred = torch.randint(0, 5, label.shape, generator=gen)
    other = pred.clone()
    other[label == IGNORE] = (other[label == IGNORE] + 1) % 5
    a, b = ConfusionMatrix(5, IGNORE), ConfusionMatrix(5, IGNORE)
    a.update(pred, label)
    b.update(other, label)
    assert torch.equal(a.result().confusion, b.result().confusion)
    assert a.result().confusion.sum() == (label != IGNORE).sum()
    assert a.result().n_images == 3

    only_ignore = ConfusionMatrix(5, IGNORE)
    only_ignore.update(pred[0], torch.full_like(label[0], IGNORE))
    res = only_ignore.result()
    assert res.confusion.sum() == 0 and math.isnan(res.miou) and math.isnan(res.acc)


def test_class_only_predicted_counts_as_zero():
    cm = ConfusionMatrix(3, IGNORE)
    cm.update(torch.tensor([[0, 2]]), torch.tensor([[0, 0]]))
    res = cm.result()
    assert res.per_class_iou[0] == 50.0 and math.isnan(res.per_class_iou[1]) and res.per_class_iou[2] == 0.0
    assert res.miou == pytest.approx(25.0)


def test_batched_updates_equal_per_image():
    gen = torch.Generator().manual_seed(1)
    label = torch.randint(0, 4, (4, 9, 11), generator=gen)
    pred = torch.randint(0, 4, (4, 9, 11), generator=gen)
    batched, single = ConfusionMatrix(4, IGNORE), ConfusionMatrix(4, IGNORE)
    batched.update(pred, label)
    for p, l in zip(pred, label):
        single.update(p, l)
    assert torch.equal(batched.result().confusion, single.result().confusion)
    assert batched.result().n_images == single.result().n_images == 4


def test_invalid_inputs():
    cm = ConfusionMatrix(3, IGNORE)
    with pytest.raises(ValueError, match="label values"):
        cm.update(torch.zeros(2, 2, dtype=torch.long), torch.tensor([[0, 3], [1, IGNORE]]))
    with pytest.raises(ValueError, match="prediction values"):
        cm.update(torch.tensor([[0, -1]]), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))


def test_equals_mmseg_iou_metric():
    metrics = pytest.importorskip("mmseg.evaluation.metrics",
                                  reason="mmsegmentation is not installed (optional extra 'mmseg')")
    IoUMetric = metrics.IoUMetric
    n_cls, ignore = 7, 255
    gen = torch.Generator().manual_seed(2)
    cm = ConfusionMatrix(n_cls, ignore)
    areas = []
    for _ in range(5):
        label = torch.randint(0, n_cls - 1, (23, 31), generator=gen)  # class 6 never in the labels
        label[torch.rand(label.shape, generator=gen) < 0.2] = ignore
        pred = torch.randint(0, n_cls - 2, label.shape, generator=gen)  # nor predicted: NaN
        pred[:3] = label[:3].clamp(max=n_cls - 3)  # some agreement
        cm.update(pred, label)
        areas.append(IoUMetric.intersect_and_union(pred, label, n_cls, ignore))
    totals = [sum(a[i] for a in areas) for i in range(4)]
    ref = IoUMetric.total_area_to_metrics(*totals, metrics=["mIoU"])  # fractions; mmseg prints x 100
    ours = cm.result()
    np.testing.assert_allclose(np.array(ours.per_class_iou), 100 * np.asarray(ref["IoU"]), rtol=1e-6,
                               equal_nan=True)
    assert math.isnan(ours.per_class_iou[6])
    assert ours.miou == pytest.approx(100 * float(np.nanmean(ref["IoU"])), rel=1e-6)
    assert ours.acc == pytest.approx(100 * float(ref["aAcc"]), rel=1e-6)


def test_no_updates_gives_nan():
    res = ConfusionMatrix(3, IGNORE).result()
    assert res.n_images == 0 and math.isnan(res.miou) and all(math.isnan(v) for v in res.per_class_iou)
    assert res.to_dict() == {"miou": None, "acc": None, "n_images": 0, "per_class_iou": [None] * 3}
