"""Suite definitions: data (YAML under ``suites/``) loaded into frozen dataclasses.

A suite names a dataset, the backbones, the methods with their sweep settings and how
much of the split each measurement uses. ``load_suite("camvid")`` reads
``suites/camvid.yaml``; any other path to a YAML file works too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from algm.config import get_backbone, get_dataset
from algm.data.windows import BATCH_KINDS
from algm.methods import method_config, methods
from algm.safe_yaml import brief, clip, load_yaml
from algm.training.finetune import FinetuneConfig

SUITES_DIR = Path(__file__).resolve().parent
SUITE_KEYS = {"dataset", "split", "backbones", "decoder", "windows", "flops_images", "miou_images",
              "throughput", "window_batch_size", "published", "gallery", "methods", "finetune"}
PUBLISHED_CELLS = ("gflops", "miou", "speedup")
DECODERS = ("mask", "linear")


@dataclass(frozen=True)
class Throughput:
    """Timing settings; ``contended_retries``: re-timings of a CPU measurement that
    competed with other processes (see :func:`suites.measure._throughput`).
    ``min_images``: each batch size is timed for at least this many images per model, so
    the short forwards of small batches, the most disturbed, get more repeats
    (:meth:`repeats_at`). ``breakdown``: per-stage timing at the first batch size (the
    overhead and bound columns). ``attainable``: every reduced row also times a
    zero-cost reduction to its GFLOPs beside it (:mod:`algm.measure.attainable`, the
    attainable speed-up column)."""

    batch_sizes: tuple[int, ...] = (1, 8)
    batch_kind: str = "mixed"
    warmup: int = 3
    repeats: int = 5
    min_images: int = 0
    contended_retries: int = 2
    breakdown: bool = False
    attainable: bool = False

    def __post_init__(self):
        if not self.batch_sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1
                                       for b in self.batch_sizes):
            raise ValueError(f"throughput.batch_sizes must be whole numbers >= 1, got {brief(list(self.batch_sizes))}")
        if self.batch_kind not in BATCH_KINDS:
            raise ValueError(f"throughput.batch_kind must be one of {', '.join(BATCH_KINDS)}, "
                             f"got {self.batch_kind!r}")
        for name in ("warmup", "repeats", "min_images", "contended_retries"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"throughput.{name} must be a whole number, got {value!r}")
        for name in ("breakdown", "attainable"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"throughput.{name} must be true or false, got {getattr(self, name)!r}")
        if self.warmup < 0 or self.repeats < 1 or self.contended_retries < 0 or self.min_images < 0:
            raise ValueError("throughput: warmup, min_images and contended_retries must be >= 0, repeats >= 1")

    def repeats_at(self, batch_size: int) -> int:
        """Timed forwards per model at ``batch_size``."""
        return max(self.repeats, -(-self.min_images // batch_size))


@dataclass(frozen=True)
class Setting:
    """One row: a method with fixed knobs. ``train`` also trains a head with it active;
    ``batch`` (None: one image at a time) measures tokens, GFLOPs and mIoU on mixed
    batches of that many images and adds it to the timed batch sizes."""

    method: str
    options: dict = field(default_factory=dict)
    train: bool = False
    batch: int | None = None

    def label(self) -> str:
        knobs = {**self.options, **({"batch": self.batch} if self.batch is not None else {})}
        text = ", ".join(f"{k}={v}" for k, v in sorted(knobs.items()))
        return f"{self.method}({text})" if text else self.method


@dataclass(frozen=True)
class Suite:
    name: str
    dataset: str
    split: str
    backbones: tuple[str, ...]
    settings: tuple[Setting, ...]
    decoder: str = "mask"
    windows: dict = field(default_factory=dict)  # backbone -> (h, w); default: dataset's
    flops_images: int = 20
    miou_images: int | None = None
    throughput: Throughput = Throughput()
    window_batch_size: int = 1  # windows of one image per forward at evaluation (authors: 4)
    published: dict = field(default_factory=dict)  # backbone -> setting -> {gflops, miou, speedup}
    gallery: bool = False  # token-map gallery of fixed CamVid frames in the report
    # Fine-tune every backbone with ``none`` and with each setting marked ``train`` before
    # measuring (suites.runner.finetune_models); None: no fine-tuning.
    finetune: FinetuneConfig | None = None

    def window_for(self, backbone: str) -> tuple[int, int] | None:
        window = self.windows.get(backbone)
        return tuple(window) if window else None


def load_suite(name_or_path: str) -> Suite:
    """Read and validate a suite before any work: every value has its exact type (a
    boolean is ``true``/``false``, a list is a list), numbers are in range, names are
    known and no row or key is given twice. Errors are one line naming the file and the
    key."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = SUITES_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in SUITES_DIR.glob("*.yaml")))
        raise FileNotFoundError(f"no suite {name_or_path!r} ({path}); known suites: {known}")
    raw = load_yaml(path, "suite")
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: invalid suite: expected a mapping of keys, got {type(raw).__name__}")
    try:
        return _suite(path.stem, {k: v for k, v in raw.items() if v is not None})  # null: the default
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: invalid suite: {clip(err)}") from None


