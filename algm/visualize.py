"""Pictures of what a segmenter with token reduction does.

* :func:`predict` runs a model on one image (resized to its window, normalised the way
  its encoder expects) and returns a :class:`Prediction`: the logits exactly as the
  model returned them and the *token map*, the final ``TokenState.source`` (every patch
  -> the token that holds it; ``-1`` where a pruning method dropped the patch).
* drawing: :func:`colorize` / :func:`save_label_png` (palette maps), :func:`overlay_rgb`,
  :func:`token_map_rgb` (every token its own colour, patch grid, token borders), and the
  figures :func:`overlay_figure`, :func:`tokens_figure`, :func:`compare_figure`.
* :func:`write_gallery`: the suites' gallery, token maps of several methods on fixed
  frames (:data:`CAMVID_GALLERY_FRAMES`, read with :func:`gallery_frames`).

Matplotlib is used through ``matplotlib.figure.Figure`` only (Agg canvas, no pyplot, no
global backend switch), so this module is safe to import in servers and tests.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.colors import hsv_to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from torch import Tensor

from algm.config import DatasetSpec, ViTConfig, check_window

PRUNED_COLOR = (25, 25, 25)  # patches no token holds any more (pruned / exited early)
BORDER_COLOR = (0, 0, 0)  # between patches of different tokens
GRID_COLOR = (255, 255, 255)  # thin patch grid, blended
GRID_ALPHA = 0.35
OVERLAY_ALPHA = 0.5
TOKEN_IMAGE_WEIGHT = 0.25  # share of the (grey) image under a merged token's colour
SINGLE_IMAGE_WEIGHT = 0.72  # ... under a token that holds a single patch
LEGEND_MAX = 14

# Four CamVid val frames spread over the split (val.txt lines 1, 41, 71, 101): parked and
# moving cars with cyclists, a convertible close by, pedestrians at a bike lane, a cyclist
# at a junction. Fixed so that galleries of different runs compare.
CAMVID_GALLERY_FRAMES = ("0016E5_07959", "0016E5_08039", "0016E5_08099", "0016E5_08159")


# ============================================================== classes and colours
def class_meta(dataset: str, n_cls: int) -> tuple[tuple[str, ...], np.ndarray]:
    """Class names and (n_cls, 3) uint8 palette of ``dataset`` (Pascal Context: 60 or 59).

    No data needs to be on disk. A model predicting another number of classes than
    the dataset has is an error (the colours would lie)."""
    from algm.data import datasets as d

    table = {
        "camvid": (d.CAMVID_CLASSES, d.CAMVID_PALETTE),
        "ade20k": (d.ADE20K_CLASSES, d.ADE20K_PALETTE),
        "cityscapes": (d.CITYSCAPES_CLASSES, d.CITYSCAPES_PALETTE),
        "pascal": (d.PASCAL_CONTEXT_CLASSES, d.PASCAL_CONTEXT_PALETTE),
        "cocostuff": (d.COCO_STUFF_CLASSES, d.COCO_STUFF_PALETTE),
    }
    if dataset not in table:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of: {', '.join(table)}")
    classes, palette = table[dataset]
    if dataset == "pascal" and n_cls == len(classes) - 1:
        classes, palette = classes[1:], palette[1:]
    if n_cls != len(classes):
        raise ValueError(f"the model predicts {n_cls} classes but {dataset} has {len(classes)}; "
                         f"pass the --dataset the model was trained on")
    return tuple(c.strip() for c in classes), np.asarray(palette, dtype=np.uint8)


def distinct_colors(n: int) -> np.ndarray:
    """(n, 3) uint8 colours, pairwise different, consecutive ones far apart in hue
    (golden-ratio hue steps, cycling saturation and brightness; never dark)."""
    i = np.arange(n)
    hue = (i * 0.6180339887498949) % 1.0
    sat = np.array([0.85, 0.55, 0.70])[i % 3]
    val = np.array([1.0, 0.82, 0.92, 0.74])[(i // 3) % 4]
    rgb = np.round(hsv_to_rgb(np.stack([hue, sat, val], -1)) * 255).astype(np.int64)
    taken: set[tuple[int, int, int]] = set()
    for k in range(n):  # nudge the rare rounding collisions apart
        c = tuple(int(v) for v in rgb[k])
        step = 0
        while c in taken or c == PRUNED_COLOR:
            step += 1
            c = (c[0], c[1], (c[2] + step * 37) % 256) if step % 2 else ((c[0] + step) % 256, c[1], c[2])
        taken.add(c)
        rgb[k] = c
    return rgb.astype(np.uint8)


def colorize(labels: np.ndarray | Tensor, palette: np.ndarray) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8 colours."""
    labels = labels.cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    return np.asarray(palette, dtype=np.uint8)[labels]


