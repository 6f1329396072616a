"""CTS superpatch scoring at run time: the policy network and the two training-free scores.

A policy scores every 2 x 2 superpatch of the patch grid: high = "holds one class, can
share one token". Three scores (SPEC section 3, CTS):

* :class:`PolicyNet` (``learned``) maps a (B, 3, H, W) image to (B, h/2 * w/2) logits in
  raster order: the image is resized so that the network's output grid *is* the
  superpatch grid (``(h/2) * stride`` x ``(w/2) * stride`` pixels), then a 1 x 1 conv
  scores each cell;
* :func:`variance_scores` (``variance``): the flattest superpatches first;
* :func:`majority_fraction` (``oracle``): the share of the majority class from labels.

Architectures of the net (``arch``):

* ``tiny`` (default): 6 plain 3 x 3 conv-BN-ReLU layers (16-32-64-64-128-128 channels,
  total stride 16) on the image at 16 px per superpatch (half resolution for patch 16;
  192 x 256 for CamVid's 12 x 16 superpatches). 0.105 GFLOPs at CamVid's size (fvcore),
  12 epochs on CamVid train take about 3 minutes on this 2-core CPU.
* ``lite0``: the authors' choice, timm ``efficientnet_lite0`` features (stride 32, 320
  channels; no pretrained weights offline) + 1 x 1 conv, on the image at 32 px per
  superpatch (384 x 512 for CamVid). Over an order of magnitude slower to train on CPU,
  and from scratch it has no ImageNet features to make up for it.

Inputs of the network are 0..1 RGB normalised with (0.5, 0.5, 0.5): the CTS method
un-normalises the backbone's input first, so one checkpoint serves every backbone with
the same patch size. Checkpoints live in ``algm.cache.cache_dir("cts")`` as
``policy-<dataset>-p<patch>-<arch>.pt`` (:func:`policy_path`); training is in
:mod:`baselines.cts_train` (``algm-bench train --method cts --policy learned``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from algm.cache import cache_dir
from algm.weights.torch_file import load_torch_file

ARCHS = ("tiny", "lite0")
DEFAULT_ARCH = "tiny"
POLICY_MEAN = (0.5, 0.5, 0.5)
POLICY_STD = (0.5, 0.5, 0.5)


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class PolicyNet(nn.Module):
    """Superpatch scorer: ``forward(images, grid2) -> (B, h2 * w2)`` logits.

    images: (B, 3, H, W) RGB on the 0..1 scale normalised with (0.5, 0.5, 0.5) (any size;
    resized here); grid2: (h2, w2) superpatch grid.
    """

    def __init__(self, arch: str = DEFAULT_ARCH):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown policy arch {arch!r}; choose one of: {', '.join(ARCHS)}")
        self.arch = arch
        if arch == "tiny":
            self.stride = 16
            self.features = nn.Sequential(
                _conv(3, 16, 2), _conv(16, 32, 2), _conv(32, 64, 2), _conv(64, 64),
                _conv(64, 128, 2), _conv(128, 128),
            )
            channels = 128
        else:
            import timm  # only this architecture needs it

            self.stride = 32
            self.features = timm.create_model("efficientnet_lite0", pretrained=False,
                                              features_only=True, out_indices=(4,))
            channels = self.features.feature_info.channels()[-1]
        self.head = nn.Conv2d(channels, 1, 1)

    def input_size(self, grid2: tuple[int, int]) -> tuple[int, int]:
        """(H, W) pixels the net takes for a (h2, w2) superpatch grid."""
        return (grid2[0] * self.stride, grid2[1] * self.stride)

    def forward(self, images: Tensor, grid2: tuple[int, int]) -> Tensor:
        size = self.input_size((int(grid2[0]), int(grid2[1])))
        in_size = (int(images.shape[-2]), int(images.shape[-1]))
        if in_size != size:
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False,
                                   antialias=size[0] < in_size[0])
        feats = self.features(images)
        if isinstance(feats, (list, tuple)):  # timm features_only returns a list
            feats = feats[-1]
        return self.head(feats).flatten(1)


def policy_path(dataset: str, patch_size: int, arch: str = DEFAULT_ARCH) -> Path:
    """Where the trained policy for ``dataset`` at this patch size lives."""
    return cache_dir("cts") / f"policy-{dataset}-p{patch_size}-{arch}.pt"


def train_command(dataset: str, backbone: str, arch: str = DEFAULT_ARCH) -> str:
    """The command line that trains the policy :func:`policy_path` names."""
    extra = "" if arch == DEFAULT_ARCH else f" --policy-arch {arch}"
    return f"algm-bench train --method cts --policy learned --dataset {dataset} --backbone {backbone}{extra}"


def load_policy(path: str | Path, *, dataset: str = "?", backbone: str = "?",
                arch: str = DEFAULT_ARCH) -> PolicyNet:
    """A trained :class:`PolicyNet` in eval mode; a clear error when the file is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"CTS learned policy checkpoint not found: {path}\n"
            f"train it first (CPU, a few minutes): {train_command(dataset, backbone, arch)}\n"
            f"or use a training-free policy: --policy variance (or oracle, which needs labels)")
    ckpt = load_torch_file(path, what="CTS policy checkpoint")
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "arch" not in ckpt:
        raise ValueError(f"{path} is not a CTS policy checkpoint (expected keys 'arch', 'state_dict')")
    net = PolicyNet(ckpt["arch"])
    net.load_state_dict(ckpt["state_dict"], strict=True)
    return net.eval()


def variance_scores(images: Tensor, cell: int) -> Tensor:
    """(B, 3, H, W) -> (B, S) negative mean per-channel pixel variance of each superpatch
    (higher = flatter = more shareable); the ``variance`` policy's score."""
    b, c, h, w = (int(v) for v in images.shape)
    h2, w2 = h // cell, w // cell
    blocks = images[..., : h2 * cell, : w2 * cell].reshape(b, c, h2, cell, w2, cell)
    return -blocks.float().var(dim=(3, 5), unbiased=False).mean(1).flatten(1)


def majority_fraction(labels: Tensor, cell: int, n_cls: int, ignore_index: int) -> Tensor:
    """(B, H, W) labels -> (B, S) share of the most frequent class in each superpatch.

    Ignore pixels (and values outside 0..n_cls-1) do not count; an all-ignore superpatch
    scores 1 (its pixels count in no metric, so sharing it is free). Superpatches holding
    a single class score exactly 1. Vectorised: one ``bincount`` over (image, superpatch,
    class) keys.
    """
    b, h, w = labels.shape
    if h % cell or w % cell:
        raise ValueError(f"label map {h}x{w} does not tile into {cell}-px superpatches")
    h2, w2 = h // cell, w // cell
    s = h2 * w2
    lab = labels.long()
    lab = torch.where((lab < 0) | (lab >= n_cls) | (lab == ignore_index), n_cls, lab)
    rows = torch.arange(h, device=lab.device) // cell
    cols = torch.arange(w, device=lab.device) // cell
    sp = (rows[:, None] * w2 + cols[None, :]).expand(b, h, w)
    img = torch.arange(b, device=lab.device)[:, None, None]
    key = ((img * s + sp) * (n_cls + 1) + lab).flatten()
    counts = torch.bincount(key, minlength=b * s * (n_cls + 1)).view(b, s, n_cls + 1)[..., :n_cls]
    total = counts.sum(-1)
    frac = counts.max(-1).values.float() / total.clamp(min=1).float()
    return torch.where(total > 0, frac, torch.ones_like(frac))
