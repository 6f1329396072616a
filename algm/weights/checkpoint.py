"""Official Segmenter / ALGM checkpoints: ``checkpoint.pth`` + ``variant.yml`` (SPEC section 1).

``checkpoint.pth`` is a dict whose ``model`` entry is the state dict (``encoder.*``,
``decoder.*``); ``variant.yml`` beside it describes the network (``net_kwargs``) and the
sliding-window inference (``inference_kwargs``). Loading is strict: the one key dropped
silently is ``encoder.head.*`` (the unused ImageNet classifier of the backbone); any
other missing, unexpected or mis-shaped key is an error that names every such key.
A file that is not a readable torch file, a malformed ``variant.yml`` or a tensor holding
NaN/inf fails with one line naming the file (and the key or tensor).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml
from torch import Tensor, nn

from algm.config import HALF, IMAGENET_MEAN, IMAGENET_STD, DecoderConfig, ViTConfig
from algm.model.segmenter import Segmenter, build_segmenter
from algm.weights.torch_file import check_state_dict, first_line, load_torch_file

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

    ``window_size`` / ``window_stride`` are the sliding-window crop and step in pixels,
    ``im_size`` the short side images are resized to first; ``mean`` / ``std`` the
    per-channel input normalisation of images scaled to [0, 1].
    """

    backbone: str
    n_cls: int
    im_size: int
    window_size: int
    window_stride: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class _VariantLoader(yaml.SafeLoader):
    """SafeLoader that also builds ``!!python/tuple`` (Segmenter writes image_size so)."""


_VariantLoader.add_constructor(
    "tag:yaml.org,2002:python/tuple",
    lambda loader, node: tuple(loader.construct_sequence(node)),
)


def read_variant(path: str | Path) -> dict:
    """Parse a Segmenter ``variant.yml`` safely (tuples allowed, no arbitrary objects).

    Raises FileNotFoundError for a missing file, ValueError (one line naming the file and
    the place) for one that is not YAML or not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"variant file not found: expected {path} (Segmenter writes "
                                f"variant.yml beside checkpoint.pth)")
    try:
        with path.open("rb") as f:  # bytes: yaml reports undecodable text as a YAMLError
            variant = yaml.load(f, Loader=_VariantLoader)
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {_yaml_problem(err)}") from None
    if not isinstance(variant, Mapping):
        raise ValueError(f"{path}: expected a mapping of settings (net_kwargs, inference_kwargs, "
                         f"...), got {type(variant).__name__}")
    return variant


def _yaml_problem(err: yaml.YAMLError) -> str:
    """'<problem> (line L, column C)' of a YAML error, on one line."""
    problem = getattr(err, "problem", None)
    mark = getattr(err, "problem_mark", None)
    if problem is None:
        return first_line(err)
    return problem + (f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else "")


def _field(table: Mapping, key: str, where: str) -> Any:
    """``table[key]``; ``where`` is the dotted path of ``table`` in the file ('' at the top)."""
    if not isinstance(table, Mapping) or key not in table:
        raise ValueError(f"missing {_dotted(where, key)}")
    return table[key]


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
        raise ValueError(f"{_dotted(where, key)} must be an integer, got {value!r}") from None


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
        raise ValueError(f"{source}: {err}") from None


def _configs(variant: Mapping) -> tuple[ViTConfig, DecoderConfig, VariantInfo]:
    net = _section(variant, "net_kwargs", "")
    inference = _section(variant, "inference_kwargs", "")
    backbone = str(_field(net, "backbone", "net_kwargs"))
    if net.get("distilled", False):
        raise ValueError(f"backbone {backbone!r} is distilled (extra distillation token); "
                         "only cls-token ViTs are supported")
    patch = _int(net, "patch_size", "net_kwargs")
    image_size = _field(net, "image_size", "net_kwargs")
    image_size = (image_size, image_size) if isinstance(image_size, int) else image_size
    if (not isinstance(image_size, (tuple, list)) or len(image_size) != 2
            or not all(isinstance(s, int) for s in image_size)
            or patch < 1 or image_size[0] % patch or image_size[1] % patch):
        raise ValueError(f"net_kwargs.image_size {image_size!r} does not tile "
                         f"into {patch}-pixel patches")
    dataset_kwargs = variant.get("dataset_kwargs") or {}
    norm_name = net.get("normalization") or (
        dataset_kwargs.get("normalization") if isinstance(dataset_kwargs, Mapping) else None
    ) or backbone.split("_")[0]
    if norm_name not in NORMALIZATION:
        raise ValueError(f"unknown normalization {norm_name!r} for backbone {backbone!r}; "
                         f"known: {', '.join(NORMALIZATION)}")
    mean, std = NORMALIZATION[norm_name]
    encoder = ViTConfig(
        name=backbone,
        embed_dim=_int(net, "d_model", "net_kwargs"),
        depth=_int(net, "n_layers", "net_kwargs"),
        num_heads=_int(net, "n_heads", "net_kwargs"),
        patch_size=patch,
        norm_eps=1e-5,
        pos_grid=(image_size[0] // patch, image_size[1] // patch),
        pos_interp="bilinear",
        mean=mean,
        std=std,
    )
    dec = _section(net, "decoder", "net_kwargs")
    dec_name = str(_field(dec, "name", "net_kwargs.decoder"))
    if dec_name not in DECODERS:
        raise ValueError(f"unknown decoder {dec_name!r}; known: {', '.join(DECODERS)}")
    decoder = DecoderConfig(DECODERS[dec_name], _int(dec, "n_layers", "net_kwargs.decoder")
                            if "n_layers" in dec else 2)
    info = VariantInfo(
        backbone=backbone,
        n_cls=_int(net, "n_cls", "net_kwargs"),
        im_size=_int(inference, "im_size", "inference_kwargs"),
        window_size=_int(inference, "window_size", "inference_kwargs"),
        window_stride=_int(inference, "window_stride", "inference_kwargs"),
        mean=mean,
        std=std,
    )
    return encoder, decoder, info


def strict_load(module: nn.Module, state: Mapping[str, Tensor], what: str) -> None:
    """``module.load_state_dict(state, strict=True)``, failing first with a ValueError that
    lists every missing, unexpected and mis-shaped key (``what`` names the source)."""
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
        raise ValueError(f"{what} does not match the model; " + "; ".join(problems))
    module.load_state_dict(state, strict=True)


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
