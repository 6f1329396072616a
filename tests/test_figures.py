"""The data figures of a suite (suites/figures.py) and the gallery's frames and
predictions (algm/pictures/gallery.py), on fixture records and tiny random models."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from algm.config import DecoderConfig, ViTConfig, get_dataset
from algm.model.segmenter import build_segmenter
from algm.pictures.gallery import (CAMVID_GALLERY_FRAMES, GALLERY_SPLITS, method_variants, sequence,
                                   spread_frames, write_predictions)
from algm.pictures.maps import ERROR_COLOR, IGNORE_COLOR, error_map_rgb, error_mask
from algm.pictures.predict import label_view, window_view
from suites.figures import (FIGURES, OFF_THE_SHELF, TRAINED, pareto_front, setting_label, stage_times, sweeps,
                            tradeoff_points, write_figures)
from suites.records import RowRecord, Timing

CAMVID = Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid"

pytestmark = pytest.mark.usefixtures("one_thread")


def record(method: str, options: dict | None = None, *, gflops: float, miou: float, ims: float | None,
           miou_trained: float = math.nan, batch: int | None = None, layers: list | None = None) -> RowRecord:
    """A CamVid vit-s14 row timed at batch 1 and 4 beside a baseline at 10 images/s."""
    timings = {}
    if ims is not None:
        base = method == "none"
        timings = {b: Timing(b, ims * f, std_images_per_s=0.1, baseline_images_per_s=None if base else 10.0 * f,
                             baseline=base) for b, f in ((1, 1.0), (4, 1.5))}
    return RowRecord(dataset="camvid", backbone="vit-s14", method=method, setting=method, gflops=gflops,
                     tokens_kept_pct=100.0, options=options or {}, batch=batch, miou=miou, miou_trained=miou_trained,
                     timings=timings, tokens_per_layer=layers or [769.0] * 12, fixed_share=0.02,
                     overhead_share=0.0 if method == "none" else 0.05, breakdown_batch=1 if ims else None)


def suite_records(timed: bool = True) -> list[RowRecord]:
    ims = (lambda v: v) if timed else (lambda v: None)
    return [
        record("none", gflops=26.0, miou=52.0, miou_trained=52.0, ims=ims(10.0)),
        record("algm", {"tau": 0.9}, gflops=13.0, miou=43.5, ims=ims(16.0), layers=[480.0] * 12),
        record("algm", gflops=17.0, miou=49.7, miou_trained=49.9, ims=ims(13.0)),
        record("algm", batch=8, gflops=18.0, miou=50.1, ims=ims(13.5)),
        record("tome", {"r": 8}, gflops=23.8, miou=51.9, ims=ims(9.9)),
        record("cts", {"policy": "learned"}, gflops=17.0, miou=50.1, ims=ims(14.0)),
        record("prune", {"p0": 0.9}, gflops=14.9, miou=45.1, ims=ims(16.0)),
    ]


# ------------------------------------------------------------------ data figures
def test_every_figure_is_written_and_untimed_rows_skip_the_timed_ones(tmp_path):
    written = write_figures(suite_records(), tmp_path / "all", "CamVid val, vit-s14, 336x448, b1/b4, test")
    assert [p.name for p in written] == list(FIGURES)
    for path in written:
        with Image.open(path) as im:
            assert im.size[0] > 400 and im.size[1] > 300
    untimed = write_figures(suite_records(timed=False), tmp_path / "untimed", "caption")
    assert [p.name for p in untimed] == ["miou_vs_gflops.png", "tokens_per_layer.png"]
    assert sorted(p.name for p in (tmp_path / "untimed").iterdir()) == sorted(p.name for p in untimed)


def test_no_data_writes_nothing(tmp_path):
    assert write_figures([], tmp_path / "out", "caption") == []
    assert not (tmp_path / "out").exists()


def test_pareto_front_is_the_set_of_undominated_points():
    rng = np.random.default_rng(0)
    for lower_x_better in (False, True):
        for _ in range(20):
            x = rng.integers(0, 8, 15).astype(float)  # ties in x and y included
            y = rng.integers(0, 8, 15).astype(float)
            sign = -1 if lower_x_better else 1
            direct = {i for i in range(15)
                      if not any(sign * x[j] >= sign * x[i] and y[j] >= y[i] and (x[j] != x[i] or y[j] != y[i])
                                 for j in range(15))}
            front = pareto_front(x, y, lower_x_better)
            assert set(front) == direct
            assert list(x[front]) == sorted(x[front])


def test_pareto_front_of_the_fixture_points():
    # (speed-up, mIoU) of suite_records: the baseline (1, 52.0) beats tome (0.99, 51.9),
    # cts (1.4, 50.1) beats algm's batch=8 (1.35, 50.1) and both heads of its default (1.3),
    # prune (1.6, 45.1) beats algm tau=0.9 (1.6, 43.5).
    points = tradeoff_points(suite_records(), lambda r: (r.timings[1].speedup, None))
    front = [points[i] for i in pareto_front([p.x for p in points], [p.y for p in points])]
    assert [(p.record.method, p.y) for p in front] == [("none", 52.0), ("cts", 50.1), ("prune", 45.1)]


def test_both_heads_are_points_of_their_own_never_the_better():
    points = tradeoff_points(suite_records(), lambda r: (r.gflops, None))
    algm_default = [(p.series, p.y) for p in points if p.record.method == "algm" and p.record.is_default]
    assert algm_default == [(OFF_THE_SHELF, 49.7), (TRAINED, 49.9)]
    # the baseline's trained head is its own head: one point
    assert [p.series for p in points if p.record.method == "none"] == [OFF_THE_SHELF]


def test_only_one_knob_sweeps_are_joined():
    settings = [
        {"tau": 0.9, "layers": "1,5", "batch_policy": "batch_min"},
        {"tau": 0.985, "layers": "1,5", "batch_policy": "batch_min"},  # the default, resolved
        {"tau": 0.95, "layers": "1,5", "batch_policy": "batch_min"},
        {"tau": 0.985, "layers": "1,5", "batch_policy": "per_image"},  # a string knob: no sweep
        {"tau": 0.9, "layers": "1,6", "batch_policy": "per_image"},  # two knobs from every other
    ]
    assert sweeps(settings) == [("tau", [0, 2, 1])]
    assert sweeps([{"policy": "variance"}, {"policy": "learned"}]) == []
    # numeric strings are numbers; a setting may lie on two sweeps
    hourglass = [{"alpha": 8, "clusters": "0.7"}, {"alpha": 5, "clusters": "0.7"}, {"alpha": 5, "clusters": "0.5"}]
    assert sweeps(hourglass) == [("alpha", [1, 0]), ("clusters", [2, 1])]
    assert sweeps([{"steps": "3"}, {"steps": "3,6"}]) == []
    assert sweeps([{"r": 8}]) == []


def test_labels_name_the_setting():
    rows = suite_records()
    assert [setting_label(r) for r in rows] == ["baseline", "tau=0.9", "default", "batch=8", "r=8",
                                                "policy=learned", "p0=0.9"]
    both = record("algm", {"batch_policy": "per_image"}, batch=8, gflops=1.0, miou=1.0, ims=None)
    assert setting_label(both) == "batch_policy=per_image, batch=8"


def test_stage_times_are_in_units_of_the_baseline_time():
    base, tau = suite_records()[:2]
    assert stage_times(base) == pytest.approx((0.02, 0.0, 0.98))
    fixed, overhead, blocks = stage_times(tau)  # 1.6x faster: 0.625 of the baseline's time
    assert (fixed, overhead) == pytest.approx((0.02, 0.05 * 0.625))
    assert fixed + overhead + blocks == pytest.approx(0.625)
    assert stage_times(suite_records(timed=False)[1]) is None


# ------------------------------------------------------------------------ gallery
def test_error_map_marks_exactly_the_wrong_scored_pixels():
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 11, (30, 40))
    wrong = rng.random((30, 40)) < 0.3
    ignored = rng.random((30, 40)) < 0.2
    pred = np.where(wrong, (truth + 1 + rng.integers(0, 10, truth.shape)) % 11, truth)
    truth = np.where(ignored, 11, truth)
    assert np.array_equal(error_mask(pred, truth, 11), wrong & ~ignored)
    rgb = error_map_rgb(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), pred, truth, 11)
    assert np.array_equal((rgb == ERROR_COLOR).all(-1), wrong & ~ignored)
    assert ((rgb == IGNORE_COLOR).all(-1)[ignored]).all()


def test_spread_frames_rule():
    names = {"val": [f"A_{i:03d}" for i in range(10)], "test": [f"B_{i:03d}" for i in range(4)] + ["C_000"]}
    assert spread_frames(names, 4) == [("val", "A_002"), ("val", "A_007"), ("test", "B_002"), ("test", "C_000")]
    assert spread_frames(names, 2) == [("val", "A_005"), ("test", "B_002")]  # the two longest sequences


@pytest.mark.skipif(not (CAMVID / "val.txt").is_file(), reason="CamVid lists not present")
def test_gallery_frames_come_from_every_held_out_sequence():
    lists = {split: (CAMVID / f"{split}.txt").read_text().split() for split in GALLERY_SPLITS}
    assert list(CAMVID_GALLERY_FRAMES) == spread_frames(lists, 4)
    held_out = {sequence(n) for names in lists.values() for n in names}
    chosen = [sequence(name) for _, name in CAMVID_GALLERY_FRAMES]
    assert set(chosen) == held_out and len(held_out) == 3  # val is one sequence, test two
    assert {sequence(n) for n in lists["val"]} == {"0016E5"}  # why test frames are in the gallery
    for (_, a), (_, b) in itertools.combinations(CAMVID_GALLERY_FRAMES, 2):
        if sequence(a) == sequence(b):  # far apart in the drive (frames numbered f00000, f00030, ...)
            assert abs(int(a.split("_f")[1]) - int(b.split("_f")[1])) > 1000


def test_label_view_is_the_region_window_view_shows():
    h, w, window = 70, 100, (64, 96)  # test scale 64 / 70: the view is 70 x 105, past the image's width
    label = torch.arange(h * w).reshape(h, w) % 11
    image = label.to(torch.uint8).mul(20).expand(3, h, w).contiguous()
    view, labels = window_view(image, window), label_view(label, window, ignore_index=11)
    assert labels.shape == view.shape[1:] == (70, 105)
    inside = labels != 11
    assert inside.sum() == h * w  # the whole image, padding ignored
    assert torch.equal(view[0][inside], labels[inside].to(torch.uint8) * 20)


def test_write_predictions_draws_every_model_on_every_frame(tmp_path):
    torch.manual_seed(0)
    cfg = ViTConfig("tiny", 64, 2, 2, 16, norm_eps=1e-5, pos_grid=(4, 4))
    model = build_segmenter(cfg, 11, DecoderConfig("mask", 2)).eval()
    models = method_variants(model, cfg, get_dataset("camvid"), ["none", "algm", "tome"])
    g = torch.Generator().manual_seed(0)
    frames = [(f"f{k}", torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=g),
               torch.randint(0, 12, (64, 64), generator=g)) for k in range(2)]
    path = write_predictions(models, frames, tmp_path / "p" / "predictions.png", get_dataset("camvid"),
                             window=(64, 64), caption="tiny model, synthetic frames")
    assert path == tmp_path / "p" / "predictions.png"
    with Image.open(path) as im:
        width, height = im.size
    assert width > height > 300  # 2 + 3 columns, 2 x 2 rows
    assert [p.name for p in (tmp_path / "p").iterdir()] == ["predictions.png"]
    with pytest.raises(ValueError, match="write_predictions: no frames"):
        write_predictions(models, [], tmp_path / "q.png", get_dataset("camvid"))
