"""The token-reduction interface: what a method sees and what it may change.

The segmenter owns the model; a method is a small ``nn.Module`` it calls at fixed
hook points (it may hold parameters, e.g. a policy network or auxiliary heads, so it
moves with ``.to(device)`` and shows up in ``state_dict``). Nothing is patched: every
hook takes a :class:`TokenState` and returns a new one.

Hook points, in the order the segmenter calls them::

    begin(patches, ctx)            before the encoder, on patch embeddings (+ pos-embed)
    for every block i (0-based):
        attn_bias(state, i)        additive attention bias (masks, proportional attention)
        mid_block(state, i, keys)  after the attention residual, before the MLP
        after_block(state, i)      after the MLP residual
    restore(token_out, state)      per-token decoder output -> full patch grid

Token bookkeeping (shapes; B batch, T tokens incl. cls, N = h*w original patches):

* ``x``: (B, T, D), cls at index 0.
* ``size``: (B, T) float, number of original patches each token stands for (cls 1).
* ``source``: (B, N) long, for every original patch (raster order) the index of the
  token that holds it, counted among patch tokens (0 .. T-2). Every patch maps to
  exactly one token; restore is one gather through it (no T x N matrices).
* ``keep``: (B, T) bool or None; False marks padding (per-image merging) or tokens
  removed from attention (pruning). None means every token is alive.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class EncoderContext:
    """What ``begin`` may use besides the patch embeddings.

    ``embed(pixels)`` maps (B, 3, p, p) pixel patches to (B, D) embeddings with the
    encoder's own patch conv (CTS embeds downscaled superpatches with it);
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
    aux: Any = None  # method-owned immutable payload (e.g. pruning's exit logits)

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

    @staticmethod
    def identity(patches: Tensor, grid: tuple[int, int]) -> "TokenState":
        """State of unreduced patch tokens (B, N, D), before cls is prepended."""
        b, n, _ = patches.shape
        source = torch.arange(n, device=patches.device).expand(b, n)
        size = torch.ones(b, n, dtype=patches.dtype, device=patches.device)
        return TokenState(x=patches, size=size, source=source, grid=grid)


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
    """A part a method needs trained before it can be built (pruning's exit heads, a
    learned CTS policy). ``run(context)`` trains it and writes ``path``, the file the
    method's ``from_config`` then reads; ``name`` says what it is, for progress lines."""

    name: str
    path: Path
    run: Callable[["TrainingContext"], Any]


@dataclass(frozen=True)
class TrainingContext:
    """What a :class:`TrainingTask` may take from its caller: the data root, the model
    window (None: the dataset's) and whether to show progress."""

    data_root: str | None = None
    window: tuple[int, int] | None = None
    progress: bool = True


class TokenReduction(nn.Module):
    """Base class: every hook is the identity, restore gathers through ``source``.

    A method is one subclass in one file, registered where it is defined with
    :func:`algm.methods.register_method`. It declares:

    * ``name``, its registry name, and ``Config``, a frozen dataclass of its knobs
      (fields made with :func:`algm.methods.option`, which builds the CLI and suites);
    * ``from_config(config, backbone, dataset)``, which resolves per-backbone / dataset
      defaults and builds the method;
    * ``required_training(config, backbone, dataset)``, the parts still to be trained
      before ``from_config`` can succeed (the suites run them; nothing else names a
      method);
    * ``settings()``, the knobs that define a result row (cache keys, table columns),
      and ``label_keys``, the settings that a picture's label shows (None: all).

    Subclasses override only the hooks they need.
    """

    name = "none"
    label_keys: tuple[str, ...] | None = None

    @dataclass(frozen=True)
    class Config:
        pass

    @classmethod
    def from_config(cls, config, backbone, dataset) -> "TokenReduction":
        """Build from a ``Config`` for a :class:`~algm.config.ViTConfig` backbone and a
        :class:`~algm.config.DatasetSpec` dataset; by default ``cls(**config fields)``."""
        return cls(**{f.name: getattr(config, f.name) for f in fields(config)})

    @classmethod
    def required_training(cls, config, backbone, dataset) -> list[TrainingTask]:
        """Parts of this method that must be trained (and are not yet) for this config."""
        return []

    def settings(self) -> dict:
        return {}

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

    def mid_block(self, state: TokenState, layer: int, keys: Tensor) -> TokenState:
        """keys: (B, H, T, d) attention keys of this block."""
        return state

    def after_block(self, state: TokenState, layer: int) -> TokenState:
        return state

    def restore(self, token_out: Tensor, state: TokenState) -> Tensor:
        """token_out: (B, T-1, C) per patch token -> (B, N, C) per original patch."""
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
    """Add the (1, 1, D) cls token in front of a patch-only state."""
    b = state.x.shape[0]
    x = torch.cat([cls.expand(b, -1, -1), state.x], dim=1)
    ones = torch.ones(b, 1, dtype=state.size.dtype, device=state.size.device)
    keep = state.keep
    if keep is not None:
        keep = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=keep.device), keep], 1)
    return state.replace(x=x, size=torch.cat([ones, state.size], 1), keep=keep)
