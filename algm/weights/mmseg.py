"""Segmenter checkpoints in mmsegmentation's format: a config ``.py`` + a checkpoint ``.pth``.

The config is read without executing it: :func:`read_mmseg_config` walks the file's syntax
tree and evaluates only assignments of literals, ``dict(...)`` / ``list(...)`` /
``tuple(...)`` calls, names assigned earlier and arithmetic on numbers; ``_base_`` files
are read the same way and merged as mmengine does (dicts merge key by key, ``_delete_=True``
replaces). A value the reader cannot evaluate (a comprehension, a function call) is an
error only where the model needs it; an ``import`` (mmengine's pure-Python configs) is
refused, naming the line.

The model must be mmseg's ``EncoderDecoder`` with its ``VisionTransformer`` backbone and a
``SegmenterMaskTransformerHead`` (mask decoder) or ``FCNHead`` with ``num_convs=0``
(Segmenter's linear decoder). Weight names map as mmseg's own ``vit2mmseg`` converter
(which Expedit's Segmenter code also uses) maps timm's, reversed:

=====================================================  =========================================
mmseg (``backbone.`` / ``decode_head.``)               algm (``encoder.`` / ``decoder.``)
=====================================================  =========================================
``patch_embed.projection``                             ``patch_embed.proj`` (zero bias if none)
``layers.{i}.ln1`` / ``ln2``                           ``blocks.{i}.norm1`` / ``norm2``
``layers.{i}.attn.attn.in_proj_{weight,bias}``         ``blocks.{i}.attn.qkv.{weight,bias}``
``layers.{i}.attn.attn.out_proj``                      ``blocks.{i}.attn.proj``
``layers.{i}.ffn.layers.0.0`` / ``ffn.layers.1``       ``blocks.{i}.mlp.fc1`` / ``mlp.fc2``
``ln1`` (the backbone's final norm)                    ``norm``
``dec_proj``                                           ``proj_dec``
``cls_emb``, ``decoder_norm``, ``mask_norm``           the same names
``patch_proj.weight`` / ``classes_proj.weight``        ``proj_patch`` / ``proj_classes``
                                                       (transposed: x @ W instead of Linear)
``conv_seg`` (FCNHead, 1x1 conv)                       ``head`` (Linear)
=====================================================  =========================================

``auxiliary_head.*`` (training only) is dropped; any other missing, unexpected or
mis-shaped key is an error naming every such key (:func:`~algm.weights.checkpoint.strict_load`).
"""

from __future__ import annotations

import ast
import hashlib
import json
import operator
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

from algm.config import DecoderConfig, ViTConfig
from algm.safe_yaml import brief, clip

# mmseg dataset classes -> the suite's dataset names
DATASET_TYPES = {"ADE20KDataset": "ade20k", "CityscapesDataset": "cityscapes",
                 "PascalContextDataset": "pascal", "COCOStuffDataset": "cocostuff"}
UNUSED_PREFIXES = ("auxiliary_head.", "data_preprocessor.")
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv}


@dataclass(frozen=True)
class Unreadable:
    """A config value the safe reader did not evaluate (an error only if the model needs it)."""

    where: str


@dataclass(frozen=True)
class MMSegModel:
    """What an mmseg config says about its Segmenter: the encoder / decoder configs,
    the class count, the sliding window and stride (h, w) in pixels, and the suite's
    dataset name (None if its ``dataset_type`` is none the suite knows)."""

    encoder: ViTConfig
    decoder: DecoderConfig
    n_cls: int
    window: tuple[int, int]
    stride: tuple[int, int]
    dataset: str | None
    qkv_bias: bool
    patch_bias: bool


# ------------------------------------------------------------------ reading the config
def read_mmseg_config(path: str | Path) -> dict:
    """The settings of an mmseg config file with its ``_base_`` files merged in, read
    without running it (see the module docstring). FileNotFoundError for a missing file,
    ValueError (one line naming the file) for one that is not such a config."""
    return _read(Path(path), ())


