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
from algm.data.windows import default_stride, mixed_groups, pad_to, to_test_scale, window_starts
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
    return slide_inference_many(model, [image], window, stride, n_cls, batch_size)[0]


def slide_inference_many(model: nn.Module, images: list[Tensor], window: tuple[int, int],
                         stride: tuple[int, int], n_cls: int, batch_size: int | None = None) -> list[Tensor]:
    """:func:`slide_inference` of several images (each (1, 3, H_i, W_i)) whose windows
    share the ``model`` calls: the windows of all images, image by image, in calls of at
    most ``batch_size`` (default: all in one call). Returns one (1, n_cls, H_i, W_i) per
    image, each as :func:`slide_inference` computes it with the same windows per call."""
    if min(stride) < 1 or stride[0] > window[0] or stride[1] > window[1]:
        raise ValueError(f"stride must be positive and at most the window {tuple(window)} (a longer "
                         f"step leaves pixels unevaluated), got {tuple(stride)}")
    plans = [_Slide(image, window, stride) for image in images]
    crops = [(plan, box) for plan in plans for box in plan.boxes]
    step = batch_size or len(crops)
    for i in range(0, len(crops), step):
        chunk = crops[i:i + step]
        out = _window_logits(model, chunk, window, n_cls)
        for j, (plan, box) in enumerate(chunk):
            plan.add(box, out[j:j + 1])
    return [plan.result() for plan in plans]


class _Slide:
    """The sliding windows of one image and the sum of their logits (see :func:`slide_inference`)."""

    def __init__(self, image: Tensor, window: tuple[int, int], stride: tuple[int, int]):
        if image.dim() != 4 or image.shape[0] != 1:
            raise ValueError(f"slide_inference takes one image (1, 3, H, W), got {tuple(image.shape)}")
        self.size = tuple(image.shape[-2:])
        self.window = window
        self.padded = pad_to(image, window)
        ph, pw = self.padded.shape[-2:]
        self.rows, self.cols = window_starts(ph, window[0], stride[0]), window_starts(pw, window[1], stride[1])
        self.boxes = [(y, x) for y in self.rows for x in self.cols]
        self.total: Tensor | None = None

    def crop(self, box: tuple[int, int]) -> Tensor:
        (y, x), (h, w) = box, self.window
        return self.padded[..., y:y + h, x:x + w]

    def add(self, box: tuple[int, int], logits: Tensor) -> None:
        """Add one window's (1, n_cls, h, w) logits at ``box``."""
        if len(self.boxes) == 1:  # one window covers the image (CamVid at test scale): nothing to average
            self.total = logits
            return
        if self.total is None:  # in the output's memory layout, so that every add is a plain pass
            layout = torch.channels_last if _is_channels_last(logits) else torch.contiguous_format
            self.total = torch.empty((1, logits.shape[1], *self.padded.shape[-2:]), dtype=logits.dtype,
                                     device=logits.device, memory_format=layout).zero_()
        (y, x), (h, w) = box, self.window
        self.total[..., y:y + h, x:x + w] += logits

    def result(self) -> Tensor:
        height, width = self.size
        if len(self.boxes) == 1:
            return self.total[..., :height, :width]
        # windows per pixel: the boxes are a grid, so the count is rows covering y x cols covering x
        ph, pw = self.padded.shape[-2:]
        count = (_coverage(self.rows, self.window[0], ph, self.total)[:, None]
                 * _coverage(self.cols, self.window[1], pw, self.total))
        return self.total.div_(count)[..., :height, :width]


def _window_logits(model: nn.Module, crops: list[tuple[_Slide, tuple[int, int]]],
                   window: tuple[int, int], n_cls: int) -> Tensor:
    """``model`` on the (k, 3, h, w) windows ``crops`` (image, box); checks the shape."""
    h, w = window
    out = model(torch.cat([plan.crop(box) for plan, box in crops]))
    if tuple(out.shape) != (len(crops), n_cls, h, w):
        raise ValueError(f"model returned {tuple(out.shape)} for {len(crops)} windows of {h}x{w}; "
                         f"expected ({len(crops)}, {n_cls}, {h}, {w})")
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
             num_workers: int = 0, distributed: bool = False, images_per_batch: int = 1) -> MIoUResult:
    """mIoU of ``model`` (images (B, 3, h, w) -> logits (B, n_cls, h, w)) over ``dataset``.

    ``dataset`` yields :class:`algm.data.datasets.Sample` and has ``n_cls``,
    ``ignore_index`` (a :class:`~algm.data.datasets.SegDataset`). ``window`` (h, w) is the
    inference crop, ``stride`` defaults to :func:`~algm.data.windows.default_stride`.
    ``backbone_cfg`` gives the normalisation (default: ``model.encoder.cfg``). Only the
    first ``limit`` images are used if given; ``result.n_images`` says how many were. Runs on the model's device
    in eval mode (the training flag is restored afterwards); ``batch_size`` as in
    :func:`slide_inference`; ``num_workers`` decode images in background processes.
    ``images_per_batch`` > 1 evaluates mixed batches: the images are taken in the fixed
    groups of :func:`~algm.data.windows.mixed_groups` and the windows of a group share
    the model calls (:func:`slide_inference_many`; ``batch_size`` then caps the windows
    of a call across the group), so a method that couples the images of a batch is
    scored as it runs on mixed batches.
    With ``distributed`` each process of the :mod:`algm.distributed` group evaluates its
    :func:`~algm.distributed.shard` of the images (of the groups) and every process gets the
    result of the whole split (confusion matrices summed exactly); only rank 0 shows progress.
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
    n = len(subset)
    groups = [[i] for i in range(n)] if images_per_batch == 1 else mixed_groups(n, images_per_batch)
    if distributed:
        groups = list(dist.shard(groups))
    subset = Subset(subset, [i for group in groups for i in group])
    samples = iter(DataLoader(subset, batch_size=None, num_workers=num_workers))
    confusion = ConfusionMatrix(n_cls, ignore_index)
    was_training = model.training
    model.eval()
    try:
        bar = tqdm(total=len(subset), disable=not progress or not dist.is_main(), desc="mIoU", unit="img")
        for group in groups:
            batch = [next(samples) for _ in group]
            images = [to_test_scale(s.image.to(device), window, backbone_cfg.mean, backbone_cfg.std) for s in batch]
            for sample, logits in zip(batch, slide_inference_many(model, images, window, stride, n_cls, batch_size)):
                if not torch.isfinite(logits).all():  # one check per image: a NaN argmaxes to class 0 silently
                    raise ValueError(f"non-finite logits on {sample.name}: the model output NaN or inf "
                                     f"(broken weights, or fp16 overflow)")
                size = tuple(sample.label.shape)
                logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
                confusion.update(logits.argmax(1)[0], sample.label.to(device))
            bar.update(len(group))
        bar.close()
    finally:
        model.train(was_training)
    result = confusion.result()
    if distributed:
        n_images = dist.all_reduce_sum(torch.tensor(result.n_images)).item()
        result = metrics_from_confusion(dist.all_reduce_sum(result.confusion), n_images)
    return result
