"""mIoU of a segmenter on a dataset split (SPEC section 4).

Per image: resize so the short side equals the window's short side (aspect kept),
normalise with the backbone's mean/std, sliding-window inference (logits of overlapping
windows averaged), bilinear upsampling of the logits to the label's original size, argmax,
and one confusion matrix over the whole split.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from algm import distributed as dist
from algm.config import ViTConfig
from algm.data.transforms import preprocess
from algm.measure.miou import ConfusionMatrix, MIoUResult, metrics_from_confusion

DEFAULT_OVERLAP = 32  # default stride = window - 32 pixels per side (SPEC section 4)


def default_stride(window: tuple[int, int]) -> tuple[int, int]:
    """Window minus 32 pixels per side, at least 1."""
    return (max(window[0] - DEFAULT_OVERLAP, 1), max(window[1] - DEFAULT_OVERLAP, 1))


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Offsets of the windows along one side (``size >= window``): every ``stride``
    pixels, the last one moved back to end flush with the image (mmseg's rule)."""
    n = max(size - window + stride - 1, 0) // stride + 1
    return [min(i * stride, size - window) for i in range(n)]


def slide_inference(model: nn.Module, image: Tensor, window: tuple[int, int], stride: tuple[int, int],
                    n_cls: int, batch_size: int | None = None) -> Tensor:
    """Logits (1, n_cls, H, W) of a normalised image (1, 3, H, W) by sliding windows.

    An image smaller than the window along a side is zero-padded at the bottom/right
    (zero = the mean colour after normalisation) and the pad cropped off again. Each
    ``model`` call gets a (k, 3, h, w) batch of windows and must return (k, n_cls, h, w);
    ``batch_size`` caps k (default: all windows of the image in one call). Methods whose
    merging couples the images of a batch (the authors' ``r = min over batch``) give
    per-window results only with ``batch_size=1``.
    """
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"slide_inference takes one image (1, 3, H, W), got {tuple(image.shape)}")
    if min(stride) < 1:
        raise ValueError(f"stride must be positive, got {stride}")
    height, width = image.shape[-2:]
    h, w = window
    padded = F.pad(image, (0, max(w - width, 0), 0, max(h - height, 0)))
    ph, pw = padded.shape[-2:]
    boxes = [(y, x) for y in window_starts(ph, h, stride[0]) for x in window_starts(pw, w, stride[1])]
    step = batch_size or len(boxes)
    total = padded.new_zeros((1, n_cls, ph, pw))
    count = padded.new_zeros((1, 1, ph, pw))
    for i in range(0, len(boxes), step):
        chunk = boxes[i:i + step]
        out = model(torch.cat([padded[..., y:y + h, x:x + w] for y, x in chunk]))
        if tuple(out.shape) != (len(chunk), n_cls, h, w):
            raise ValueError(f"model returned {tuple(out.shape)} for {len(chunk)} windows of {h}x{w}; "
                             f"expected ({len(chunk)}, {n_cls}, {h}, {w})")
        for (y, x), logits in zip(chunk, out):
            total[0, :, y:y + h, x:x + w] += logits
            count[..., y:y + h, x:x + w] += 1
    return (total / count)[..., :height, :width]


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, window: tuple[int, int],
             stride: tuple[int, int] | None = None, backbone_cfg: ViTConfig | None = None,
             limit: int | None = None, progress: bool = True, batch_size: int | None = None,
             num_workers: int = 0, distributed: bool = False) -> MIoUResult:
    """mIoU of ``model`` (images (B, 3, h, w) -> logits (B, n_cls, h, w)) over ``dataset``.

    ``dataset`` yields :class:`algm.data.datasets.Sample` and has ``n_cls``,
    ``ignore_index`` (a :class:`~algm.data.datasets.SegDataset`). ``window`` (h, w) is the
    inference crop, ``stride`` defaults to :func:`default_stride`. ``backbone_cfg`` gives
    the normalisation (default: ``model.encoder.cfg``). Only the first ``limit`` images
    are used if given; ``result.n_images`` says how many were. Runs on the model's device
    in eval mode (the training flag is restored afterwards); ``batch_size`` as in
    :func:`slide_inference`; ``num_workers`` decode images in background processes.
    With ``distributed`` each process of the :mod:`algm.distributed` group evaluates its
    :func:`~algm.distributed.shard` of the images and every process gets the result of the
    whole split (confusion matrices summed exactly); only rank 0 shows progress.
    """
    if backbone_cfg is None:
        backbone_cfg = getattr(getattr(model, "encoder", None), "cfg", None)
        if backbone_cfg is None:
            raise ValueError("pass backbone_cfg (its mean/std normalise the images): "
                             "the model has no encoder.cfg")
    stride = stride if stride is not None else default_stride(window)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    n_cls, ignore_index = dataset.n_cls, dataset.ignore_index
    subset = Subset(dataset, range(min(limit, len(dataset)))) if limit is not None else dataset
    if distributed:
        subset = Subset(subset, list(dist.shard(range(len(subset)))))
    loader = DataLoader(subset, batch_size=None, num_workers=num_workers)
    confusion = ConfusionMatrix(n_cls, ignore_index)
    was_training = model.training
    model.eval()
    try:
        for sample in tqdm(loader, total=len(subset), disable=not progress or not dist.is_main(),
                           desc="mIoU", unit="img"):
            image = preprocess(sample.image.to(device), min(window), backbone_cfg.mean, backbone_cfg.std)
            logits = slide_inference(model, image, window, stride, n_cls, batch_size)
            size = tuple(sample.label.shape)
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            confusion.update(logits.argmax(1)[0], sample.label.to(device))
    finally:
        model.train(was_training)
    result = confusion.result()
    if distributed:
        n_images = dist.all_reduce_sum(torch.tensor(result.n_images)).item()
        result = metrics_from_confusion(dist.all_reduce_sum(result.confusion), n_images)
    return result
