"""Suite definitions: data (YAML under ``suites/``) loaded into frozen dataclasses.

A suite names a dataset, the backbones, the methods with their sweep settings and how
much of the split each measurement uses. ``load_suite("camvid")`` reads
``suites/camvid.yaml``; any other path to a YAML file works too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from algm.config import get_backbone, get_dataset
from algm.data.windows import BATCH_KINDS
from algm.methods import method_config, methods
from algm.training.finetune import FinetuneConfig

SUITES_DIR = Path(__file__).resolve().parent
SUITE_KEYS = {"dataset", "split", "backbones", "decoder", "windows", "flops_images", "miou_images",
              "throughput", "window_batch_size", "published", "gallery", "methods", "finetune"}
PUBLISHED_CELLS = ("gflops", "miou", "speedup")


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
        if not self.batch_sizes or any(not isinstance(b, int) or b < 1 for b in self.batch_sizes):
            raise ValueError(f"throughput.batch_sizes must be whole numbers >= 1, got {list(self.batch_sizes)}")
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
    """Read and validate a suite; errors name the file and the offending entry."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = SUITES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SUITES_DIR.glob("*.yaml")))
        raise FileNotFoundError(f"no suite {name_or_path!r} ({path}); known suites: {known}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: invalid suite: expected a mapping of keys, got {type(raw).__name__}")
    try:
        unknown = sorted(set(raw) - SUITE_KEYS)
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(SUITE_KEYS))}")
        get_dataset(raw["dataset"])
        for b in raw["backbones"]:
            get_backbone(b)
        settings = []
        if not isinstance(raw["methods"], dict) or not raw["methods"]:
            raise ValueError("methods must map at least one method to its settings, e.g. none: [{}]")
        for method, sweep in raw["methods"].items():
            if method not in methods():
                raise ValueError(f"unknown method {method!r}; choose from {', '.join(methods())}")
            for entry in sweep or [{}]:
                entry = dict(entry or {})
                train = bool(entry.pop("train", False))
                batch = _batch(method, entry.pop("batch", None))
                method_config(method, **entry)  # option names and values, checked before any row runs
                settings.append(Setting(method, entry, train, batch))
        windows = {b: [int(v) for v in w] for b, w in (raw.get("windows") or {}).items()}
        return Suite(
            name=path.stem, dataset=raw["dataset"], split=raw.get("split", "val"),
            backbones=tuple(raw["backbones"]), settings=tuple(settings),
            decoder=raw.get("decoder", "mask"),
            windows=windows,
            flops_images=int(raw.get("flops_images", 20)),
            miou_images=raw.get("miou_images"),
            throughput=Throughput(**{k: tuple(v) if isinstance(v, list) else v
                                     for k, v in raw.get("throughput", {}).items()}),
            window_batch_size=int(raw.get("window_batch_size", 1)),
            published=_published(raw.get("published") or {}),
            gallery=bool(raw.get("gallery", False)),
            finetune=_finetune(raw, settings),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: invalid suite: {err}") from None


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
                         f"got {value!r}")
    return value


def _published(table: dict) -> dict:
    """``{backbone: {setting label: {gflops, miou, speedup}}}``; unknown cells are errors."""
    for backbone, settings in table.items():
        for label, cells in settings.items():
            unknown = sorted(set(cells) - set(PUBLISHED_CELLS))
            if unknown:
                raise ValueError(f"published.{backbone}.{label}: unknown cell(s) {', '.join(unknown)}; "
                                 f"valid: {', '.join(PUBLISHED_CELLS)}")
    return table
