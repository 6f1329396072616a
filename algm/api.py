"""The small public Python API (``from algm import ...``); docs/api.md shows it at work.

Every function takes a :class:`~algm.model.segmenter.Segmenter` whose encoder is the
hook-point ViT (:class:`~algm.model.vit.ViTEncoder`): one built by name, loaded from a
checkpoint, or made from your own encoder (a ``ViTEncoder`` or a timm plain ViT) with
:func:`segmenter_from_encoder`. Images are (B, 3, H, W) float tensors normalised with
``model.encoder.cfg.mean`` / ``std``, H and W multiples of the patch size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from torch import Tensor, nn

from algm.build import Setup, make_setup
from algm.config import DecoderConfig, get_dataset
from algm.methods import build_method
from algm.model.segmenter import Segmenter, build_segmenter
from algm.model.vit import ViTEncoder


def load_model(backbone: str | None = None, dataset: str | None = None, **options) -> Setup:
    """A Segmenter without token reduction and the facts to feed it (``.model``,
    ``.window`` (H, W), ``.stride``, ``.dataset``, ``.backbone``).

    backbone: ``vit-s16`` ... or ``timm:<model>``; options as
    :func:`algm.build.make_setup`: ``pretrained``, ``weights`` (a timm state dict),
    ``checkpoint`` (official, or mmseg's with ``mmseg_config``), ``window``, ``decoder``,
    ``trusted``."""
    return make_setup(backbone, dataset, "none", **options)


def segmenter_from_encoder(encoder: nn.Module, n_cls: int, decoder: str = "mask") -> Segmenter:
    """A Segmenter on your encoder, with a randomly initialised ``decoder`` ("mask" or
    "linear") for ``n_cls`` classes. ``encoder`` is a :class:`ViTEncoder` (used as is)
    or a timm ``VisionTransformer`` (its weights copied into a ViTEncoder; what the hook
    points cannot represent is refused, naming the feature)."""
    if not isinstance(encoder, ViTEncoder):
        from algm.weights.timm import encoder_from_timm

        encoder = encoder_from_timm(encoder)
    model = build_segmenter(encoder.cfg, n_cls, DecoderConfig(decoder))
    model.encoder = encoder
    return model.eval()


def apply_method(model: Segmenter, method: str, dataset: str = "camvid", **options) -> Segmenter:
    """``model`` (encoder and decoder shared, not copied) driven by the registered method
    ``method`` (``algm``, ``tome`` ...: :func:`algm.methods.methods`, or ``algm-bench flops
    --help``) with its ``options``; ``dataset`` picks dataset-dependent defaults."""
    return model.with_method(build_method(method, model.encoder.cfg, get_dataset(dataset), **options))


def count_gflops(model: Segmenter, images: Tensor) -> float:
    """Mean GFLOPs per image of ``model`` over ``images`` (B, 3, H, W), each image traced
    alone (fvcore, fused attention counted)."""
    from algm.measure.flops import average_flops

    return average_flops(model, [image[None] for image in images])[0]


def compare_speed(models: Mapping[str, Segmenter], batch: Tensor, warmup: int = 5,
                  repeats: int = 10) -> dict[str, dict]:
    """Time the models interleaved on the same ``batch`` (B, 3, H, W) (each repeat runs
    every model once in turn, so a change in the machine's speed hits all alike) and
    return ``{name: {"images_per_s": ..., "speedup": ...}}``, the speed-up over the first
    model. Runs on ``batch``'s device; move the models there first."""
    from algm.measure.throughput import measure_interleaved

    results = measure_interleaved(list(models.values()), batch, warmup, repeats)
    base = results[0].images_per_s
    return {name: {"images_per_s": r.images_per_s, "speedup": r.images_per_s / base}
            for name, r in zip(models, results)}


def evaluate_miou(model: Segmenter, dataset: str = "camvid", split: str = "val",
                  root: str | Path | None = None, limit: int | None = None,
                  window: tuple[int, int] | None = None, stride: tuple[int, int] | None = None):
    """Sliding-window mIoU (a :class:`~algm.measure.miou.MIoUResult`: ``miou``, ``acc``,
    ``n_images``) of ``model`` on a dataset split under ``root`` (default: the suite's data
    root); ``window`` (H, W) defaults to the dataset's for the model's patch size."""
    from algm.data.datasets import build_dataset
    from algm.evaluate import evaluate

    spec = get_dataset(dataset)
    window = tuple(window) if window is not None else spec.window(model.encoder.cfg.patch_size)
    data = build_dataset(dataset, split, root=root, limit=limit)
    return evaluate(model, data, window, stride, limit=limit, progress=False)