def _read(path: Path, seen: tuple[Path, ...]) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"mmseg config not found: {path}")
    if path.resolve() in seen:
        raise ValueError(f"{path}: _base_ includes itself")
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{path}: not a Python config file: {clip(err)}") from None
    own: dict = {}
    base: dict = {}
    for stmt in tree.body:
        if isinstance(stmt, (ast.Import, ast.ImportFrom)) or (
                isinstance(stmt, ast.With) and any(isinstance(s, (ast.Import, ast.ImportFrom)) for s in stmt.body)):
            raise ValueError(f"{path}:{stmt.lineno}: imports (an mmengine pure-Python config); "
                             f"only plain dict configs are read, without executing them")
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            continue  # a docstring
        if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)):
            raise ValueError(f"{path}:{stmt.lineno}: only `name = value` statements are read, "
                             f"without executing the file")
        name = stmt.targets[0].id
        value = _eval(stmt.value, {**base, **own}, f"{path}:{stmt.lineno}")
        if name == "_base_":
            base = _bases(path, value, seen)
        else:
            own[name] = value
    return _merge(base, own)


def _bases(path: Path, value: Any, seen: tuple[Path, ...]) -> dict:
    files = [value] if isinstance(value, str) else value
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise ValueError(f"{path}: _base_ must be a file name or a list of them, got {brief(value)}")
    merged: dict = {}
    for name in files:
        merged = _merge(merged, _read(path.parent / name, (*seen, path.resolve())))
    return merged


def _merge(base: dict, new: dict) -> dict:
    """mmengine's merge: dicts merge recursively unless the new one says ``_delete_=True``."""
    out = dict(base)
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and not value.get("_delete_", False):
            out[key] = _merge(out[key], value)
        else:
            out[key] = {k: v for k, v in value.items() if k != "_delete_"} if isinstance(value, dict) else value
    return out


def _eval(node: ast.AST, names: Mapping, where: str) -> Any:
    """The value of a literal-like expression, or :class:`Unreadable`."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_eval(n, names, where) for n in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.Dict) and None not in node.keys:
        return {_eval(k, names, where): _eval(v, names, where) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.Name):
        return names.get(node.id, Unreadable(f"{where}: name {node.id}"))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _eval(node.operand, names, where)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left, names, where), _eval(node.right, names, where)
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (left, right)):
            try:
                return _BINARY[type(node.op)](left, right)
            except ZeroDivisionError:
                pass
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        if node.func.id == "dict" and not node.args and all(k.arg for k in node.keywords):
            return {k.arg: _eval(k.value, names, where) for k in node.keywords}
        if node.func.id in ("list", "tuple") and len(node.args) == 1 and not node.keywords:
            items = _eval(node.args[0], names, where)
            if isinstance(items, (list, tuple)):
                return list(items) if node.func.id == "list" else tuple(items)
    return Unreadable(f"{where}: {ast.unparse(node)[:60]}")


# ------------------------------------------------------------------ the model it describes
def mmseg_model(config: Mapping, source: str | Path = "config") -> MMSegModel:
    """The Segmenter an mmseg config describes; ValueError (one line naming ``source``
    and the setting) for anything the hook-point ViT and algm's decoders cannot compute."""
    try:
        return _model(config, Path(source).stem)
    except ValueError as err:
        raise ValueError(f"{source}: {clip(err)}") from None


def _get(table: Mapping, key: str, where: str, default: Any = ...) -> Any:
    if not isinstance(table, Mapping):
        raise ValueError(f"{where} must be a dict, got {brief(table)}")
    if key not in table:
        if default is ...:
            raise ValueError(f"missing {where}.{key}")
        return default
    value = table[key]
    if isinstance(value, Unreadable):
        raise ValueError(f"{where}.{key} cannot be read without executing the config ({value.where})")
    return value


def _int(table: Mapping, key: str, where: str, default: Any = ...) -> int:
    value = _get(table, key, where, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}.{key} must be a whole number >= 1, got {brief(value)}")
    return value


def _pair(table: Mapping, key: str, where: str, default: Any = ...) -> tuple[int, int]:
    value = _get(table, key, where, default)
    pair = list(value) if isinstance(value, (list, tuple)) else [value, value]
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in pair):
        raise ValueError(f"{where}.{key} must be N or (h, w) of whole numbers >= 1, got {brief(value)}")
    return (pair[0], pair[1])


def _expect(table: Mapping, key: str, where: str, default: Any, want: Any, feature: str) -> None:
    if _get(table, key, where, default) != want:
        raise ValueError(f"{where}.{key}={brief(table[key])}: {feature} cannot be represented by "
                         f"the hook-point ViT / algm's decoders")


