"""Suite definitions, row caching keys and reports."""

import dataclasses
import math
import os

import pytest
import torch
import yaml

from algm.config import get_backbone, get_dataset
from algm.methods import build_method
from suites.definition import Setting, Suite, load_suite
from suites.records import RowRecord, efficiency, speedup_bound_of
from suites.report import reproduction_table
from suites.tables import latex_table, markdown_table
from suites.plan import Row, RunOptions
from suites.runner import row_key


@pytest.mark.parametrize("name", ["camvid", "ade20k", "cityscapes", "pascal", "cocostuff"])
def test_every_shipped_suite_loads(name):
    suite = load_suite(name)
    assert suite.dataset == name
    assert any(s.method == "none" for s in suite.settings)


def test_suite_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="known suites: .*camvid"):
        load_suite("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: camvid\nbackbones: [vit-s14]\nmethods: {magic: [{}]}\n")
    with pytest.raises(ValueError, match="bad.yaml.*unknown method 'magic'"):
        load_suite(str(bad))
    bad.write_text("dataset: camvid\nbackbones: [vit-xxl]\nmethods: {none: [{}]}\n")
    with pytest.raises(ValueError, match="unknown backbone 'vit-xxl'"):
        load_suite(str(bad))
    # method options are checked when the suite is read, before any row runs
    bad.write_text("dataset: camvid\nbackbones: [vit-s14]\nmethods: {algm: [{tau: high}]}\n")
    with pytest.raises(ValueError, match="bad.yaml.*tau must be a number"):
        load_suite(str(bad))
    bad.write_text("dataset: camvid\nbackbones: [vit-s14]\nmethods: {algm: [{rr: 3}]}\n")
    with pytest.raises(ValueError, match=r"bad.yaml.*method 'algm' has no option\(s\) \['rr'\]"):
        load_suite(str(bad))


OK = "dataset: camvid\nbackbones: [vit-s14]\nmethods: {none: [{}]}\n"  # a valid suite to add a key to


@pytest.mark.parametrize("text,message", [
    ("dataset: camvid\nbackbones: [vit-s14]\nmethods: {none: [{}]}\nflops_image: 3\n",
     "unknown key(s) flops_image"),
    ("dataset: camvid\nbackbones: [vit-s14]\nmethods: {}\n", "methods must map at least one method"),
    ("dataset: camvid\nbackbones: [vit-s14]\nmethods: []\n", "methods must map at least one method"),
    ("dataset: camvid\nbackbones: [vit-s14\nmethods: {none: [{}]}\n", "not valid YAML"),
    ("dataset: camvid\nbackbones: [vit-s14]\nmethods: {none: [{}]}\nthroughput: {batch_sizes: [0]}\n",
     "throughput.batch_sizes must be whole numbers >= 1, got [0]"),
    ("- just a list\n", "expected a mapping of keys"),
    # exact types, ranges and duplicates, each naming its key (issue 27)
    (OK + "throughput: [1, 8]\n", "throughput must be a mapping of keys, got list [1, 8]"),
    (OK + "published: [vit-s14]\n", "published must be a mapping of keys, got list ['vit-s14']"),
    ("dataset: camvid\nbackbones: vit-s16\nmethods: {none: [{}]}\n",
     "backbones must be a list of names such as [a, b], got 'vit-s16'"),
    ("dataset: camvid\nbackbones: [vit-s14, vit-s14]\nmethods: {none: [{}]}\n", "backbones lists vit-s14 twice"),
    (OK + 'gallery: "no"\n', "gallery must be true or false, got 'no'"),
    ("dataset: camvid\nbackbones: [vit-s14]\nmethods: {algm: [{train: \"false\"}]}\n",
     "methods.algm: train must be true or false, got 'false'"),
    (OK + "miou_images: all\n", "miou_images must be a whole number >= 1, got 'all'"),
    (OK + "window_batch_size: 0\n", "window_batch_size must be a whole number >= 1, got 0"),
    (OK + "flops_images: -3\n", "flops_images must be a whole number >= 1, got -3"),
    (OK + "decoder: foo\n", "decoder must be one of mask, linear, got 'foo'"),
    (OK + "throughput: {batch_sizes: 4}\n", "throughput.batch_sizes must be a list such as [1, 8], got 4"),
    (OK + "throughput: {batch_sizes: [true]}\n", "throughput.batch_sizes must be whole numbers >= 1, got [True]"),
    (OK + "windows: {vit-s14: 336}\n", "windows.vit-s14 must be [h, w] in pixels, got 336"),
    (OK + "published: {vit-s14: {none: {gflops: .inf}}}\n",
     "published.vit-s14.none.gflops must be a number >= 0, got inf"),
    ("dataset: camvid\nbackbones: [vit-s14]\nmethods: {algm: [{tau: 0.9}, {tau: 0.9}]}\n",
     "methods.algm: the setting algm(tau=0.9) is given twice"),
    (OK + "methods: {tome: [{}]}\n", "not valid YAML: key 'methods' is given twice (line 4, column 1)"),
    ("dataset: camvid\nbackbones: [vit-s14]\nmethods: {none: [{}]}\n" + "x: " + "w" * 5000 + "\n",
     "unknown key(s) x; valid:"),
    ("a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\ndataset: camvid\nbackbones: [vit-s14]\n"
     "methods: {algm: [{tau: *c}]}\n", "not valid YAML: aliases (*name) are not allowed here (line 2, column 8)"),
    (b"dataset: camvid\x00\x01\x02", "not valid YAML: unacceptable character #x0000: special characters"),
    (b"\x89PNG\r\n\x1a\n\x00", "not UTF-8 text (byte 0x89 at offset 0); is this suite a binary file?"),
])
def test_a_bad_suite_is_one_error_naming_the_file(tmp_path, text, message):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError) as err:
        load_suite(str(bad))
    assert str(bad) in str(err.value) and message in str(err.value) and "\n" not in str(err.value)
    assert len(str(err.value)) <= 500 + len(str(bad))  # a long value is never printed whole


