"""Official Segmenter / ALGM checkpoints: ``checkpoint.pth`` + ``variant.yml`` (SPEC section 1).

``checkpoint.pth`` is a dict whose ``model`` entry is the state dict (``encoder.*``,
``decoder.*``); ``variant.yml`` beside it describes the network (``net_kwargs``) and the
sliding-window inference (``inference_kwargs``). Loading is strict: the one key dropped
silently is ``encoder.head.*`` (the unused ImageNet classifier of the backbone); any
other missing, unexpected or mis-shaped key is an error that names every such key.
A file that is not a readable torch file, a malformed ``variant.yml`` or a tensor holding
NaN/inf fails with one line naming the file (and the key or tensor).

:func:`save_checkpoint` writes the same format (``algm-bench finetune``'s output). For
encoders that Segmenter's variants cannot describe (DINOv2-style ViT-S/14) it adds
optional ``net_kwargs`` entries that Segmenter ignores: ``layer_scale``, ``norm_eps``,
``pos_interp``, ``normalization``, ``decoder.norm_eps`` (where the decoder's differs, as in
converted mmseg checkpoints); and ``inference_kwargs.window_size`` /
``window_stride`` may be ``[h, w]`` for a non-square window (CamVid 336 x 448).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml
from torch import Tensor, nn

from algm import atomic
from algm.config import HALF, IMAGENET_MEAN, IMAGENET_STD, DecoderConfig, ViTConfig
from algm.model.segmenter import Segmenter, build_segmenter
from algm.safe_yaml import brief, clip, load_yaml
from algm.weights.torch_file import check_state_dict, load_torch_file

# Segmenter's normalisation table (segm/data/utils.py STATS), keyed by the prefix of
# the backbone name or by an explicit ``normalization`` entry in variant.yml.
NORMALIZATION = {
    "vit": (HALF, HALF),
    "deit": (IMAGENET_MEAN, IMAGENET_STD),
}
DECODERS = {"mask_transformer": "mask", "linear": "linear"}
UNUSED_PREFIXES = ("encoder.head.",)


@dataclass(frozen=True)
class VariantInfo:
    """What inference needs besides the weights.

    ``window`` / ``stride`` are the sliding-window crop and step (h, w) in pixels,
    ``im_size`` the short side images are resized to first; ``mean`` / ``std`` the
    per-channel input normalisation of images scaled to [0, 1].
    """

    backbone: str
    n_cls: int
    im_size: int
    window: tuple[int, int]
    stride: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def read_variant(path: str | Path) -> dict:
    """Parse a Segmenter ``variant.yml`` with :func:`algm.safe_yaml.load_yaml` (tuples
    allowed, no aliases, no arbitrary objects).

    Raises FileNotFoundError for a missing file, ValueError (one line naming the file and
    the place) for one that is not YAML or not a mapping.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"variant file not found: expected {path} (Segmenter writes "
                                f"variant.yml beside checkpoint.pth)")
    variant = load_yaml(path, "variant file")
    if not isinstance(variant, Mapping):
        raise ValueError(f"{path}: expected a mapping of settings (net_kwargs, inference_kwargs, "
                         f"...), got {type(variant).__name__}")
    return variant


def _field(table: Mapping, key: str, where: str) -> Any:
    """``table[key]``; ``where`` is the dotted path of ``table`` in the file ('' at the top)."""
    if not isinstance(table, Mapping) or key not in table:
        raise ValueError(f"missing {_dotted(where, key)}")
    return table[key]


def _pair(table: Mapping, key: str, where: str) -> tuple[int, int]:
    """An integer N (a square N x N) or a pair [h, w] of integers."""
    value = _field(table, key, where)
    pair = [value, value] if not isinstance(value, (list, tuple)) else list(value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in pair):
        raise ValueError(f"{_dotted(where, key)} must be a whole number >= 1 or [h, w] of them, "
                         f"got {brief(value)}")
    return (pair[0], pair[1])