def _layer_norm_eps(table: Mapping, where: str) -> float:
    norm = _get(table, "norm_cfg", where, {"type": "LN"})
    if _get(norm, "type", f"{where}.norm_cfg") != "LN":
        raise ValueError(f"{where}.norm_cfg.type {brief(norm['type'])}: only LayerNorm (LN) is supported")
    return float(_get(norm, "eps", f"{where}.norm_cfg", 1e-5))  # nn.LayerNorm's default


def _gelu(table: Mapping, where: str) -> None:
    act = _get(table, "act_cfg", where, {"type": "GELU"})
    if _get(act, "type", f"{where}.act_cfg") != "GELU":
        raise ValueError(f"{where}.act_cfg.type {brief(act['type'])}: only GELU is supported")


def _model(config: Mapping, stem: str) -> MMSegModel:
    model = _get(config, "model", "config")
    kind = _get(model, "type", "model")
    if kind != "EncoderDecoder":
        raise ValueError(f"model.type {brief(kind)}: only EncoderDecoder (one backbone, one decode head)")
    where = "model.backbone"
    bb = _get(model, "backbone", "model")
    if _get(bb, "type", where) not in ("VisionTransformer", "mmseg.VisionTransformer"):
        raise ValueError(f"{where}.type {brief(bb['type'])}: only mmseg's VisionTransformer is supported")
    for key, default, want, feature in (
            ("in_channels", 3, 3, "an input of other than 3 channels"),
            ("with_cls_token", True, True, "no cls token"),
            ("output_cls_token", False, False, "a cls-token output"),
            ("patch_norm", False, False, "a patch-embedding norm"),
            ("pre_norm", False, False, "a norm before the first block"),
            ("final_norm", False, True, "no final norm"),
            ("out_origin", False, False, "the patch embedding as an output"),
            ("num_fcs", 2, 2, "an MLP of other than 2 layers")):
        _expect(bb, key, where, default, want, feature)
    depth = _int(bb, "num_layers", where, 12)
    if _get(bb, "out_indices", where, -1) not in (-1, depth - 1, [depth - 1], (depth - 1,), [-1]):
        raise ValueError(f"{where}.out_indices {brief(bb['out_indices'])}: only the last layer's output")
    _gelu(bb, where)
    patch = _int(bb, "patch_size", where, 16)
    img = _pair(bb, "img_size", where, 224)
    dim = _int(bb, "embed_dims", where, 768)
    mlp_ratio = _get(bb, "mlp_ratio", where, 4)
    if not isinstance(mlp_ratio, (int, float)) or int(dim * mlp_ratio) != dim * mlp_ratio:
        raise ValueError(f"{where}.mlp_ratio {brief(mlp_ratio)} must give a whole MLP width")
    interp = _get(bb, "interpolate_mode", where, "bicubic")
    if interp not in ("bilinear", "bicubic"):
        raise ValueError(f"{where}.interpolate_mode {brief(interp)}: bilinear or bicubic only")
    pre = _get(model, "data_preprocessor", "model", None) or _get(config, "data_preprocessor", "config", {})
    if not _get(pre, "bgr_to_rgb", "model.data_preprocessor", False):
        raise ValueError("model.data_preprocessor.bgr_to_rgb is not True: the model expects BGR "
                         "images, algm feeds RGB")
    mean = tuple(round(float(v) / 255, 6) for v in _get(pre, "mean", "model.data_preprocessor"))
    std = tuple(round(float(v) / 255, 6) for v in _get(pre, "std", "model.data_preprocessor"))
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError("model.data_preprocessor mean / std must be 3 numbers each (std > 0)")
    encoder = ViTConfig(
        name=f"mmseg:{stem}", embed_dim=dim, depth=depth, num_heads=_int(bb, "num_heads", where, 12),
        patch_size=patch, mlp_ratio=float(mlp_ratio), norm_eps=_layer_norm_eps(bb, where),
        pos_grid=(img[0] // patch, img[1] // patch), pos_interp=interp, mean=mean, std=std,
    )
    decoder, n_cls = _decode_head(_get(model, "decode_head", "model"), dim)
    test = _get(model, "test_cfg", "model")
    if _get(test, "mode", "model.test_cfg") != "slide":
        raise ValueError(f"model.test_cfg.mode {brief(test['mode'])}: only sliding-window ('slide') "
                         f"inference is supported")
    dataset_type = config.get("dataset_type")
    return MMSegModel(
        encoder=encoder, decoder=decoder, n_cls=n_cls,
        window=_pair(test, "crop_size", "model.test_cfg"), stride=_pair(test, "stride", "model.test_cfg"),
        dataset=DATASET_TYPES.get(dataset_type) if isinstance(dataset_type, str) else None,
        qkv_bias=bool(_get(bb, "qkv_bias", where, True)), patch_bias=bool(_get(bb, "patch_bias", where, False)),
    )


def _decode_head(head: Mapping, dim: int) -> tuple[DecoderConfig, int]:
    where = "model.decode_head"
    kind = _get(head, "type", where)
    n_cls = _int(head, "num_classes", where)
    if _int(head, "in_channels", where) != dim:
        raise ValueError(f"{where}.in_channels {head['in_channels']} differs from the backbone's "
                         f"embed_dims {dim}")
    if kind == "FCNHead":
        _expect(head, "num_convs", where, 2, 0, "convolutions before the classifier")
        _expect(head, "concat_input", where, True, False, "concatenating the input")
        _expect(head, "channels", where, ..., dim, "a width unlike the backbone's")
        return DecoderConfig("linear"), n_cls
    if kind != "SegmenterMaskTransformerHead":
        raise ValueError(f"{where}.type {brief(kind)}: SegmenterMaskTransformerHead or FCNHead "
                         f"(num_convs=0) only")
    if _int(head, "embed_dims", where) != dim:
        raise ValueError(f"{where}.embed_dims {head['embed_dims']} differs from in_channels {dim}: "
                         f"algm's mask decoder keeps the encoder's width")
    if _int(head, "num_heads", where) != max(dim // 64, 1):
        raise ValueError(f"{where}.num_heads {head['num_heads']}: algm's mask decoder has width / 64 "
                         f"= {max(dim // 64, 1)} heads")
    _expect(head, "mlp_ratio", where, 4, 4, "an MLP ratio other than 4")
    _expect(head, "qkv_bias", where, True, True, "attention without biases in the decoder")
    _gelu(head, where)
    return DecoderConfig("mask", _int(head, "num_layers", where), norm_eps=_layer_norm_eps(head, where)), n_cls


# ------------------------------------------------------------------ weights
def segmenter_state(state: Mapping[str, Any], spec: MMSegModel) -> dict:
    """An mmseg Segmenter state dict -> algm's ``encoder.*`` / ``decoder.*`` (the table in
    the module docstring); keys are not checked here (load strictly)."""
    import torch

    out = {}
    for key, value in state.items():
        if key.startswith(UNUSED_PREFIXES):
            continue
        out[_rename(key)] = value.t() if key in ("decode_head.patch_proj.weight",
                                                 "decode_head.classes_proj.weight") else value
    if spec.decoder.name == "linear" and "decoder.head.weight" in out:
        out["decoder.head.weight"] = out["decoder.head.weight"].flatten(1)  # 1x1 conv -> Linear
    zero_biases = [] if spec.patch_bias else ["encoder.patch_embed.proj"]
    if not spec.qkv_bias:
        zero_biases += [f"encoder.blocks.{i}.attn.qkv" for i in range(spec.encoder.depth)]
    for name in zero_biases:
        if f"{name}.weight" in out:
            out[f"{name}.bias"] = torch.zeros(out[f"{name}.weight"].shape[0], dtype=out[f"{name}.weight"].dtype)
    return out


_LAYER_PARTS = (("ln1.", "norm1."), ("ln2.", "norm2."), ("attn.attn.in_proj_weight", "attn.qkv.weight"),
                ("attn.attn.in_proj_bias", "attn.qkv.bias"), ("attn.attn.out_proj.", "attn.proj."),
                ("ffn.layers.0.0.", "mlp.fc1."), ("ffn.layers.1.", "mlp.fc2."))
_TOP = {"backbone.patch_embed.projection.": "encoder.patch_embed.proj.", "backbone.ln1.": "encoder.norm.",
        "decode_head.patch_proj.weight": "decoder.proj_patch", "decode_head.classes_proj.weight": "decoder.proj_classes",
        "decode_head.conv_seg.": "decoder.head.", "decode_head.dec_proj.": "decoder.proj_dec.", "backbone.": "encoder.", "decode_head.": "decoder."}


def _rename(key: str) -> str:
    for old, new in (("backbone.layers.", "encoder.blocks."), ("decode_head.layers.", "decoder.blocks.")):
        if key.startswith(old):
            index, _, rest = key[len(old):].partition(".")
            for part, ours in _LAYER_PARTS:
                if rest.startswith(part):
                    return f"{new}{index}.{ours}{rest[len(part):]}"
            return key  # unknown: reported as unexpected by the strict load
    for old, new in _TOP.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def load_mmseg_checkpoint(config: str | Path, checkpoint: str | Path, trusted: bool = False):
    """(Segmenter in eval mode on CPU, :class:`MMSegModel`) of an mmseg config + checkpoint
    (``{"state_dict": ..., "meta": ...}`` as mmengine saves it, or a bare state dict),
    loaded strictly. ``trusted`` as for :func:`~algm.weights.torch_file.load_torch_file`
    (mmengine's metadata often needs it)."""
    from algm.model.segmenter import build_segmenter
    from algm.weights.checkpoint import strict_load
    from algm.weights.torch_file import check_state_dict, load_torch_file

    spec = mmseg_model(read_mmseg_config(config), config)
    blob = load_torch_file(checkpoint, trusted=trusted)
    state = blob.get("state_dict", blob) if isinstance(blob, Mapping) else blob
    state = check_state_dict(state, checkpoint)
    model = build_segmenter(spec.encoder, spec.n_cls, spec.decoder)
    strict_load(model, segmenter_state(state, spec), f"mmseg checkpoint {checkpoint}")
    return model.eval(), spec


def convert_mmseg(config: str | Path, checkpoint: str | Path, folder: str | Path, dataset: str | None = None,
                  trusted: bool = False) -> Path:
    """Write an mmseg Segmenter as an official-format ``folder/checkpoint.pth`` +
    ``variant.yml`` (what ``bench --checkpoints`` reads); ``dataset`` defaults to the
    config's ``dataset_type``. The variant's ``converted_from`` names both files and the
    checkpoint's sha256. Returns the checkpoint's path."""
    from algm.files import checkpoint_sha256
    from algm.weights.checkpoint import save_checkpoint, variant_of

    model, spec = load_mmseg_checkpoint(config, checkpoint, trusted=trusted)
    dataset = dataset or spec.dataset
    if dataset is None:
        raise ValueError(f"{config}: dataset_type names none of the suite's datasets; pass the dataset")
    source = {"mmseg_config": str(config), "checkpoint": str(checkpoint),
              "checkpoint_sha256": checkpoint_sha256(checkpoint)}
    variant = variant_of(model, dataset, spec.window, spec.stride, {"converted_from": source})
    return save_checkpoint(model, folder, variant)


def converted_checkpoints(config: str | Path, checkpoint: str | Path, dataset: str, trusted: bool = False) -> Path:
    """A ``bench --checkpoints`` root holding the mmseg Segmenter as the ``none`` model of
    its backbone, ``<root>/<dataset>/<backbone>/none/`` (:func:`convert_mmseg`). Converted
    once into ``cache_dir("mmseg", <key>)``, the key hashing the model the config describes,
    the checkpoint's bytes and ``dataset``: a changed file never reuses a stale conversion."""
    from algm.config import backbone_name
    from algm.files import checkpoint_sha256
    from algm.cache import cache_dir
    from algm.fetch import layout_dir

    spec = mmseg_model(read_mmseg_config(config), config)
    identity = {"model": asdict(spec), "checkpoint_sha256": checkpoint_sha256(checkpoint), "dataset": dataset}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    root = cache_dir("mmseg", key)
    folder = layout_dir(root, dataset, backbone_name(spec.encoder), "none")
    if not (folder / "variant.yml").is_file():  # written last: a killed conversion is done again
        print(f"algm-bench: converting the mmseg checkpoint {checkpoint} -> {folder} (once)", file=sys.stderr,
              flush=True)
        convert_mmseg(config, checkpoint, folder, dataset, trusted=trusted)
    return root
