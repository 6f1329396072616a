"""Plain ViT encoder with token-reduction hook points (SPEC section 1).

Parameter names follow timm / Segmenter (``patch_embed.proj``, ``blocks.{i}.attn.qkv``,
``ls1.gamma`` ...), so official checkpoints and converted weights load strictly.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from timm.layers import LayerScale, Mlp, trunc_normal_
from torch import Tensor, nn

from algm.config import ViTConfig, check_window
from algm.reduction import AttentionView, EncoderContext, NoReduction, TokenReduction, TokenState, prepend_cls

# ``stage(name, layer, fn, *args)`` runs one piece of a forward, ``fn(*args)``, and returns
# its result. ``name`` says which piece: the encoder's "embed", "cls", "attend", "feed",
# "norm", the method hooks "begin", "attn_bias", "mid_block", "after_block" (the
# segmenter adds "before_decoder", "decoder", "restore", "upsample"); ``layer`` is the 0-based block or
# None. The forwards take one so that a timer (algm.measure.breakdown) can step through
# them without a second copy of the loop; the default calls the piece and nothing else.
Stage = Callable[..., Any]


def run_stage(name: str, layer: int | None, fn: Callable[..., Any], *args: Any) -> Any:
    """The default :data:`Stage`: ``fn(*args)``."""
    return fn(*args)


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``.

    The fused kernel is what users time with; fvcore counts it through the handle in
    ``algm.measure.flops``. Returns the queries and keys too, for methods that read them
    (a method may merge on the keys or rank tokens by the cls token's attention).
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """x: (B, T, D); bias: additive, broadcastable to (B, H, T, T).

        Returns the output (B, T, D), the queries and the keys (B, H, T, D/H).
        """
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(b, t, d)), q, k


class Block(nn.Module):
    """Pre-norm transformer block, split in two halves so a method can act in between."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0,
                 norm_eps: float = 1e-6, layer_scale: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, 1e-5) if layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.ls2 = LayerScale(dim, 1e-5) if layer_scale else nn.Identity()

    def attend(self, x: Tensor, bias: Tensor | None = None, prefix: int = 1) -> tuple[Tensor, AttentionView]:
        """x + attention residual; also returns the block's :class:`AttentionView`."""
        a, q, k = self.attn(self.norm1(x), bias)
        return x + self.ls1(a), AttentionView(queries=q, keys=k, bias=bias, prefix=prefix)

    def feed(self, x: Tensor) -> Tensor:
        """x + MLP residual."""
        return x + self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        return self.feed(self.attend(x, bias)[0])


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, N, D), N = (H/p)(W/p) in raster order."""
        return self.proj(images).flatten(2).transpose(1, 2)


class ViTEncoder(nn.Module):
    """ViT encoder; ``forward`` runs a :class:`TokenReduction` method at its hook points."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.patch_size, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.pos_grid[0] * cfg.pos_grid[1], d))
        self.blocks = nn.ModuleList(
            Block(d, cfg.num_heads, cfg.mlp_ratio, cfg.norm_eps, cfg.layer_scale)
            for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def patch_pos(self, grid: tuple[int, int]) -> Tensor:
        """(1, N, D) position embedding of the patches, resized to ``grid`` if needed."""
        pos = self.pos_embed[:, 1:]
        if tuple(grid) == tuple(self.cfg.pos_grid):
            return pos
        gh, gw = self.cfg.pos_grid
        pos = pos.reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
        pos = F.interpolate(pos, size=tuple(grid), mode=self.cfg.pos_interp, align_corners=False)
        return pos.flatten(2).transpose(1, 2).contiguous()  # (B, N, D) layout: see embed

    def embed(self, images: Tensor, labels: Tensor | None = None) -> tuple[Tensor, EncoderContext]:
        """images: (B, 3, H, W) normalised, H and W multiples of the patch size.

        Returns the patch embeddings plus position embedding (B, N, D) and the
        :class:`EncoderContext` that the method's ``begin`` sees.
        """
        grid = check_window(tuple(images.shape[-2:]), self.cfg.patch_size)
        pos = self.patch_pos(grid)
        ctx = EncoderContext(
            images=images, grid=grid, patch_size=self.cfg.patch_size, pos=pos,
            embed=lambda pixels: self.patch_embed(pixels)[:, 0], depth=self.depth,
            labels=labels,
        )
        # pos first: the sum takes pos's contiguous layout (the conv output is a transposed
        # view), so the cls concatenation after it copies without a transpose
        return pos + self.patch_embed(images), ctx

    def add_cls(self, state: TokenState) -> TokenState:
        """Prepend the cls token (with its position embedding) to a patch-only state."""
        return prepend_cls(state, self.cls_token + self.pos_embed[:, :1])

    def forward(self, images: Tensor, method: TokenReduction | None = None,
                labels: Tensor | None = None, stage: Stage = run_stage) -> tuple[TokenState, Tensor]:
        """images: (B, 3, H, W) normalised, H and W multiples of the patch size.

        Returns the final normalised :class:`TokenState` and the tokens alive after
        every block, (B, depth) long (cls included). Every piece runs through
        ``stage(name, layer, fn, *args)`` (see :data:`Stage`; the default just calls it).
        """
        method = method if method is not None else NoReduction()
        state = self.start(images, method, labels, stage)
        state, alive = self.run_blocks(state, method, range(self.depth), stage)
        return stage("norm", None, self.finish, state), torch.stack(alive, 1)

    def start(self, images: Tensor, method: TokenReduction, labels: Tensor | None = None,
              stage: Stage = run_stage) -> TokenState:
        """The state before the first block: patch embedding, the method's ``begin``, cls."""
        patches, ctx = stage("embed", None, self.embed, images, labels)
        state = stage("begin", None, method.begin, patches, ctx)
        return stage("cls", None, self.add_cls, state)

    def run_blocks(self, state: TokenState, method: TokenReduction, blocks: range,
                   stage: Stage = run_stage) -> tuple[TokenState, list[Tensor]]:
        """Run the 0-based ``blocks`` with the method's hooks; returns the state after them
        and the (B,) tokens alive after each. Fine-tuning with a frozen prefix runs the
        first blocks once (cached) and the rest here."""
        alive = []
        for i in blocks:
            blk = self.blocks[i]
            bias = stage("attn_bias", i, method.attn_bias, state, i)
            x, attn = stage("attend", i, blk.attend, state.x, bias, state.prefix)
            state = stage("mid_block", i, method.mid_block, state.replace(x=x), i, attn)
            x = stage("feed", i, blk.feed, state.x)
            state = stage("after_block", i, method.after_block, state.replace(x=x), i)
            alive.append(state.alive())
        return state, alive

    def finish(self, state: TokenState) -> TokenState:
        """The final layer norm on every token."""
        return state.replace(x=self.norm(state.x))


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