def _dotted(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _section(table: Mapping, key: str, where: str) -> Mapping:
    value = _field(table, key, where)
    if not isinstance(value, Mapping):
        raise ValueError(f"{_dotted(where, key)} must be a mapping, got {type(value).__name__}")
    return value


def _int(table: Mapping, key: str, where: str) -> int:
    value = _field(table, key, where)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{_dotted(where, key)} must be an integer, got {brief(value)}") from None


def configs_from_variant(variant: Mapping, source: str | Path = "variant.yml"
                         ) -> tuple[ViTConfig, DecoderConfig, VariantInfo]:
    """Map a parsed variant.yml to the suite's encoder / decoder configs and inference info.

    Segmenter's ViTs use LayerNorm eps 1e-5, MLP ratio 4, bilinear pos-embed resizing,
    and store the pos-embed at the training grid ``image_size / patch_size``. A missing
    or ill-typed entry is a ValueError naming ``source`` and the entry.
    """
    try:
        return _configs(variant)
    except ValueError as err:
        raise ValueError(f"{source}: {clip(err)}") from None


def _configs(variant: Mapping) -> tuple[ViTConfig, DecoderConfig, VariantInfo]:
    net = _section(variant, "net_kwargs", "")
    inference = _section(variant, "inference_kwargs", "")
    backbone = str(_field(net, "backbone", "net_kwargs"))
    if net.get("distilled", False):
        raise ValueError(f"backbone {brief(backbone)} is distilled (extra distillation token); "
                         "only cls-token ViTs are supported")
    patch = _int(net, "patch_size", "net_kwargs")
    image_size = _field(net, "image_size", "net_kwargs")
    image_size = (image_size, image_size) if isinstance(image_size, int) else image_size
    if (not isinstance(image_size, (tuple, list)) or len(image_size) != 2
            or not all(isinstance(s, int) for s in image_size)
            or patch < 1 or image_size[0] % patch or image_size[1] % patch):
        raise ValueError(f"net_kwargs.image_size {brief(image_size)} does not tile "
                         f"into {patch}-pixel patches")
    dataset_kwargs = variant.get("dataset_kwargs") or {}
    pos_interp = str(net.get("pos_interp", "bilinear"))
    if pos_interp not in ("bilinear", "bicubic"):
        raise ValueError(f"net_kwargs.pos_interp must be bilinear or bicubic, got {brief(pos_interp)}")
    norm_name = net.get("normalization") or (
        dataset_kwargs.get("normalization") if isinstance(dataset_kwargs, Mapping) else None
    ) or backbone.split("_")[0]
    if norm_name not in NORMALIZATION:
        raise ValueError(f"unknown normalization {brief(norm_name)} for backbone {brief(backbone)}; "
                         f"known: {', '.join(NORMALIZATION)}")
    mean, std = NORMALIZATION[norm_name]
    encoder = ViTConfig(
        name=backbone,
        embed_dim=_int(net, "d_model", "net_kwargs"),
        depth=_int(net, "n_layers", "net_kwargs"),
        num_heads=_int(net, "n_heads", "net_kwargs"),
        patch_size=patch,
        layer_scale=bool(net.get("layer_scale", False)),
        norm_eps=float(net.get("norm_eps", 1e-5)),
        pos_grid=(image_size[0] // patch, image_size[1] // patch),
        pos_interp=pos_interp,
        mean=mean,
        std=std,
    )
    dec = _section(net, "decoder", "net_kwargs")
    dec_name = str(_field(dec, "name", "net_kwargs.decoder"))
    if dec_name not in DECODERS:
        raise ValueError(f"unknown decoder {brief(dec_name)}; known: {', '.join(DECODERS)}")
    decoder = DecoderConfig(DECODERS[dec_name], _int(dec, "n_layers", "net_kwargs.decoder")
                            if "n_layers" in dec else 2,
                            float(dec["norm_eps"]) if "norm_eps" in dec else None)
    info = VariantInfo(
        backbone=backbone,
        n_cls=_int(net, "n_cls", "net_kwargs"),
        im_size=_int(inference, "im_size", "inference_kwargs"),
        window=_pair(inference, "window_size", "inference_kwargs"),
        stride=_pair(inference, "window_stride", "inference_kwargs"),
        mean=mean,
        std=std,
    )
    return encoder, decoder, info


def strict_load(module: nn.Module, state: Mapping[str, Tensor], what: str) -> None:
    """``module.load_state_dict(state, strict=True)``, failing first (:func:`check_fits`)."""
    check_fits(module, state, what)
    module.load_state_dict(state, strict=True)


def check_fits(module: nn.Module, state: Mapping[str, Tensor], what: str) -> None:
    """A ValueError listing every missing, unexpected and mis-shaped key of ``state`` for
    ``module`` (``what`` names the source); nothing is loaded."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    misshaped = sorted(
        f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
        for k in set(own) & set(state) if tuple(state[k].shape) != tuple(own[k].shape)
    )
    problems = [f"{label}: {', '.join(keys)}" for label, keys in
                (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
                if keys]
    if problems:
        raise ValueError(f"{what} does not match the model; " + clip("; ".join(problems)))


def load_checkpoint(path: str | Path, variant_path: str | Path | None = None,
                    trusted: bool = False) -> tuple[Segmenter, VariantInfo]:
    """Build the Segmenter of an official checkpoint and load its weights strictly.

    ``variant_path`` defaults to ``variant.yml`` beside ``path``. The file is read with
    ``torch.load(weights_only=True)``; a checkpoint whose metadata needs full unpickling
    loads only with ``trusted=True`` (``weights_only=False`` runs the pickle's code: use
    it only for files from a source you trust). Weights holding NaN/inf are refused.
    Returns the model in eval mode on CPU.
    """
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} is a folder: pass the checkpoint.pth in it")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    variant_path = Path(variant_path) if variant_path is not None else path.with_name("variant.yml")
    encoder_cfg, decoder_cfg, info = configs_from_variant(read_variant(variant_path), variant_path)
    ckpt = load_torch_file(path, trusted=trusted)
    if not isinstance(ckpt, Mapping) or "model" not in ckpt:
        keys = list(ckpt) if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise ValueError(f"{path}: expected a dict with a 'model' state dict, got {keys}")
    weights = ckpt["model"]
    if isinstance(weights, Mapping):  # the unused classifier is neither loaded nor checked
        weights = {k: v for k, v in weights.items() if not str(k).startswith(UNUSED_PREFIXES)}
    state = check_state_dict(weights, path)
    model = build_segmenter(encoder_cfg, info.n_cls, decoder_cfg)
    strict_load(model, state, f"checkpoint {path}")
    return model.eval(), info


def variant_of(model: Segmenter, dataset: str, window: tuple[int, int], stride: tuple[int, int],
               extra: Mapping | None = None) -> dict:
    """The ``variant.yml`` content that describes ``model`` (read back by
    :func:`configs_from_variant` into the same configs); ``extra`` is added at the top."""
    cfg = model.encoder.cfg
    if cfg.mlp_ratio != 4.0:
        raise ValueError(f"variant.yml has no MLP ratio entry: cannot describe mlp_ratio {cfg.mlp_ratio}")
    norms = [name for name, stats in NORMALIZATION.items() if stats == (tuple(cfg.mean), tuple(cfg.std))]
    if not norms:
        raise ValueError(f"no normalization name for mean {cfg.mean} / std {cfg.std}; "
                         f"known: {', '.join(NORMALIZATION)}")
    decoder = {v: k for k, v in DECODERS.items()}["mask" if hasattr(model.decoder, "cls_emb") else "linear"]
    dec = {"name": decoder}
    if decoder == "mask_transformer":
        dec["n_layers"] = len(model.decoder.blocks)
        if model.decoder.decoder_norm.eps != cfg.norm_eps:  # only then: other variants stay as they were
            dec["norm_eps"] = model.decoder.decoder_norm.eps
    net = {"backbone": cfg.name, "d_model": cfg.embed_dim, "n_layers": cfg.depth,
           "n_heads": cfg.num_heads, "patch_size": cfg.patch_size,
           "image_size": [cfg.pos_grid[0] * cfg.patch_size, cfg.pos_grid[1] * cfg.patch_size],
           "n_cls": model.n_cls, "normalization": norms[0], "layer_scale": cfg.layer_scale,
           "norm_eps": cfg.norm_eps, "pos_interp": cfg.pos_interp, "decoder": dec}
    square = window[0] == window[1] and stride[0] == stride[1]
    inference = {"im_size": min(window),
                 "window_size": window[0] if square else list(window),
                 "window_stride": stride[0] if square else list(stride)}
    return {"net_kwargs": net, "dataset_kwargs": {"dataset": dataset, "normalization": norms[0]},
            "inference_kwargs": inference, **(extra or {})}


def save_checkpoint(model: Segmenter, folder: str | Path, variant: Mapping, meta: Mapping | None = None) -> Path:
    """Write ``folder/checkpoint.pth`` (``{"model": encoder.* and decoder.* weights,
    "algm_bench": meta}``), then ``folder/variant.yml``, each atomically; returns the
    checkpoint's path. The method's own state is not part of a Segmenter checkpoint."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
               if k.startswith(("encoder.", "decoder."))}
    path = folder / "checkpoint.pth"
    atomic.save_torch({"model": weights, "algm_bench": dict(meta or {})}, path)
    # last: the variant marks the checkpoint complete (killed in between, no variant of this run)
    atomic.write_text(folder / "variant.yml", yaml.safe_dump(dict(variant), sort_keys=False))
    return path
