"""The token-reduction interface: what a method sees and what it may change.

The segmenter owns the model; a method is a small ``nn.Module`` it calls at fixed
hook points (it may hold parameters, e.g. a policy network or auxiliary heads, so it
moves with ``.to(device)`` and shows up in ``state_dict``). Nothing is patched: every
hook takes a :class:`TokenState` and returns a new one.

Hook points, in the order the segmenter calls them::

    begin(patches, ctx)            before the encoder, on patch embeddings (+ pos-embed)
    for every block i (0-based):
        attn_bias(state, i)        additive attention bias (masks, proportional attention)
        mid_block(state, i, attn)  after the attention residual, before the MLP;
                                   ``attn`` is an :class:`AttentionView` of this block
        after_block(state, i)      after the MLP residual
    -- tokens kept are counted here, after the last block --
    before_decoder(state)          the final (normalised) state -> the decoder's tokens
                                   (feature-level restore, e.g. reconstruction)
    restore(token_out, state)      per-token decoder output -> full patch grid

Token bookkeeping (shapes; B batch, T tokens incl. the prefix, N = h*w original patches):

* ``x``: (B, T, D): ``prefix`` non-patch tokens (the cls token today; registers later)
  lead, the patch tokens follow.
* ``size``: (B, T) float, number of original patches each token stands for (prefix 1).
* ``source``: (B, N) long, for every original patch (raster order) the index of the
  token that holds it, counted among patch tokens (0 .. T-prefix-1). Every patch maps to
  exactly one token; restore is one gather through it (no T x N matrices).
* ``keep``: (B, T) bool or None; False marks padding (per-image merging) or tokens
  removed from attention (dropped tokens). None means every token is alive.

A method imports this module, :mod:`algm.methods` (``option``, ``register_method``) and
the shared token kernels (:mod:`algm.merging`); nothing else of the framework.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from algm.files import file_sha256


@dataclass(frozen=True)
class EncoderContext:
    """What ``begin`` may use besides the patch embeddings.

    ``embed(pixels)`` maps (B, 3, p, p) pixel patches to (B, D) embeddings with the
    encoder's own patch conv (a method may embed downscaled pixel regions with it);
    ``pos`` is the (1, N, D) position embedding of the patch grid.
    """

    images: Tensor
    grid: tuple[int, int]
    patch_size: int
    pos: Tensor
    embed: Callable[[Tensor], Tensor]
    depth: int
    labels: Tensor | None = None


@dataclass(frozen=True)
class TokenState:
    """Tokens in flight plus the map back to the patch grid (see module docstring)."""

    x: Tensor
    size: Tensor
    source: Tensor
    grid: tuple[int, int]
    keep: Tensor | None = None
    aux: Any = None  # method-owned immutable payload (e.g. early-exit logits)
    prefix: int = 1  # non-patch tokens leading x (0 in ``begin``, before cls is added)

    def replace(self, **changes) -> "TokenState":
        return replace(self, **changes)

    @property
    def num_tokens(self) -> int:
        """Tokens in the tensor, cls included (padding included)."""
        return self.x.shape[1]

    def alive(self) -> Tensor:
        """(B,) long: tokens taking part in attention, cls included."""
        if self.keep is None:
            return torch.full((self.x.shape[0],), self.x.shape[1], dtype=torch.long,
                              device=self.x.device)
        return self.keep.sum(1)

    @property
    def patches(self) -> Tensor:
        """(B, T - prefix, D): the patch tokens."""
        return self.x[:, self.prefix:]

    @property
    def patch_keep(self) -> Tensor | None:
        """(B, T - prefix) bool or None: ``keep`` of the patch tokens."""
        return None if self.keep is None else self.keep[:, self.prefix:]

    @staticmethod
    def identity(patches: Tensor, grid: tuple[int, int]) -> "TokenState":
        """State of unreduced patch tokens (B, N, D), before cls is prepended."""
        b, n, _ = patches.shape
        source = torch.arange(n, device=patches.device).expand(b, n)
        size = torch.ones(b, n, dtype=patches.dtype, device=patches.device)
        return TokenState(x=patches, size=size, source=source, grid=grid, prefix=0)


@dataclass(frozen=True)
class AttentionView:
    """One block's attention as ``mid_block`` sees it (B batch, H heads, T tokens, d =
    D / H). The queries and keys are the ones the fused kernel used; ``bias`` is the
    additive bias it added (broadcastable to (B, H, T, T)) or None. Attention rows are
    not materialised by the block: :meth:`cls_attention` computes the one a method asks
    for, with ops fvcore counts (a matmul; softmax is elementwise, free by its rules)."""

    queries: Tensor
    keys: Tensor
    bias: Tensor | None = None
    prefix: int = 1

    def cls_attention(self) -> Tensor:
        """(B, H, T) softmax attention of the first token (cls) over every token,
        itself included; masked keys get 0."""
        q = self.queries[:, :, :1]
        logits = (q @ self.keys.transpose(-2, -1)) * self.keys.shape[-1] ** -0.5  # (B, H, 1, T)
        if self.bias is not None:
            bias = self.bias if self.bias.shape[-2] == 1 else self.bias[..., :1, :]
            logits = logits + bias
        return logits.softmax(-1)[:, :, 0]


def gather_tokens(token_out: Tensor, source: Tensor) -> Tensor:
    """Restore per-token outputs to the patch grid.

    token_out: (B, T', C) outputs of the T' patch tokens; source: (B, N) indices into
    T'. Returns (B, N, C) with row n equal to ``token_out[b, source[b, n]]``.
    """
    return torch.gather(token_out, 1, source.unsqueeze(-1).expand(-1, -1, token_out.shape[-1]))


def padding_bias(keep: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """(B, T) keep mask -> (B, 1, 1, T) additive bias with -inf on dropped keys."""
    if keep is None:
        return None
    bias = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
    bias = bias.masked_fill(~keep, float("-inf"))
    return bias[:, None, None, :]


@dataclass(frozen=True)
class TrainingTask:
    """A part a method needs trained before it can be built (auxiliary heads, a learned
    scoring network). ``run(context)`` trains it and writes ``path``, the file the
    method's ``from_config`` then reads; ``name`` says what it is, for progress lines."""

    name: str
    path: Path
    run: Callable[["TrainingContext"], Any]


@dataclass(frozen=True)
class TrainingContext:
    """What a :class:`TrainingTask` may take from its caller: the data root, the model
    window (None: the dataset's), whether to show progress,
    ``frozen_encoder(backbone, window)``, the framework's encoder with real weights (eval
    mode), so that a method's training builds no model of its own, and ``layer_cache``,
    the framework's cache of that encoder's tokens (reached through
    :meth:`layer_features`; the caller passes
    :func:`algm.training.features.frozen_layer_features`)."""

    data_root: str | None = None
    window: tuple[int, int] | None = None
    progress: bool = True
    frozen_encoder: Callable[[str, tuple[int, int]], nn.Module] | None = None
    layer_cache: Callable[..., Any] | None = None

    def layer_features(self, backbone, dataset, layers: Sequence[int], split: str = "train",
                       limit: int | None = None) -> Any:
        """The frozen encoder's patch tokens after the 1-based blocks ``layers`` for every
        training window of ``dataset``'s ``split`` (first ``limit`` frames): a
        :class:`~algm.training.features.LayerFeatures` with ``features`` (W, L, N, D) fp16
        and the windows' pixel ``labels`` (W, h, w). One encoder forward per frame, cached
        by the framework. backbone: a :class:`~algm.config.ViTConfig`; dataset: a
        :class:`~algm.config.DatasetSpec`."""
        if self.frozen_encoder is None or self.layer_cache is None:
            raise ValueError("this training needs the framework's frozen encoder and its feature cache "
                             "(TrainingContext.frozen_encoder and .layer_cache)")
        return self.layer_cache(self, backbone, dataset, layers, split=split, limit=limit)


class TokenReduction(nn.Module):
    """Base class: every hook is the identity, restore gathers through ``source``.

    A method is one subclass in one file, registered where it is defined with
    :func:`algm.methods.register_method`. It declares:

    * ``name``, its registry name, and ``Config``, a frozen dataclass of its knobs
      (fields made with :func:`algm.methods.option`, which builds the CLI and suites);
    * ``from_config(config, backbone, dataset)``, which resolves per-backbone / dataset
      defaults and builds the method;
    * ``training_tasks(config, backbone, dataset)``, the parts it needs trained before
      ``from_config`` can succeed (``algm-bench train`` and the suites run the missing
      ones, :meth:`required_training`; nothing else names a method);
    * ``settings()``, the resolved knobs (table columns, labels), ``trained_parts()``,
      the files of its trained parts, and ``label_keys``, the settings that a picture's
      label shows (None: all). :meth:`identity` joins name, settings and the parts'
      content digests: every cache key (suite rows, features, heads) is built from it;
    * ``flop_handles``, fvcore handles for any op of its steps that fvcore does not
      count (``{"aten::cdist": handle}``); an uncounted op with a cost is an error
      (:func:`algm.measure.flops.uncounted_ops`), never a silent zero.

    Subclasses override only the hooks they need.
    """

    name = "none"
    label_keys: tuple[str, ...] | None = None
    flop_handles: dict[str, Callable] = {}
    # Options that build the method without its trained parts (e.g. random heads), for
    # timing and GFLOPs only, where nothing is trained (a GPU check iterating the registry).
    untrained_options: dict[str, Any] = {}

    @dataclass(frozen=True)
    class Config:
        pass

    @classmethod
    def from_config(cls, config, backbone, dataset) -> "TokenReduction":
        """Build from a ``Config`` for a :class:`~algm.config.ViTConfig` backbone and a
        :class:`~algm.config.DatasetSpec` dataset; by default ``cls(**config fields)``."""
        return cls(**{f.name: getattr(config, f.name) for f in fields(config)})

    @classmethod
    def training_tasks(cls, config, backbone, dataset) -> list[TrainingTask]:
        """Every trained part this config reads, trained or not (none by default)."""
        return []

    @classmethod
    def required_training(cls, config, backbone, dataset) -> list[TrainingTask]:
        """The :meth:`training_tasks` whose file is not there yet."""
        return [task for task in cls.training_tasks(config, backbone, dataset) if not task.path.is_file()]

    def settings(self) -> dict:
        return {}

    def trained_parts(self) -> dict[str, Path]:
        """``{part: file}`` of the trained parts this instance loaded (none by default)."""
        return {}

    def identity(self) -> dict:
        """What a result of this method depends on: name, resolved settings and the
        sha256 of every trained part's file (retraining into the same path changes it)."""
        parts = {name: file_sha256(path) for name, path in sorted(self.trained_parts().items())}
        return {"method": self.name, "settings": self.settings(), "trained": parts}

    def label_settings(self) -> dict:
        """The settings a label shows: those in ``label_keys`` (None: all), unset ones left out."""
        settings = self.settings()
        keys = self.label_keys if self.label_keys is not None else tuple(settings)
        return {k: settings[k] for k in keys if settings.get(k) is not None}

    def label(self) -> str:
        """``algm (tau=0.985, layers=1,5)``: the name with its :meth:`label_settings`."""
        parts = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.label_settings().items()]
        return f"{self.name} ({', '.join(parts)})" if parts else self.name

    def begin(self, patches: Tensor, ctx: EncoderContext) -> TokenState:
        """patches: (B, N, D) embedded patches with pos-embed. Returns patch-only state."""
        return TokenState.identity(patches, ctx.grid)

    def attn_bias(self, state: TokenState, layer: int) -> Tensor | None:
        """Additive bias for the attention logits, broadcastable to (B, H, T, T)."""
        return padding_bias(state.keep, state.x.dtype)

    def mid_block(self, state: TokenState, layer: int, attn: AttentionView) -> TokenState:
        """``attn``: this block's :class:`AttentionView` (keys (B, H, T, d), queries,
        cls attention on demand)."""
        return state

    def after_block(self, state: TokenState, layer: int) -> TokenState:
        return state

    def before_decoder(self, state: TokenState) -> TokenState:
        """The final normalised state -> the tokens the decoder sees. A method that
        reconstructs the full grid of features returns a state with one token per patch
        (``source`` the identity); tokens kept were counted before this hook."""
        return state

    def restore(self, token_out: Tensor, state: TokenState) -> Tensor:
        """token_out: (B, T - prefix, C) per patch token -> (B, N, C) per original patch."""
        return gather_tokens(token_out, state.source)

    def token_map(self, state: TokenState) -> Tensor:
        """(B, N) long: the token holding every original patch of a final state, -1 where
        no token holds it any more (pruned); pictures draw it."""
        return state.source


class NoReduction(TokenReduction):
    """The ``none`` baseline: tokens pass untouched, restore is the identity."""

    def restore(self, token_out: Tensor, state: TokenState) -> Tensor:
        return token_out


def prepend_cls(state: TokenState, cls: Tensor) -> TokenState:
    """Add the (1, 1, D) cls token in front of a patch-only state (``prefix`` 0 -> 1)."""
    if state.prefix != 0:
        raise ValueError(f"begin must return a patch-only state (prefix 0), got prefix {state.prefix}")
    b = state.x.shape[0]
    x = torch.cat([cls.expand(b, -1, -1), state.x], dim=1)
    ones = torch.ones(b, 1, dtype=state.size.dtype, device=state.size.device)
    keep = state.keep
    if keep is not None:
        keep = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=keep.device), keep], 1)
    return state.replace(x=x, size=torch.cat([ones, state.size], 1), keep=keep, prefix=1)