def _suite(name: str, raw: dict) -> Suite:
    """The suite of a parsed YAML mapping (keys with null values dropped), checked."""
    unknown = sorted(map(str, set(raw) - SUITE_KEYS))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(SUITE_KEYS))}")
    missing = [k for k in ("dataset", "backbones", "methods") if k not in raw]
    if missing:
        raise ValueError(f"missing key(s) {', '.join(missing)}")
    dataset = get_dataset(_text(raw["dataset"], "dataset")).name
    backbones = _names(raw["backbones"], "backbones")
    for b in backbones:
        get_backbone(b)
    settings = _settings(raw["methods"])
    return Suite(
        name=name, dataset=dataset, split=_text(raw.get("split", "val"), "split"),
        backbones=tuple(backbones), settings=tuple(settings),
        decoder=_choice(raw.get("decoder", "mask"), "decoder", DECODERS),
        windows=_windows(_mapping(raw.get("windows", {}), "windows"), backbones),
        flops_images=_whole(raw.get("flops_images", 20), "flops_images"),
        miou_images=_whole(raw["miou_images"], "miou_images") if "miou_images" in raw else None,
        throughput=_throughput(_mapping(raw.get("throughput", {}), "throughput")),
        window_batch_size=_whole(raw.get("window_batch_size", 1), "window_batch_size"),
        published=_published(_mapping(raw.get("published", {}), "published")),
        gallery=_flag(raw.get("gallery", False), "gallery"),
        finetune=_finetune(raw, settings),
    )


# ------------------------------------------------------------------ exact types
def _whole(value, key: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key} must be a whole number >= {minimum}, got {brief(value)}")
    return value


