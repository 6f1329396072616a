"""mIoU of a segmenter on a dataset split (SPEC section 4).

Per image: resize so the short side equals the window's short side (aspect kept),
normalise with the backbone's mean/std, sliding-window inference (logits of overlapping
windows averaged; window geometry from :mod:`algm.data.windows`), bilinear upsampling of the logits to the label's original size, argmax,
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
from algm.data.windows import default_stride, pad_to, to_test_scale, window_starts
from algm.measure.miou import ConfusionMatrix, MIoUResult, metrics_from_confusion


def slide_inference(model: nn.Module, image: Tensor, window: tuple[int, int], stride: tuple[int, int],
                    n_cls: int, batch_size: int | None = None) -> Tensor:
    """Logits (1, n_cls, H, W) of a normalised image (1, 3, H, W) by sliding windows.

    An image smaller than the window along a side is zero-padded at the bottom/right
    (zero = the mean colour after normalisation) and the pad cropped off again. Each
    ``model`` call gets a (k, 3, h, w) batch of windows and must return (k, n_cls, h, w);
    ``batch_size`` caps k (default: all windows of the image in one call). Methods whose
    merging couples the images of a batch (the authors' ``r = min over batch``) give
    per-window results only with ``batch_size=1``. The result has the memory layout of
    the model's output (the Segmenter's is channels-last).
    """
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"slide_inference takes one image (1, 3, H, W), got {tuple(image.shape)}")
    if min(stride) < 1:
        raise ValueError(f"stride must be positive, got {stride}")
    height, width = image.shape[-2:]
    h, w = window
    padded = pad_to(image, window)
    ph, pw = padded.shape[-2:]
    rows, cols = window_starts(ph, h, stride[0]), window_starts(pw, w, stride[1])
    boxes = [(y, x) for y in rows for x in cols]
    step = batch_size or len(boxes)
    if len(boxes) == 1:  # one window covers the image (CamVid at test scale): nothing to average
        return _window_logits(model, padded, boxes, window, n_cls)[..., :height, :width]
    total = None
    for i in range(0, len(boxes), step):
        chunk = boxes[i:i + step]
        out = _window_logits(model, padded, chunk, window, n_cls)
        if total is None:  # in the output's memory layout, so that every add is a plain pass
            layout = torch.channels_last if _is_channels_last(out) else torch.contiguous_format
            total = torch.empty((1, n_cls, ph, pw), dtype=out.dtype, device=out.device,
                                memory_format=layout).zero_()
        for (y, x), logits in zip(chunk, out):
            total[0, :, y:y + h, x:x + w] += logits
    # windows per pixel: the boxes are a grid, so the count is rows covering y x cols covering x
    count = _coverage(rows, h, ph, total)[:, None] * _coverage(cols, w, pw, total)
    return total.div_(count)[..., :height, :width]


def _window_logits(model: nn.Module, padded: Tensor, boxes: list[tuple[int, int]],
                   window: tuple[int, int], n_cls: int) -> Tensor:
    """``model`` on the (k, 3, h, w) windows of ``padded`` at ``boxes``; checks the shape."""
    h, w = window
    out = model(torch.cat([padded[..., y:y + h, x:x + w] for y, x in boxes]))
    if tuple(out.shape) != (len(boxes), n_cls, h, w):
        raise ValueError(f"model returned {tuple(out.shape)} for {len(boxes)} windows of {h}x{w}; "
                         f"expected ({len(boxes)}, {n_cls}, {h}, {w})")
    return out


def _is_channels_last(x: Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _coverage(starts: list[int], window: int, size: int, like: Tensor) -> Tensor:
    """(size,) number of windows of length ``window`` at ``starts`` covering each position."""
    count = like.new_zeros(size)
    for s in starts:
        count[s:s + window] += 1
    return count


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, window: tuple[int, int],
             stride: tuple[int, int] | None = None, backbone_cfg: ViTConfig | None = None,
             limit: int | None = None, progress: bool = True, batch_size: int | None = None,
             num_workers: int = 0, distributed: bool = False) -> MIoUResult:
    """mIoU of ``model`` (images (B, 3, h, w) -> logits (B, n_cls, h, w)) over ``dataset``.

    ``dataset`` yields :class:`algm.data.datasets.Sample` and has ``n_cls``,
    ``ignore_index`` (a :class:`~algm.data.datasets.SegDataset`). ``window`` (h, w) is the
    inference crop, ``stride`` defaults to :func:`~algm.data.windows.default_stride`.
    ``backbone_cfg`` gives the normalisation (default: ``model.encoder.cfg``). Only the
    first ``limit`` images are used if given; ``result.n_images`` says how many were. Runs on the model's device
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
            image = to_test_scale(sample.image.to(device), window, backbone_cfg.mean, backbone_cfg.std)
            logits = slide_inference(model, image, window, stride, n_cls, batch_size)
            if not torch.isfinite(logits).all():  # one check per image: a NaN argmaxes to class 0 silently
                raise ValueError(f"non-finite logits on {sample.name}: the model output NaN or inf "
                                 f"(broken weights, or fp16 overflow)")
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
