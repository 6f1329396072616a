"""Small models and input batches shared by the method tests."""

from __future__ import annotations

import torch

from algm.config import DecoderConfig, ViTConfig, get_dataset
from algm.methods import build_method
from algm.model.segmenter import build_segmenter
from algm.reduction import NoReduction, TokenState

CAMVID = get_dataset("camvid")
TINY = ViTConfig("tiny", 64, 4, 2, 16, pos_grid=(4, 4))  # 4 blocks, 16 px patches, 64 dims


def tiny_segmenter(backbone: ViTConfig = TINY, n_cls: int = 5):
    """A seeded random Segmenter (mask decoder, no reduction) in eval mode."""
    torch.manual_seed(0)
    return build_segmenter(backbone, n_cls, DecoderConfig("mask"), NoReduction()).eval()


def with_registered(model, name: str, **options):
    """``model`` with the registered method ``name`` built for :data:`TINY` on CamVid."""
    return model.with_method(build_method(name, TINY, CAMVID, **options))


def run(model, x: torch.Tensor):
    """``model.run(x)`` without gradients."""
    with torch.no_grad():
        return model.run(x)


def encode(model, x: torch.Tensor) -> TokenState:
    """The encoder's final :class:`TokenState` for ``x`` under ``model.method``."""
    with torch.no_grad():
        return model.encoder(x, model.method)[0]


def textured_images(kind: str = "mixed", hw=(64, 96)) -> torch.Tensor:
    """(3, 3, H, W): a flat image (many similar tokens), a noise image and one half flat
    half noise; ``kind="same"``: the flat image three times."""
    g = torch.Generator().manual_seed(1)
    h, w = hw
    flat = torch.zeros(1, 3, h, w)
    flat[..., : h // 2, :] = 0.8
    flat[..., h // 2:, : w // 2] = -0.5
    flat = flat + 0.02 * torch.randn(flat.shape, generator=g)
    noise = torch.randn(1, 3, h, w, generator=g)
    half = flat.clone()
    half[..., :, w // 2:] = torch.randn(1, 3, h, w - w // 2, generator=g)
    if kind == "same":
        return flat.repeat(3, 1, 1, 1)
    return torch.cat([flat, noise, half])


def noise_images(b=2, h=64, w=96, seed=1) -> torch.Tensor:
    """(b, 3, h, w) standard normal pixels from a seeded generator."""
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))