def test_a_suite_that_is_no_regular_file_is_refused_without_reading(tmp_path):
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)  # opening it for reading would block forever
    with pytest.raises(ValueError) as err:
        load_suite(str(fifo))
    assert str(err.value) == (f"{fifo}: not a regular file (a FIFO); the suite must be a file (reading "
                              f"this could block or never end)")


def key(suite, row, opts):
    """The row key as the runner computes it, from the identity of the row's method."""
    method = build_method(row.setting.method, get_backbone(row.backbone), get_dataset(suite.dataset),
                          **row.setting.options)
    return row_key(suite, row, opts, method.identity())


def test_row_key_changes_with_every_knob(tmp_path):
    suite = load_suite("camvid")
    opts = RunOptions()
    a = key(suite, Row("vit-s14", Setting("algm", {"tau": 0.9})), opts)
    assert a == key(suite, Row("vit-s14", Setting("algm", {"tau": 0.9})), opts)
    assert a != key(suite, Row("vit-s14", Setting("algm", {"tau": 0.91})), opts)
    assert a != key(suite, Row("vit-s14", Setting("algm", {"tau": 0.9}, train=True)), opts)
    assert a != key(suite, Row("vit-s14", Setting("algm", {"tau": 0.9})), RunOptions(device="cuda"))
    assert a != key(dataclasses.replace(suite, window_batch_size=4), Row("vit-s14", Setting("algm", {"tau": 0.9})), opts)
    fewer = dataclasses.replace(suite.throughput, min_images=suite.throughput.min_images // 2)
    assert a != key(dataclasses.replace(suite, throughput=fewer), Row("vit-s14", Setting("algm", {"tau": 0.9})), opts)
    ckpt = tmp_path / "checkpoint.pth"
    ckpt.write_bytes(b"one")
    with_ckpt = key(suite, Row("vit-s14", Setting("algm"), ckpt, ckpt), opts)
    ckpt.write_bytes(b"two!")  # other weights, same file name: another row
    assert with_ckpt != key(suite, Row("vit-s14", Setting("algm"), ckpt, ckpt), opts)


def test_row_key_follows_the_method_identity(tmp_path, monkeypatch):
    """A changed per-backbone default or a part retrained into the same file gives a
    new row key (the key hashes the built method's identity, not the YAML options)."""
    import algm.algm
    from baselines.prune import TokenPruning, new_heads
    from baselines import prune

    suite, opts = load_suite("camvid"), RunOptions()
    row = Row("vit-s14", Setting("algm"))
    before = key(suite, row, opts)
    monkeypatch.setitem(algm.algm.TAU, ("camvid", "vit-s14"), 0.97)
    assert key(suite, row, opts) != before

    heads = tmp_path / "heads.pt"
    backbone, dataset = get_backbone("vit-s14"), get_dataset("camvid")

    def write_heads(seed):
        torch.manual_seed(seed)
        meta = {"backbone": backbone.name, "embed_dim": backbone.embed_dim, "n_cls": dataset.n_cls,
                "exit_layers": [6, 8]}
        torch.save({"format": prune.HEADS_FORMAT, "meta": meta,
                    "state_dict": new_heads(backbone.embed_dim, dataset.n_cls, 2).state_dict()}, heads)

    pruned = Row("vit-s14", Setting("prune", {"heads_file": str(heads)}))
    write_heads(0)
    first = key(suite, pruned, opts)
    assert key(suite, pruned, opts) == first
    write_heads(1)  # retrained into the same path
    assert key(suite, pruned, opts) != first
    assert isinstance(build_method("prune", backbone, dataset, heads_file=str(heads)), TokenPruning)


def test_batched_settings_add_a_key_only_where_set():
    """A ``batch`` setting hashes its batch; every other row keeps its key (literals from
    the code that keyed rows by the method's identity)."""
    suite = Suite(name="mini", dataset="camvid", split="val", backbones=("vit-s14",), settings=())
    opts = RunOptions()
    old = [(Setting("none"), "36a85429c90e2fdc"), (Setting("algm", {"tau": 0.9}), "522107849afe307f"),
           (Setting("algm", train=True), "bb7497cb431186f7")]
    assert [key(suite, Row("vit-s14", s), opts) for s, _ in old] == [key for _, key in old]
    keys = {key(suite, Row("vit-s14", Setting("algm", {"tau": 0.9}, batch=b)), opts) for b in (4, 8)}
    assert len(keys | {old[1][1]}) == 3
    assert Setting("algm", {"batch_policy": "per_image"}, batch=8).label() == "algm(batch=8, batch_policy=per_image)"
    assert Setting("algm", {"tau": 0.9}).label() == "algm(tau=0.9)"


def test_small_batches_are_timed_for_at_least_min_images():
    from suites.definition import Throughput

    tp = Throughput((1, 4, 8), repeats=5, min_images=20)
    assert [tp.repeats_at(b) for b in (1, 3, 4, 8, 64)] == [20, 7, 5, 5, 5]
    assert Throughput(repeats=5).repeats_at(1) == 5
    with pytest.raises(ValueError, match="min_images"):
        Throughput(min_images=-1)
    for bad in (2.5, "20", True):
        with pytest.raises(ValueError) as err:
            Throughput(min_images=bad)
        assert str(err.value) == f"throughput.min_images must be a whole number, got {bad!r}"
    with pytest.raises(ValueError, match=r"throughput.repeats must be a whole number, got 2.5"):
        Throughput(repeats=2.5)


def test_batch_key_is_read_and_checked(tmp_path):
    path = tmp_path / "b.yaml"
    path.write_text("dataset: camvid\nbackbones: [vit-s14]\nthroughput: {batch_sizes: [1, 4]}\n"
                    "methods: {algm: [{batch: 8}, {batch: 4, batch_policy: per_image, train: true}, {}]}\n")
    settings = load_suite(str(path)).settings
    assert settings == (Setting("algm", {}, False, 8), Setting("algm", {"batch_policy": "per_image"}, True, 4),
                        Setting("algm"))
    from suites.measure import timed_sizes
    assert [timed_sizes(load_suite(str(path)), s) for s in settings] == [(1, 4, 8), (1, 4), (1, 4)]
    for bad in ("0", "-2", "2.5", "true", "eight"):
        path.write_text(f"dataset: camvid\nbackbones: [vit-s14]\nmethods: {{algm: [{{batch: {bad}}}]}}\n")
        with pytest.raises(ValueError) as err:
            load_suite(str(path))
        assert str(err.value) == (f"{path}: invalid suite: methods.algm: batch must be a whole number >= 1 "
                                  f"(images per mixed batch), got {yaml.safe_load(bad)!r}")


ROWS = [
    dict(dataset="camvid", backbone="vit-s14", method="none", setting="none", gflops=40.0, ims_b1=10.0, ims_b8=12.0,
         miou=60.0, miou_trained=60.0, tokens_kept_pct=100.0),
    dict(dataset="camvid", backbone="vit-s14", method="algm", setting="algm(tau=0.9)", options={"tau": 0.9}, gflops=30.0, ims_b1=12.0,
         ims_b8=15.0, miou=58.0, miou_trained=59.5, tokens_kept_pct=60.0),
    dict(dataset="camvid", backbone="vit-s14", method="tome", setting="tome(r=8)", options={"r": 8}, gflops=20.0, ims_b1=11.0,
         ims_b8=16.0, miou=55.0, miou_trained=math.nan, tokens_kept_pct=40.0),
]


def test_contended_throughput_is_retimed(monkeypatch):
    """A CPU timing that competed with other processes is repeated; the least disturbed
    one is kept and still flagged when no retry was clean. Methods are timed interleaved
    with the baseline, whose rate is kept beside theirs."""
    import torch

    import suites.measure as measure
    from algm.measure.throughput import ThroughputResult
    from suites.definition import Throughput

    utilisations = iter([(0.3, 0.9), (0.5, 0.6), (0.4, 0.9)])
    calls = []

    def fake_measure(models, batch, warmup, repeats):
        calls.append(len(models))
        return [ThroughputResult(10 * u, 10 * u, 0.0, 0.1, 0.1, 1, repeats, warmup, "cpu", "fp32",
                                 cpu_utilisation=u) for u in next(utilisations)[:len(models)]]

    monkeypatch.setattr(measure, "measure_interleaved", fake_measure)

    class FakeSetup:
        def __init__(self):
            self.model = torch.nn.Identity()

        def batch(self, *args):
            return torch.zeros(1, 3, 4, 4)

    suite = dataclasses.replace(load_suite("camvid"), throughput=Throughput((1,), contended_retries=2))
    method, baseline = FakeSetup(), FakeSetup()
    row = measure._throughput(suite, method, baseline, 1, RunOptions())
    assert calls == [2, 2, 2] and row["cpu_util_b1"] == 0.5 and row["contended_b1"] is True
    assert row["ims_b1"] == 5.0 and row["base_ims_b1"] == 6.0
    utilisations = iter([(0.95,)])
    calls.clear()
    row = measure._throughput(suite, baseline, baseline, 1, RunOptions())
    assert calls == [1] and row["contended_b1"] is False and "base_ims_b1" not in row


def test_attainable_times_a_zero_cost_reduction_to_the_timed_gflops_beside_the_row(monkeypatch):
    import torch

    import suites.measure as measure
    from algm.config import DecoderConfig, ViTConfig
    from algm.measure.attainable import ZeroCostReduction
    from algm.measure.flops import count_flops
    from algm.measure.throughput import ThroughputResult
    from algm.model.segmenter import build_segmenter
    from suites.definition import Throughput

    timed = []

    def fake_measure(models, batch, warmup, repeats):
        timed.append(models)
        return [ThroughputResult(r, r, 0.0, 0.1, 0.1, 1, repeats, warmup, "cpu", "fp32", cpu_utilisation=1.0)
                for r in (12.0, 10.0, 14.0)[:len(models)]]

    monkeypatch.setattr(measure, "measure_interleaved", fake_measure)
    torch.manual_seed(0)
    cfg = ViTConfig("tiny", 64, 3, 2, 16, pos_grid=(4, 4))
    base = build_segmenter(cfg, 5, DecoderConfig("mask")).eval()

    class TinySetup:
        def __init__(self, model):
            self.model = model

        def batch(self, *args):
            return torch.randn(2, 3, 64, 96)

    method = TinySetup(base.with_method(ZeroCostReduction(10)))  # stands in for a reducing method
    suite = dataclasses.replace(load_suite("camvid"), throughput=Throughput((2,), attainable=True))
    row = measure._throughput(suite, method, TinySetup(base), 2, RunOptions())
    models = timed[0]
    assert len(models) == 3 and models[1] is base and models[2].encoder is base.encoder
    assert models[2].method.k == 10 and row["attainable_tokens_b2"] == 11  # same GFLOPs: same k, + cls
    assert row["attainable_ims_b2"] == 14.0 and row["timed_gflops_b2"] == pytest.approx(
        count_flops(method.model, torch.randn(2, 3, 64, 96)) / 2)
    timed.clear()
    alone = TinySetup(base)
    row = measure._throughput(suite, alone, alone, 2, RunOptions())
    assert [len(m) for m in timed] == [1] and "attainable_ims_b2" not in row  # none has nothing to attain


def test_stale_sizes_are_contended_lack_their_timed_gflops_or_used_another_allocator():
    from algm.measure.allocator import POLICY
    from suites.definition import Throughput
    from suites.measure import stale_sizes

    suite = Suite(name="mini", dataset="camvid", split="val", backbones=("vit-s14",), settings=())
    row = dict(method="algm", ims_b1=1.0, timed_gflops_b1=2.0, contended_b1=False, ims_b4=1.0,
               contended_b4=False, ims_b8=1.0, timed_gflops_b8=2.0, contended_b8=True, ims_b1_median=1.0,
               cpu_allocator=POLICY)
    assert stale_sizes(row, suite) == [4, 8]
    clean = dict(row, timed_gflops_b4=2.0, contended_b8=False)
    assert stale_sizes(clean, suite) == []
    assert stale_sizes(dict(clean, cpu_allocator="other"), suite) == [1, 4, 8]
    assert stale_sizes({"gflops": 1.0}, suite) == []  # a GFLOPs-only row has nothing to time
    # a suite that asks for the attainable speed-up re-times reduced rows that lack it
    asks = dataclasses.replace(suite, throughput=Throughput(attainable=True))
    assert stale_sizes(clean, asks) == [1, 4, 8]
    assert stale_sizes(dict(clean, attainable_ims_b1=1.0, attainable_ims_b8=1.0), asks) == [4]
    assert stale_sizes(dict(clean, method="none"), asks) == []


def test_attainable_is_a_switch_that_leaves_row_keys_alone():
    from suites.definition import Throughput

    suite = load_suite("camvid")
    assert suite.throughput.attainable
    row = Row("vit-s14", Setting("algm", {"tau": 0.9}))
    off = dataclasses.replace(suite, throughput=dataclasses.replace(suite.throughput, attainable=False))
    assert key(suite, row, RunOptions()) == key(off, row, RunOptions())
    for name in ("attainable", "breakdown"):
        with pytest.raises(ValueError) as err:
            Throughput(**{name: "yes"})
        assert str(err.value) == f"throughput.{name} must be true or false, got 'yes'"


def records(rows):
    return [RowRecord.from_row(r) for r in rows]


def test_reproduction_table_skips_rows_without_published_value():
    rows = [dict(r, base_ims_b8=12.0) if r["method"] != "none" else r for r in ROWS]
    text = reproduction_table(records(rows), {"vit-s14": {"algm(tau=0.9)": {"gflops": 26.3, "miou": 59.0,
                                                                         "speedup": 1.5}}})
    assert "| vit-s14 | algm(tau=0.9) |  | GFLOPs | 30.00 | 26.3 | 1.1407 | +3.70 |" in text
    assert "| vit-s14 | algm(tau=0.9) |  | mIoU | 58.00 | 59.0 | 0.9831 | -1.00 |" in text
    assert "| vit-s14 | algm(tau=0.9) |  | speed-up b8 | 1.25 | 1.5 | 0.8333 | -0.25 |" in text
    assert "tome" not in text


def test_trained_checkpoint_rows_compare_their_own_miou_and_name_their_weights():
    rows = [dict(r, weights="checkpoint", checkpoint="/c/ade20k/vit-s14/none/checkpoint.pth",
                 checkpoint_sha256="0123456789ab", trained_with_method=False) for r in ROWS[:2]]
    rows.append(dict(ROWS[1], weights="checkpoint", checkpoint="/c/ade20k/vit-s14/algm/checkpoint.pth",
                     checkpoint_sha256="ba9876543210", trained_with_method=True, miou=math.nan,
                     miou_trained=61.0))
    text = reproduction_table(records(rows), {"vit-s14": {"algm(tau=0.9)": {"miou": 60.0}}})
    assert "| none/checkpoint.pth 0123456789ab | mIoU | 58.00 | 60.0 |" in text
    assert "| algm/checkpoint.pth ba9876543210, trained with the method | mIoU | 61.00 | 60.0 |" in text
    md = markdown_table(records(rows))
    assert "| tau=0.9, trained model | 30.00 (-25.0 %) |" in md and "61.0 (+1.0)" in md


def test_contended_timings_are_marked_with_a_note():
    rows = [dict(r, base_ims_b1=10.0, base_ims_b8=12.0) if r["method"] != "none" else dict(r) for r in ROWS]
    assert "†" not in markdown_table(records(rows))
    rows[2].update(contended_b1=True, contended_b8=False)
    md = markdown_table(records(rows))
    tome = next(line for line in md.splitlines() if "| r=8 |" in line)
    assert "11.00†" in tome and "1.10×†" in tome and "16.00†" not in tome
    assert md.count("†") == 3 and "competed for the CPU" in md
    tex = latex_table(records(rows), "c", "tab:t")
    assert r"11.00$^\dagger$" in tex and r"$^\dagger$ timed while" in tex


def test_efficiency_and_bound_use_the_gflops_of_the_timed_batch():
    rows = [dict(ROWS[0], timed_gflops_b1=40.0, breakdown_batch=1, fixed_share=0.1),
            dict(ROWS[1], base_ims_b1=10.0, timed_gflops_b1=32.0, breakdown_batch=1, fixed_share=0.2,
                 overhead_share=0.01)]
    base, algm = records(rows)
    # speed-up 12 / 10 over a GFLOPs ratio of 40 / 32 (the row's mean over frames is 30)
    assert efficiency(algm, base, 1) == pytest.approx(1.2 * 32 / 40)
    assert efficiency(base, base, 1) == pytest.approx(1.0)
    assert math.isnan(efficiency(algm, base, 8))  # no timed GFLOPs at b8: no ratio rather than a wrong one
    assert speedup_bound_of(algm, base) == pytest.approx(1 / (0.2 + 0.8 * 32 / 40))
    # rows cached before timed GFLOPs were recorded: the bound falls back to the row's GFLOPs
    old = RowRecord.from_row({k: v for k, v in rows[1].items() if k != "timed_gflops_b1"})
    assert speedup_bound_of(old, base) == pytest.approx(1 / (0.2 + 0.8 * 30 / 40))


def test_random_weight_rows_are_seeded():
    """Random encoders are the same in every run (an adaptive method's GFLOPs depend on
    them), and building one leaves the global RNG alone."""
    import torch

    from suites.measure import setup_for

    suite = load_suite("pascal")
    state = torch.random.get_rng_state()
    a = setup_for(suite, "vit-ti16", Setting("algm"), pretrained=False).model.state_dict()
    b = setup_for(suite, "vit-ti16", Setting("algm"), pretrained=False).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(torch.random.get_rng_state(), state)
