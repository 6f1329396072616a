"""Small input batches shared by the method tests."""

from __future__ import annotations

import torch


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
