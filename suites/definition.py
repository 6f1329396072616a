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

SUITES_DIR = Path(__file__).resolve().parent
SUITE_KEYS = {"dataset", "split", "backbones", "decoder", "windows", "flops_images", "miou_images",
              "throughput", "window_batch_size", "published", "gallery", "methods"}
PUBLISHED_CELLS = ("gflops", "miou", "speedup")


@dataclass(frozen=True)
class Throughput:
    """Timing settings; ``contended_retries``: re-timings of a CPU measurement that
    competed with other processes (see :func:`suites.runner._throughput`)."""

    batch_sizes: tuple[int, ...] = (1, 8)
    batch_kind: str = "mixed"
    warmup: int = 3
    repeats: int = 5
    contended_retries: int = 2
    breakdown: bool = False  # per-stage timing at the first batch size: overhead and bound columns

    def __post_init__(self):
        if not self.batch_sizes or any(not isinstance(b, int) or b < 1 for b in self.batch_sizes):
            raise ValueError(f"throughput.batch_sizes must be whole numbers >= 1, got {list(self.batch_sizes)}")
        if self.batch_kind not in BATCH_KINDS:
            raise ValueError(f"throughput.batch_kind must be one of {', '.join(BATCH_KINDS)}, "
                             f"got {self.batch_kind!r}")
        if self.warmup < 0 or self.repeats < 1 or self.contended_retries < 0:
            raise ValueError("throughput: warmup and contended_retries must be >= 0, repeats >= 1")


@dataclass(frozen=True)
class Setting:
    """One row: a method with fixed knobs. ``train`` also trains a head with it active."""

    method: str
    options: dict = field(default_factory=dict)
    train: bool = False

    def label(self) -> str:
        knobs = ", ".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.method}({knobs})" if knobs else self.method


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
                method_config(method, **entry)  # option names and values, checked before any row runs
                settings.append(Setting(method, entry, train))
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
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: invalid suite: {err}") from None


def _published(table: dict) -> dict:
    """``{backbone: {setting label: {gflops, miou, speedup}}}``; unknown cells are errors."""
    for backbone, settings in table.items():
        for label, cells in settings.items():
            unknown = sorted(set(cells) - set(PUBLISHED_CELLS))
            if unknown:
                raise ValueError(f"published.{backbone}.{label}: unknown cell(s) {', '.join(unknown)}; "
                                 f"valid: {', '.join(PUBLISHED_CELLS)}")
    return table
