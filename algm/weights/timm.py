"""timm plain ViTs as backbones: ``--backbone timm:<name>`` and :func:`encoder_from_timm`.

A timm ``VisionTransformer`` maps onto the hook-point encoder
(:class:`~algm.model.vit.ViTEncoder`; its config is read in :func:`algm.config.get_backbone`)
when it is a pre-norm ViT with one cls token, a learned position embedding, LayerNorm,
softmax attention and a GELU MLP: parameter names are the same (``patch_embed.proj``,
``blocks.{i}.attn.qkv``, ``ls1.gamma`` ...; the encoder was written to timm's names), so
the mapping is the identity except that

* ``head.*`` (the classifier) is dropped;
* a bias timm leaves out (``qkv_bias=False``, ``proj_bias=False``, a bias-free patch
  embedding) loads as zeros, which computes the same;
* ``no_embed_class`` (the cls token has no position embedding) loads a zero cls
  position row.

What the encoder cannot compute (register tokens, no cls token, a pre-norm, qk-norm,
pooling with its own norm, other blocks / MLPs / activations / norms, a non-learned
position embedding) is refused with one line naming the model and the feature.
Weights come from timm's local cache (never downloaded here), a state-dict file in
timm's format, or are random.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

from algm.config import TIMM_PREFIX as PREFIX, timm_cached_file, timm_meta_model, timm_name, timm_vit_config

UNUSED_PREFIXES = ("head.",)


def is_timm(backbone: str) -> bool:
    return backbone.startswith(PREFIX)


def encoder_state(state: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """A timm ``VisionTransformer`` state dict (``model``'s layout; ``head.*`` allowed)
    -> the hook-point encoder's, which holds the same tensors under the same names plus
    zero biases where ``model`` has none and a zero cls position row for ``no_embed_class``.
    Keys are not checked here: load the result with :func:`~algm.weights.checkpoint.strict_load`."""
    out = {k: v for k, v in state.items() if not k.startswith(UNUSED_PREFIXES)}
    if model.no_embed_class and "pos_embed" in out:
        pos = out["pos_embed"]
        out["pos_embed"] = torch.cat([pos.new_zeros(1, 1, pos.shape[-1]), pos], 1)
    linears = [("patch_embed.proj", model.patch_embed.proj)]
    for i, blk in enumerate(model.blocks):
        linears += [(f"blocks.{i}.attn.qkv", blk.attn.qkv), (f"blocks.{i}.attn.proj", blk.attn.proj),
                    (f"blocks.{i}.mlp.fc1", blk.mlp.fc1), (f"blocks.{i}.mlp.fc2", blk.mlp.fc2)]
    for key, layer in linears:
        if layer.bias is None and f"{key}.weight" in out:
            out[f"{key}.bias"] = torch.zeros(layer.weight.shape[0], dtype=out[f"{key}.weight"].dtype)
    return out


def encoder_from_timm(model: nn.Module, name: str | None = None):
    """A :class:`~algm.model.vit.ViTEncoder` computing what the timm ``VisionTransformer``
    ``model`` computes (``forward_features``: (B, 1 + N, D) after the final norm), holding a
    copy of its weights; ``name`` (default: timm's model name) becomes ``cfg.name``."""
    from algm.model.vit import ViTEncoder
    from algm.weights.checkpoint import strict_load

    name = name or PREFIX + str(getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__))
    encoder = ViTEncoder(timm_vit_config(model, name))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    strict_load(encoder, encoder_state(state, model), f"timm model {name}")
    return encoder.eval()


def load_timm_file(encoder: nn.Module, path: str | Path, trusted: bool = False) -> None:
    """Load a timm state-dict file (a plain state dict, or one under ``state_dict`` /
    ``model``, as timm's training script saves it) of ``encoder.cfg.name``'s model into
    ``encoder``, strictly (every missing, unexpected or mis-shaped key named)."""
    from algm.weights.checkpoint import strict_load
    from algm.weights.torch_file import check_state_dict, load_torch_file

    blob = load_torch_file(path, trusted=trusted, what="weights file")
    for key in ("state_dict", "model"):
        if isinstance(blob, Mapping) and isinstance(blob.get(key), Mapping):
            blob = blob[key]
            break
    state = check_state_dict(blob, path)
    model = timm_meta_model(timm_name(encoder.cfg.name))
    strict_load(encoder, encoder_state(state, model), f"weights file {path} ({encoder.cfg.name})")


def load_timm_pretrained(encoder: nn.Module) -> None:
    """Load timm's cached pretrained weights of ``encoder.cfg.name`` (through timm's own
    loader and checkpoint filter, from the local file: never downloaded)."""
    import timm
    from algm.weights.checkpoint import strict_load

    name = timm_name(encoder.cfg.name)
    path = timm_cached_file(name)
    if path is None:
        raise FileNotFoundError(f"timm:{name}: no pretrained weights in timm's local cache; pass "
                                f"--weights FILE (a timm state dict) or use random weights")
    model = timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": str(path)})
    strict_load(encoder, encoder_state(model.state_dict(), model), f"timm pretrained {path}")