def save_label_png(labels: np.ndarray | Tensor, palette: np.ndarray, path: str | Path) -> Path:
    """A palette ("P" mode) PNG: shows the colours, reads back as class indices."""
    from PIL import Image

    labels = labels.cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if labels.max(initial=0) > 255:
        raise ValueError("a palette PNG holds at most 256 classes")
    im = Image.fromarray(labels.astype(np.uint8), mode="P")
    flat = np.zeros((256, 3), dtype=np.uint8)
    flat[: len(palette)] = palette
    im.putpalette(flat.reshape(-1).tolist())
    im.save(path)
    return Path(path)


def overlay_rgb(image: np.ndarray, labels: np.ndarray, palette: np.ndarray,
                alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """Prediction colours blended over the (H, W, 3) uint8 image."""
    colours = colorize(labels, palette).astype(np.float32)
    return np.round((1 - alpha) * image.astype(np.float32) + alpha * colours).astype(np.uint8)


# ================================================================ images and inputs
def _open_image(path: str | Path, decode: bool) -> np.ndarray | None:
    """Open an image file; decode it to (H, W, 3) uint8 RGB, or only verify its header.

    Raises FileNotFoundError / ValueError that name the file."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image not found: {path}")
    if not path.is_file():
        raise ValueError(f"not an image file: {path} is a folder")
    try:
        with Image.open(path) as im:
            if decode:
                return np.array(im.convert("RGB"))
            im.verify()
            return None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from None


def read_image(path: str | Path) -> Tensor:
    """(3, H, W) uint8 RGB of an image file; FileNotFoundError / ValueError that name it."""
    return torch.from_numpy(_open_image(path, decode=True)).permute(2, 0, 1).contiguous()


def check_image(path: str | Path) -> None:
    """Fail like :func:`read_image` without decoding the pixels (cheap up-front check)."""
    _open_image(path, decode=False)


def prepare_input(image: Tensor, window: tuple[int, int], mean: Sequence[float],
                  std: Sequence[float]) -> Tensor:
    """(3, H, W) uint8 -> (1, 3, h, w) float: resized to the window (bilinear, no
    antialiasing, as :func:`algm.data.transforms.preprocess`), normalised with
    ``mean`` / ``std`` on the 0..1 scale. For CamVid frames (480x360 into 448x336) this
    is exactly ``preprocess`` at the test scale."""
    x = image.unsqueeze(0).float().div_(255)
    if tuple(x.shape[-2:]) != tuple(window):
        x = F.interpolate(x, size=tuple(window), mode="bilinear", align_corners=False)
    mean_t = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def to_rgb(image: Tensor) -> np.ndarray:
    """(3, H, W) uint8 tensor -> (H, W, 3) uint8 array."""
    return image.permute(1, 2, 0).cpu().numpy()


# ======================================================================== predicting
@dataclass(frozen=True)
class Prediction:
    """One image through one model.

    image: (3, H, W) uint8 as read; input: (1, 3, h, w) what the model got;
    logits: (1, n_cls, h, w) float32 exactly as returned (no softmax/argmax);
    source: (gh, gw) long token index of every patch (-1: pruned, no token holds it);
    exit_layer: (gh, gw) long 1-based block a pruned patch left after (0: stayed), or None;
    tokens: (depth,) tokens alive after every block, cls included.
    """

    image: Tensor
    input: Tensor
    logits: Tensor
    source: Tensor
    tokens: Tensor
    method: str
    settings: dict = field(default_factory=dict)
    exit_layer: Tensor | None = None

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.source.shape)

    @property
    def n_patches(self) -> int:
        return self.source.numel()

    @property
    def n_tokens(self) -> int:
        """Patch tokens alive after the last block (cls not counted)."""
        return int(self.tokens[-1]) - 1

    @property
    def n_pruned(self) -> int:
        return int((self.source < 0).sum())

    def token_ids(self) -> Tensor:
        """The distinct token indices that hold at least one patch."""
        return torch.unique(self.source[self.source >= 0])

    def labels(self, size: tuple[int, int] | None = None) -> Tensor:
        """(H, W) long argmax of the logits resized (bilinear) to ``size`` (default:
        the image's own size), as Segmenter resizes predictions back."""
        size = tuple(size) if size is not None else tuple(self.image.shape[-2:])
        logits = self.logits.float()
        if tuple(logits.shape[-2:]) != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits[0].argmax(0).cpu()


@torch.no_grad()
def predict(model, image: Tensor, window: tuple[int, int], mean: Sequence[float] | None = None,
            std: Sequence[float] | None = None, device: str | torch.device | None = None) -> Prediction:
    """Run ``model`` (a Segmenter with its method) once on ``image`` (3, H, W) uint8.

    The input is :func:`prepare_input` at ``window`` with the encoder's own
    normalisation unless ``mean`` / ``std`` are given. One forward pass: the final
    ``TokenState`` is read with a forward hook on ``model.encoder`` (nothing patched).
    """
    cfg = model.encoder.cfg
    check_window(tuple(window), cfg.patch_size)
    mean = tuple(mean) if mean is not None else cfg.mean
    std = tuple(std) if std is not None else cfg.std
    if device is None:
        device = next(model.parameters()).device
    x = prepare_input(image, window, mean, std).to(device)
    captured = {}
    hook = model.encoder.register_forward_hook(lambda mod, args, out: captured.__setitem__("state", out[0]))
    try:
        out = model.run(x)
    finally:
        hook.remove()
    state = captured["state"]
    gh, gw = state.grid
    source = state.source[0].detach().cpu().clone()
    exit_layer = None
    exited = getattr(state.aux, "exited", None)
    if isinstance(exited, Tensor):
        source[exited[0].cpu()] = -1
        layer = getattr(state.aux, "exit_layer", None)
        if isinstance(layer, Tensor):
            exit_layer = layer[0].detach().cpu().reshape(gh, gw)
    return Prediction(
        image=image.cpu(), input=x.cpu(), logits=out.logits.detach().float().cpu(),
        source=source.reshape(gh, gw), tokens=out.tokens[0].detach().cpu(),
        method=model.method.name, settings=dict(model.method.settings()), exit_layer=exit_layer,
    )


# ========================================================================= token maps
def compact_ids(source: np.ndarray) -> tuple[np.ndarray, int]:
    """Renumber token indices 0..K-1 in order of first appearance (raster order), so
    colours are stable and neighbours get consecutive (far apart) colours; -1 stays."""
    source = np.asarray(source)
    flat = source.reshape(-1)
    alive = flat >= 0
    uniq, first = np.unique(flat[alive], return_index=True)
    order = uniq[np.argsort(first)]
    lut = {int(t): k for k, t in enumerate(order)}
    out = np.full(flat.shape, -1, dtype=np.int64)
    out[alive] = [lut[int(t)] for t in flat[alive]]
    return out.reshape(source.shape), len(order)


def _pixel_patches(length: int, cells: int) -> np.ndarray:
    """Patch index of every pixel row/column when ``cells`` patches span ``length`` pixels."""
    return np.minimum(((np.arange(length) + 0.5) * cells / length).astype(np.int64), cells - 1)


def token_map_rgb(source: np.ndarray | Tensor, size: tuple[int, int] | None = None,
                  image: np.ndarray | None = None, image_weight: float = TOKEN_IMAGE_WEIGHT,
                  single_weight: float = SINGLE_IMAGE_WEIGHT, grid: bool = True,
                  borders: bool = True) -> np.ndarray:
    """(gh, gw) token index per patch -> (H, W, 3) uint8 picture.

    Every token gets its own colour (:func:`distinct_colors`); patches no token holds
    (-1) are near-black. With ``image`` (H, W, 3) its grey version shows through: with
    ``image_weight`` under tokens that hold several patches, with ``single_weight``
    under tokens of one patch (so merged groups stand out as solid areas and the scene
    stays readable where nothing merged). ``grid`` draws the patch grid (thin, light),
    ``borders`` a dark line between patches of different tokens where one of them is
    merged or pruned (a single-patch token is outlined by the grid alone, so ``none``
    shows the plain patch grid). ``size`` defaults to the image's, else 16 pixels per
    patch.
    """
    src = source.cpu().numpy() if isinstance(source, Tensor) else np.asarray(source)
    ids, k = compact_ids(src)
    gh, gw = ids.shape
    if size is None:
        size = image.shape[:2] if image is not None else (gh * 16, gw * 16)
    h, w = size
    py, px = _pixel_patches(h, gh), _pixel_patches(w, gw)
    pix = ids[py][:, px]
    colours = np.concatenate([distinct_colors(k), np.asarray([PRUNED_COLOR], np.uint8)])
    rgb = colours[pix].astype(np.float32)  # -1 indexes the last row: PRUNED_COLOR
    if image is not None:
        if image.shape[:2] != (h, w):
            raise ValueError(f"image is {image.shape[:2]}, token map {size}")
        grey = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        sizes = np.bincount(ids[ids >= 0], minlength=k)
        weight = np.where(sizes > 1, image_weight, single_weight).astype(np.float32)
        weight = np.concatenate([weight, np.float32([image_weight])])[pix][..., None]
        rgb = (1 - weight) * rgb + weight * grey[..., None]
    if grid:
        cols = np.flatnonzero(px[1:] != px[:-1]) + 1
        rows = np.flatnonzero(py[1:] != py[:-1]) + 1
        g = np.asarray(GRID_COLOR, np.float32)
        rgb[:, cols] = (1 - GRID_ALPHA) * rgb[:, cols] + GRID_ALPHA * g
        rgb[rows, :] = (1 - GRID_ALPHA) * rgb[rows, :] + GRID_ALPHA * g
    if borders:  # between different tokens, one of them merged (or pruned)
        big = np.concatenate([np.bincount(ids[ids >= 0], minlength=k) > 1, [True]])[pix]
        edge = np.zeros((h, w), dtype=bool)
        dx = (pix[:, 1:] != pix[:, :-1]) & (big[:, 1:] | big[:, :-1])
        dy = (pix[1:, :] != pix[:-1, :]) & (big[1:, :] | big[:-1, :])
        edge[:, 1:] |= dx
        edge[:, :-1] |= dx
        edge[1:, :] |= dy
        edge[:-1, :] |= dy
        rgb[edge] = BORDER_COLOR
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def method_label(method: str, settings: Mapping | None = None) -> str:
    """``algm (tau=0.985, layers=1,5)``: the method with the knobs that tell settings apart."""
    keys = {"algm": ("tau", "layers", "stages"), "tome": ("r", "schedule", "reduction"),
            "cts": ("policy", "k"), "prune": ("p0", "exit_layers", "heads")}
    settings = dict(settings or {})
    shown = keys.get(method, tuple(settings))
    parts = []
    for key in shown:
        value = settings.get(key)
        if value is None or (key == "stages" and value == "both"):
            continue
        if key == "heads":  # "trained:<file>" or "random"
            if str(value).startswith("random"):
                parts.append("RANDOM exit heads")
            continue
        parts.append(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}")
    return f"{method} ({', '.join(parts)})" if parts else method


def tokens_caption(pred: Prediction) -> str:
    """``608 of 768 tokens kept (79.2 %)`` (+ how many patches were pruned)."""
    text = f"{pred.n_tokens} of {pred.n_patches} tokens kept ({100 * pred.n_tokens / pred.n_patches:.1f} %)"
    if pred.n_pruned:
        text += f", {pred.n_pruned} patches pruned (dark)"
    return text


# =========================================================================== figures
def _wrap(text: str, width_in: float) -> str:
    chars = max(30, int(width_in * 13))
    return "\n".join(textwrap.fill(line, chars) for line in text.split("\n"))


def _present(labels: np.ndarray, classes: Sequence[str], palette: np.ndarray, limit: int = LEGEND_MAX):
    """Legend handles of the classes present, largest share first."""
    counts = np.bincount(np.asarray(labels).reshape(-1), minlength=len(classes))
    order = [int(c) for c in np.argsort(-counts, kind="stable") if counts[c] > 0]
    total = counts.sum()
    handles = [Patch(facecolor=np.asarray(palette[c]) / 255, edgecolor="black", linewidth=0.5,
                     label=f"{classes[c]}  {100 * counts[c] / total:.1f} %") for c in order[:limit]]
    if len(order) > limit:
        handles.append(Patch(facecolor="white", edgecolor="white", label=f"+ {len(order) - limit} more"))
    return handles


def _single_figure(rgb: np.ndarray, title: str, handles: list | None = None,
                   legend_title: str | None = None) -> Figure:
    """The picture at (at least) its own pixel size, a title above, a legend right."""
    h, w = rgb.shape[:2]
    dpi = 100
    scale = max(1.0, 420 / w)
    img_w, img_h = w * scale / dpi, h * scale / dpi
    legend_w = 2.3 if handles else 0.0
    fig_w = img_w + legend_w
    title = _wrap(title, fig_w)
    title_h = 0.22 * (title.count("\n") + 1) + 0.15
    fig_h = img_h + title_h
    fig = Figure(figsize=(fig_w, fig_h), dpi=dpi)
    ax = fig.add_axes((0, 0, img_w / fig_w, img_h / fig_h))
    ax.imshow(rgb, interpolation="nearest")
    ax.set_axis_off()
    fig.text(0.5 * img_w / fig_w if not handles else 0.5, 1 - 0.08 / fig_h, title, ha="center", va="top",
             fontsize=10)
    if handles:
        fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(img_w / fig_w + 0.01, img_h / fig_h),
                   fontsize=8, title=legend_title, title_fontsize=8, frameon=False, handlelength=1.2)
    return fig


def overlay_figure(pred: Prediction, classes: Sequence[str], palette: np.ndarray, title: str) -> Figure:
    """The prediction blended over the image, a legend of the classes present."""
    labels = pred.labels().numpy()
    rgb = overlay_rgb(to_rgb(pred.image), labels, palette)
    return _single_figure(rgb, title, _present(labels, classes, palette), "predicted classes")


def tokens_figure(pred: Prediction, title: str) -> Figure:
    """The token map over the image; the title ends with the number of tokens kept."""
    rgb = token_map_rgb(pred.source, image=to_rgb(pred.image))
    handles = None
    if pred.n_pruned:
        handles = [Patch(facecolor=np.asarray(PRUNED_COLOR) / 255, label="pruned (no token)")]
    return _single_figure(rgb, f"{title}\n{tokens_caption(pred)}", handles)


def save_figure(fig: Figure, path: str | Path) -> Path:
    fig.savefig(path, dpi=fig.dpi, facecolor="white")
    return Path(path)


def save_prediction(pred: Prediction, out_dir: str | Path, name: str, classes: Sequence[str],
                    palette: np.ndarray, title: str, save_logits: bool = False) -> list[Path]:
    """Write ``<name>_pred.png``, ``<name>_overlay.png``, ``<name>_tokens.png`` (and with
    ``save_logits`` ``<name>_logits.pt``: the (1, n_cls, h, w) float32 logits) to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [save_label_png(pred.labels(), palette, out / f"{name}_pred.png"),
               save_figure(overlay_figure(pred, classes, palette, title), out / f"{name}_overlay.png"),
               save_figure(tokens_figure(pred, title), out / f"{name}_tokens.png")]
    if save_logits:
        path = out / f"{name}_logits.pt"
        torch.save(pred.logits.contiguous(), path)
        written.append(path)
    return written


def _grid_figure(n_rows: int, n_cols: int, cell: tuple[int, int], title: str,
                 title_lines: int = 2, bottom: float = 0.0):
    """A figure of n_rows x n_cols image cells of ``cell`` (h, w) pixels (shown at
    ~3.6 inch wide), room for a title per cell; returns (fig, axes[row][col])."""
    h, w = cell
    cell_w = 3.6
    cell_h = cell_w * h / w
    pad_h = 0.2 * title_lines + 0.1
    top = 0.25 * (title.count("\n") + 1) + 0.2
    bottom += 0.1
    fig_w, fig_h = n_cols * cell_w + 0.1 * (n_cols + 1), n_rows * (cell_h + pad_h) + top + bottom
    fig = Figure(figsize=(fig_w, fig_h), dpi=100)
    axes = []
    for r in range(n_rows):
        row = []
        for c in range(n_cols):
            left = (0.1 + c * (cell_w + 0.1)) / fig_w
            y = (fig_h - top - (r + 1) * (cell_h + pad_h)) / fig_h
            ax = fig.add_axes((left, y, cell_w / fig_w, cell_h / fig_h))
            ax.set_axis_off()
            row.append(ax)
        axes.append(row)
    fig.text(0.5, 1 - 0.1 / fig_h, title, ha="center", va="top", fontsize=12)
    return fig, axes


def compare_figure(preds: Sequence[tuple[str, Prediction]], classes: Sequence[str], palette: np.ndarray,
                   title: str) -> Figure:
    """One column per model: prediction overlay on top, token map below; one legend."""
    if not preds:
        raise ValueError("nothing to compare")
    image = to_rgb(preds[0][1].image)
    h, w = image.shape[:2]
    all_labels = []
    fig, axes = _grid_figure(2, len(preds), (h, w), title, bottom=0.9)
    for c, (label, pred) in enumerate(preds):
        labels = pred.labels().numpy()
        all_labels.append(labels)
        axes[0][c].imshow(overlay_rgb(image, labels, palette), interpolation="nearest")
        axes[0][c].set_title(_wrap(label, 3.6), fontsize=9)
        axes[1][c].imshow(token_map_rgb(pred.source, image=image), interpolation="nearest")
        axes[1][c].set_title(_wrap(tokens_caption(pred), 3.6), fontsize=9)
    handles = _present(np.stack(all_labels), classes, palette, limit=24)
    fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=8,
               frameon=False, handlelength=1.2, bbox_to_anchor=(0.5, 0.0))
    return fig


# =========================================================================== gallery
def gallery_frames(root: str | Path | None = None, names: Sequence[str] = CAMVID_GALLERY_FRAMES,
                   split: str = "val") -> list[tuple[str, Tensor]]:
    """The fixed CamVid frames of the gallery as (name, (3, H, W) uint8)."""
    from algm.data.datasets import build_dataset

    dataset = build_dataset("camvid", split, root=root)
    index = {name: i for i, (_, _, name) in enumerate(dataset.files)}
    missing = [n for n in names if n not in index]
    if missing:
        raise ValueError(f"camvid {split} has no frame(s) {', '.join(missing)}")
    return [(n, dataset[index[n]].image) for n in names]


def method_variants(model, backbone: ViTConfig, dataset: DatasetSpec,
                    methods: Iterable[str] | None = None) -> dict[str, object]:
    """``{label: Segmenter}``: ``model``'s encoder and decoder (shared, not copied) driven
    by every method at its default setting (default: all registered methods).

    Pruning without trained exit heads falls back to random heads (its label says so:
    nothing then exits at the default p0, so its map equals ``none``)."""
    from algm.methods import METHODS, build_method

    out = {}
    for name in (methods if methods is not None else METHODS):
        try:
            method = build_method(name, backbone, dataset)
        except FileNotFoundError:
            if name != "prune":
                raise
            method = build_method(name, backbone, dataset, random_heads=True)
        variant = model.with_method(method).eval()
        out[method_label(name, method.settings())] = variant
    return out


def _model_input(obj, window: tuple[int, int] | None):
    """(model, window) of a Setup or a bare Segmenter (+ ``window``)."""
    if hasattr(obj, "model") and hasattr(obj, "window"):
        return obj.model, tuple(window or obj.window)
    if window is None:
        cfg = obj.encoder.cfg
        window = (cfg.pos_grid[0] * cfg.patch_size, cfg.pos_grid[1] * cfg.patch_size)
    return obj, tuple(window)


def write_gallery(models: Mapping[str, object], frames: Sequence, out_path: str | Path, *,
                  window: tuple[int, int] | None = None, title: str | None = None) -> Path:
    """Token maps of every model on every frame, one row per frame: the image, then one
    column per model with its token count. Writes ``out_path`` (PNG) and returns it.

    models: ``{label: Setup or Segmenter}`` (e.g. :func:`method_variants`); a Segmenter
    needs ``window`` (default: its pos-embed grid). frames: ``(name, (3, H, W) uint8)``
    pairs (:func:`gallery_frames`), bare tensors, or image paths. Everything is computed
    before the file is written.
    """
    if not models:
        raise ValueError("write_gallery: no models")
    items = []
    for k, frame in enumerate(frames):
        if isinstance(frame, (str, Path)):
            items.append((Path(frame).stem, read_image(frame)))
        elif isinstance(frame, Tensor):
            items.append((f"frame {k}", frame))
        else:
            items.append((str(frame[0]), frame[1]))
    if not items:
        raise ValueError("write_gallery: no frames")
    runs = {label: _model_input(obj, window) for label, obj in models.items()}
    for model, _ in runs.values():
        model.eval()
    cells = [[predict(model, image, win) for model, win in runs.values()] for _, image in items]
    h, w = items[0][1].shape[-2:]
    head = title or "Token maps: every final token in its own colour (patch grid light, token borders dark)"
    fig, axes = _grid_figure(len(items), len(runs) + 1, (h, w), head, title_lines=3)
    for r, ((name, image), preds) in enumerate(zip(items, cells)):
        rgb = to_rgb(image)
        axes[r][0].imshow(rgb, interpolation="nearest")
        axes[r][0].set_title(name, fontsize=9)
        for c, (label, pred) in enumerate(zip(runs, preds), start=1):
            if rgb.shape[:2] != tuple(pred.image.shape[-2:]):
                raise ValueError("frames must all have the same size")
            axes[r][c].imshow(token_map_rgb(pred.source, image=rgb), interpolation="nearest")
            axes[r][c].set_title(_wrap(f"{label}\n{tokens_caption(pred)}", 3.6), fontsize=8)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, out)
