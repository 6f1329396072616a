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
from algm.methods import METHODS

SUITES_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Throughput:
    """Timing settings; ``contended_retries``: re-timings of a CPU measurement that
    competed with other processes (see :func:`suites.runner._throughput`)."""

    batch_sizes: tuple[int, ...] = (1, 8)
    batch_kind: str = "mixed"
    warmup: int = 3
    repeats: int = 5
    contended_retries: int = 2


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
    published_flops: dict = field(default_factory=dict)
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
    raw = yaml.safe_load(path.read_text())
    try:
        get_dataset(raw["dataset"])
        for b in raw["backbones"]:
            get_backbone(b)
        settings = []
        for method, sweep in raw["methods"].items():
            if method not in METHODS:
                raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
            for entry in sweep or [{}]:
                entry = dict(entry or {})
                train = bool(entry.pop("train", False))
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
            published_flops=raw.get("published_flops", {}) or {},
            gallery=bool(raw.get("gallery", False)),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: invalid suite: {err}") from None
