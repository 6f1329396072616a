"""CTS: Content-aware Token Sharing (Lu, de Geus, Dubbelman, CVPR 2023), SPEC section 3.

Before the encoder, a policy scores every 2 x 2 superpatch of the patch grid; the top-K
superpatches of each image become one token each: the 2p x 2p pixel region is downscaled
to p x p (2 x 2 average, which equals the authors' bilinear x0.5 resize), embedded by the
encoder's own patch conv (``ctx.embed``), plus the average of its 4 position embeddings.
The other patches stay as they are. The encoder then runs unchanged (no proportional
attention, as in the authors' code); ``restore`` copies each shared token's decoder
output to its 4 patch positions (one gather through ``source``).

Token order (the authors' ``images_to_patches``): ``[cls, unshared patches (raster
order), shared superpatches (raster order of the superpatch grid)]``; sizes 1 and 4.
Every image shares exactly K superpatches, so a batch stays rectangular.

K: ``k`` (count per image) or ``k_ratio`` (share of the superpatches, K = round(ratio * S)
on the input's grid); by default the ratio of the paper's setting for the dataset
(ADE20K 103/256, Pascal Context 90/225, Cityscapes 336/576), else 103/256 (CamVid's
12 x 16 superpatch grid: K = 77, 768 -> 537 patch tokens).

Policies (``policy``):

* ``variance`` (default: needs no training, no labels, no checkpoint, so every suite
  runs out of the box): lowest mean per-channel pixel variance of the superpatch first,
  i.e. the flattest regions, which most often hold one class. On CamVid val (vit-s14
  grid, K = 77 of 192) 75.9 % of its picks are single-class superpatches; the trained
  ``tiny`` policy reaches 93.2 % (its training prints both).
* ``learned``: :class:`baselines.cts_policy.PolicyNet` trained on ground-truth "one class"
  targets (:mod:`baselines.cts_train`), loaded from ``algm.cache.cache_dir("cts")``;
  :meth:`CTS.training_tasks` trains it when missing, or ``algm-bench train --method cts --policy learned``
  does. Its FLOPs count as part of the model.
* ``oracle``: ground truth from ``labels`` (``Segmenter.run(images, labels)``): share of
  the majority class among non-ignore pixels, so single-class superpatches come first
  (an upper bound; needs labels at the input resolution).

Ties in every ranking go to the earlier superpatch in raster order (stable sort).
The full-image patch embedding is still computed before ``begin`` (the encoder's
design); the K extra p x p embeddings are counted too. Both are < 1 % of the FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from algm.config import DatasetSpec, ViTConfig
from algm.data.windows import denormalise, normalise
from algm.methods import option, register_method
from algm.reduction import EncoderContext, TokenReduction, TokenState, TrainingContext, TrainingTask
from baselines.cts_policy import (ARCHS, DEFAULT_ARCH, POLICY_MEAN, POLICY_STD, load_policy,
                                  majority_fraction, policy_path, variance_scores)

POLICIES = ("variance", "learned", "oracle")
DEFAULT_POLICY = "variance"
# The paper's K per dataset (K of S superpatches at the crop's grid for patch 16).
PAPER_K = {"ade20k": (103, 256), "pascal": (90, 225), "cityscapes": (336, 576)}
DEFAULT_K = (103, 256)


def default_k_ratio(dataset: str) -> float:
    k, s = PAPER_K.get(dataset, DEFAULT_K)
    return k / s


@register_method
class CTS(TokenReduction):
    """Content-aware token sharing (see the module docstring)."""

    name = "cts"
    label_keys = ("policy", "k")

    @dataclass(frozen=True)
    class Config:
        policy: str = option(DEFAULT_POLICY, "superpatch scoring policy: variance (training-free), "
                                             "learned (trained policy net) or oracle (ground truth)",
                             choices=POLICIES)
        k: int | None = option(None, "superpatches shared per image (default: the paper's ratio for "
                                     "the dataset, 103/256 elsewhere)", type=int)
        k_ratio: float | None = option(None, "share of the superpatches that are shared, in [0, 1] "
                                             "(instead of --k)", type=float)
        policy_arch: str = option(DEFAULT_ARCH, "architecture of the learned policy checkpoint",
                                  choices=ARCHS)
        policy_checkpoint: str | None = option(None, "learned policy checkpoint (default: the cache "
                                                     "dir file that `train --method cts --policy learned` writes)")

    def __init__(self, policy: str = DEFAULT_POLICY, k: int | None = None, k_ratio: float | None = None,
                 *, n_cls: int | None = None, ignore_index: int = 255,
                 mean: tuple[float, ...] = (0.5, 0.5, 0.5), std: tuple[float, ...] = (0.5, 0.5, 0.5),
                 policy_net: torch.nn.Module | None = None, policy_name: str | None = None,
                 policy_file: Path | None = None):
        super().__init__()
        if policy not in POLICIES:
            raise ValueError(f"unknown CTS policy {policy!r}; choose one of: {', '.join(POLICIES)}")
        if k is not None and k_ratio is not None:
            raise ValueError("CTS: give k or k_ratio, not both")
        if k is not None and (int(k) != k or k < 0):
            raise ValueError(f"CTS k must be a non-negative integer, got {k}")
        if k_ratio is not None and not 0.0 <= k_ratio <= 1.0:
            raise ValueError(f"CTS k_ratio must lie in [0, 1], got {k_ratio}")
        if k is None and k_ratio is None:
            k_ratio = DEFAULT_K[0] / DEFAULT_K[1]
        if policy == "learned" and policy_net is None:
            raise ValueError("CTS policy 'learned' needs a policy network (build it with "
                             "CTS.from_config, which loads the trained checkpoint)")
        self.policy = policy
        self.k = None if k is None else int(k)
        self.k_ratio = None if k is not None else float(k_ratio)
        self.n_cls = n_cls
        self.ignore_index = ignore_index
        self.policy_net = policy_net if policy == "learned" else None
        self.policy_name = policy_name
        self.policy_file = policy_file if policy == "learned" else None
        self.mean, self.std = tuple(mean), tuple(std)

    @classmethod
    def from_config(cls, config: "CTS.Config", backbone: ViTConfig, dataset: DatasetSpec) -> "CTS":
        k_ratio = config.k_ratio
        if config.k is None and k_ratio is None:
            k_ratio = default_k_ratio(dataset.name)
        net, name, path = None, None, None
        if config.policy == "learned":
            path = Path(config.policy_checkpoint) if config.policy_checkpoint else \
                policy_path(dataset.name, backbone.patch_size, config.policy_arch)
            net = load_policy(path, dataset=dataset.name, backbone=backbone.name, arch=config.policy_arch)
            name = path.name
        return cls(config.policy, config.k, k_ratio, n_cls=dataset.n_cls,
                   ignore_index=dataset.ignore_index, mean=backbone.mean, std=backbone.std,
                   policy_net=net, policy_name=name, policy_file=path if net is not None else None)

    @classmethod
    def training_tasks(cls, config: "CTS.Config", backbone: ViTConfig,
                       dataset: DatasetSpec) -> list[TrainingTask]:
        """The learned policy for this dataset / patch size / arch in the cache, unless
        ``policy_checkpoint`` names another file; nothing for the other policies."""
        if config.policy != "learned" or config.policy_checkpoint:
            return []
        path = policy_path(dataset.name, backbone.patch_size, config.policy_arch)

        def run(ctx: TrainingContext) -> dict:
            from baselines.cts_train import train_policy  # training code only when training

            # As before, the dataset's window (not ctx.window): one file per dataset and patch size.
            return train_policy(dataset.name, backbone.name, arch=config.policy_arch,
                                root=ctx.data_root, out=path, progress=ctx.progress)

        return [TrainingTask(f"CTS {config.policy_arch} policy ({dataset.name}, {backbone.name})", path, run)]

    def trained_parts(self) -> dict[str, Path]:
        return {} if self.policy_file is None else {"policy": self.policy_file}

    def settings(self) -> dict:
        out = {"policy": self.policy, "k": self.k, "k_ratio": self.k_ratio}
        if self.policy == "learned":
            out["policy_checkpoint"] = self.policy_name
        return out

    # ------------------------------------------------------------------ selection

    def k_for(self, num_superpatches: int) -> int:
        """K on a grid with ``num_superpatches`` superpatches; error if it does not fit."""
        if self.k is None:
            return round(self.k_ratio * num_superpatches)
        if self.k > num_superpatches:
            raise ValueError(f"CTS k={self.k} is larger than the {num_superpatches} superpatches of "
                             f"this input; use k <= {num_superpatches} or k_ratio")
        return self.k

    def scores(self, ctx: EncoderContext) -> Tensor:
        """(B, S) shareability of every superpatch, higher = share first."""
        cell = 2 * int(ctx.patch_size)
        h2, w2 = int(ctx.grid[0]) // 2, int(ctx.grid[1]) // 2
        if self.policy == "variance":
            return variance_scores(ctx.images, cell)
        if self.policy == "oracle":
            labels = ctx.labels
            if labels is None:
                raise ValueError("CTS policy 'oracle' needs ground-truth labels: call "
                                 "Segmenter.run(images, labels) (not forward), or use policy "
                                 "'variance' / 'learned'")
            if tuple(labels.shape[-2:]) != tuple(ctx.images.shape[-2:]) or labels.dim() != 3:
                raise ValueError(f"CTS oracle labels must be (B, H, W) at the input size "
                                 f"{tuple(ctx.images.shape[-2:])}, got {tuple(labels.shape)}")
            n_cls = self.n_cls if self.n_cls is not None else int(labels[labels != self.ignore_index].max()) + 1
            return majority_fraction(labels, cell, n_cls, self.ignore_index)
        # learned: the net sees 0..1 RGB normalised its own way, whatever the backbone's.
        rgb = denormalise(ctx.images, self.mean, self.std)
        return self.policy_net(normalise(rgb, POLICY_MEAN, POLICY_STD), (h2, w2))

    def select(self, scores: Tensor, k: int) -> Tensor:
        """(B, S) scores -> (B, k) chosen superpatch indices, ascending (raster order)."""
        top = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
        return top.sort(dim=1).values

    # ------------------------------------------------------------------ hooks

    def begin(self, patches: Tensor, ctx: EncoderContext) -> TokenState:
        h, w = (int(v) for v in ctx.grid)  # ints even when traced (torch.jit / fvcore)
        if h % 2 or w % 2:
            raise ValueError(f"CTS shares 2x2 superpatches and needs an even patch grid, got {h}x{w} "
                             f"patches ({h * ctx.patch_size}x{w * ctx.patch_size} px); use an input "
                             f"size that is a multiple of {2 * ctx.patch_size} px")
        h2, w2 = h // 2, w // 2
        s = h2 * w2
        k = self.k_for(s)
        if k == 0:
            return TokenState.identity(patches, ctx.grid)
        b, n, d = (int(v) for v in patches.shape)
        p = int(ctx.patch_size)
        dev = patches.device
        chosen = self.select(self.scores(ctx), k)  # (B, K)

        # Which patches are shared, and where every patch goes.
        sp_of_patch = ((torch.arange(h, device=dev) // 2)[:, None] * w2
                       + (torch.arange(w, device=dev) // 2)[None, :]).flatten()  # (N,)
        shared_sp = torch.zeros(b, s, dtype=torch.bool, device=dev).scatter(
            1, chosen, torch.ones_like(chosen, dtype=torch.bool))
        shared = shared_sp[:, sp_of_patch]  # (B, N)
        n_keep = n - 4 * k
        keep_idx = torch.argsort(shared.to(torch.uint8), dim=1, stable=True)[:, :n_keep]
        kept = patches.gather(1, keep_idx.unsqueeze(-1).expand(-1, -1, d))

        # Shared tokens: 2x2-averaged pixels through the patch conv + mean of 4 pos-embeds.
        small = F.avg_pool2d(ctx.images, 2)  # (B, 3, H/2, W/2): superpatch -> p x p
        c = small.shape[1]
        blocks = small.reshape(b, c, h2, p, w2, p).permute(0, 2, 4, 1, 3, 5).reshape(b, s, c, p, p)
        pix = blocks.gather(1, chosen[:, :, None, None, None].expand(-1, -1, c, p, p))
        emb = ctx.embed(pix.reshape(b * k, c, p, p)).reshape(b, k, d)
        pos = ctx.pos.reshape(1, h, w, d).permute(0, 3, 1, 2)
        pos2 = F.avg_pool2d(pos, 2).flatten(2).transpose(1, 2).expand(b, -1, -1)  # (B, S, D)
        emb = emb + pos2.gather(1, chosen.unsqueeze(-1).expand(-1, -1, d)).to(emb.dtype)

        x = torch.cat([kept, emb], dim=1)
        rank_keep = torch.cumsum(~shared, 1) - 1
        rank_sp = torch.cumsum(shared_sp, 1) - 1
        source = torch.where(shared, n_keep + rank_sp[:, sp_of_patch], rank_keep)
        size = torch.cat([torch.ones(b, n_keep, dtype=patches.dtype, device=dev),
                          torch.full((b, k), 4.0, dtype=patches.dtype, device=dev)], dim=1)
        return TokenState(x=x, size=size, source=source, grid=ctx.grid, prefix=0)