def _flag(value, key: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {brief(value)}")
    return value


def _text(value, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key} must be a name, got {brief(value)}")
    return value


def _choice(value, key: str, choices) -> str:
    if value not in choices or not isinstance(value, str):
        raise ValueError(f"{key} must be one of {', '.join(choices)}, got {brief(value)}")
    return value


def _mapping(value, key: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{key} must be a mapping of keys, got {type(value).__name__} {brief(value)}")
    return value


def _names(value, key: str) -> list[str]:
    """A non-empty list of distinct names."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{key} must be a list of names such as [a, b], got {brief(value)}")
    names = [_text(v, key) for v in value]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"{key} lists {twice[0]} twice")
    return names


def _windows(table: dict, backbones: list[str]) -> dict:
    """``{backbone: [h, w]}`` for backbones of the suite, sizes whole numbers >= 1."""
    windows = {}
    for backbone, window in table.items():
        if backbone not in backbones:
            raise ValueError(f"windows.{brief(backbone)}: not one of the suite's backbones "
                             f"({', '.join(backbones)})")
        if not isinstance(window, list) or len(window) != 2:
            raise ValueError(f"windows.{backbone} must be [h, w] in pixels, got {brief(window)}")
        windows[backbone] = [_whole(v, f"windows.{backbone}") for v in window]
    return windows


def _throughput(table: dict) -> Throughput:
    """The ``throughput`` mapping; ``batch_sizes`` a list of distinct sizes."""
    unknown = sorted(map(str, set(table) - set(Throughput.__dataclass_fields__)))
    if unknown:
        raise ValueError(f"throughput: unknown key(s) {', '.join(unknown)}; valid: "
                         f"{', '.join(Throughput.__dataclass_fields__)}")
    table = dict(table)
    if "batch_sizes" in table:
        sizes = table["batch_sizes"]
        if not isinstance(sizes, list):
            raise ValueError(f"throughput.batch_sizes must be a list such as [1, 8], got {brief(sizes)}")
        twice = sorted({b for b in sizes if sizes.count(b) > 1}, key=str)
        if twice:
            raise ValueError(f"throughput.batch_sizes lists {brief(twice[0])} twice")
        table["batch_sizes"] = tuple(sizes)
    return Throughput(**table)


def _settings(table) -> list[Setting]:
    """The rows of ``methods``: a mapping of method -> list of settings (null: [{}]);
    options are checked by the method, and no setting may appear twice."""
    if not isinstance(table, dict) or not table:
        raise ValueError("methods must map at least one method to its settings, e.g. none: [{}]")
    settings: list[Setting] = []
    for method, sweep in table.items():
        if method not in methods():
            raise ValueError(f"unknown method {brief(method)}; choose from {', '.join(methods())}")
        sweep = [{}] if sweep is None or sweep == [] else sweep
        if not isinstance(sweep, list):
            raise ValueError(f"methods.{method} must be a list of settings such as [{{}}], got {brief(sweep)}")
        for entry in sweep:
            entry = dict(_mapping({} if entry is None else entry, f"methods.{method}[]"))
            train = _flag(entry.pop("train", False), f"methods.{method}: train")
            batch = _batch(method, entry.pop("batch", None))
            try:  # option names and values, checked before any row runs
                method_config(method, **{str(k): v for k, v in entry.items()})
            except (TypeError, ValueError) as err:
                raise ValueError(f"methods.{method}: {clip(err)}") from None
            setting = Setting(method, entry, train, batch)
            if setting in settings:
                raise ValueError(f"methods.{method}: the setting {setting.label()} is given twice")
            settings.append(setting)
    return settings


def _finetune(raw: dict, settings: list[Setting]) -> FinetuneConfig | None:
    """The ``finetune:`` mapping as a :class:`FinetuneConfig`, checked against the
    backbones' depth and the checkpoint layout (one fine-tuned model per method)."""
    table = raw.get("finetune")
    if table is None:
        return None
    if not isinstance(table, dict):
        raise ValueError(f"finetune must be a mapping of {', '.join(FinetuneConfig.__dataclass_fields__)}")
    unknown = sorted(set(table) - set(FinetuneConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"finetune: unknown key(s) {', '.join(unknown)}; valid: "
                         f"{', '.join(FinetuneConfig.__dataclass_fields__)}")
    config = FinetuneConfig(**table)
    for b in raw["backbones"]:
        config.check_depth(get_backbone(b).depth, b)
    trained = [s.method for s in settings if s.train]
    twice = sorted({m for m in trained if trained.count(m) > 1})
    if twice:
        raise ValueError(f"finetune: methods.{twice[0]} marks more than one setting train; a suite "
                         f"fine-tunes one model per method (DIR/<dataset>/<backbone>/<method>/)")
    return config


def _batch(method: str, value) -> int | None:
    """A setting's reserved ``batch`` key: None (absent) or a whole number >= 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"methods.{method}: batch must be a whole number >= 1 (images per mixed batch), "
                         f"got {brief(value)}")
    return value


def _published(table: dict) -> dict:
    """``{backbone: {setting label: {gflops, miou, speedup}}}``, each cell a finite number >= 0."""
    for backbone, settings in table.items():
        for label, cells in _mapping(settings, f"published.{backbone}").items():
            where = f"published.{backbone}.{label}"
            unknown = sorted(map(str, set(_mapping(cells, where)) - set(PUBLISHED_CELLS)))
            if unknown:
                raise ValueError(f"{where}: unknown cell(s) {', '.join(unknown)}; "
                                 f"valid: {', '.join(PUBLISHED_CELLS)}")
            for cell, value in cells.items():
                if (isinstance(value, bool) or not isinstance(value, (int, float))
                        or not math.isfinite(value) or value < 0):
                    raise ValueError(f"{where}.{cell} must be a number >= 0, got {brief(value)}")
    return table
