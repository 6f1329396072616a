"""Training the CTS policy network: ground truth, data, metrics and the run (SPEC section 3).

Targets (:func:`superpatch_targets`, as the authors' ``policy_gt_gen``): 1 if the
superpatch holds a single label (all-ignore counts as one), 0 if it holds several
classes; "one class plus ignore" is 0, except on the window border where it is left out
of the loss.

Data (:func:`prepare_windows`): every training window of an image
(:func:`algm.data.windows.tiles`: test scale, padding, stride = window) is one item,
stored as uint8 RGB at the net's input size with its superpatch targets. CamVid's
480 x 360 frames give one 448 x 336 window each (the whole frame).

:func:`train_policy` runs :func:`algm.training.loop.fit` (AdamW, linear warm-up +
cosine, random horizontal flips drawn from the epoch's generator), validates after every
epoch and writes the checkpoint :func:`baselines.cts_policy.load_policy` reads.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from algm import atomic
from algm.config import get_backbone, get_dataset
from algm.data.datasets import Sample, build_dataset
from algm.data.windows import Window, denormalise, normalise, tiles
from algm.training.loop import Schedule, StepResult, fit
from baselines.cts_policy import DEFAULT_ARCH, POLICY_MEAN, POLICY_STD, PolicyNet, policy_path, variance_scores


def _block_max(x: Tensor, cell: int) -> Tensor:
    return F.max_pool2d(x.unsqueeze(1), cell, cell).squeeze(1)


def superpatch_targets(labels: Tensor, cell: int, ignore_index: int,
                       ignore_border: bool = True) -> tuple[Tensor, Tensor]:
    """Policy ground truth from a label map (the authors' ``policy_gt_gen``).

    labels: (B, H, W) long, H and W multiples of ``cell`` (the superpatch side in pixels,
    2 x patch). Returns ``target`` (B, H/cell, W/cell) float (1 = one class, all-ignore
    included; 0 = several classes or one class plus ignore) and ``valid`` (bool, False
    for one class plus ignore on the image border when ``ignore_border``).
    """
    b, h, w = labels.shape
    if h % cell or w % cell:
        raise ValueError(f"label map {h}x{w} does not tile into {cell}-px superpatches")
    ign = labels == ignore_index
    lab = labels.float()
    big = float(max(int(labels.max()) if labels.numel() else 0, ignore_index) + 1)
    any_ign = _block_max(ign.float(), cell) > 0
    all_ign = -_block_max(-ign.float(), cell) > 0
    hi = _block_max(lab.masked_fill(ign, -1.0), cell)
    lo = -_block_max(-lab.masked_fill(ign, big), cell)
    one_valid_class = hi == lo
    target = (all_ign | (one_valid_class & ~any_ign)).float()
    valid = torch.ones_like(any_ign)
    if ignore_border:
        border = torch.zeros_like(any_ign)
        border[:, 0, :] = border[:, -1, :] = True
        border[:, :, 0] = border[:, :, -1] = True
        valid = ~(one_valid_class & any_ign & ~all_ign & border)
    return target, valid


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class PolicyData:
    """Prepared windows, N items: ``images`` (N, 3, h, w) uint8 RGB at the net's input
    size; ``targets`` (N, h2, w2) float and ``valids`` (N, h2, w2) bool from
    :func:`superpatch_targets`; ``variances`` (N, h2 * w2) the ``variance`` policy's
    scores at the model's input resolution (a reference for the metrics)."""

    images: Tensor
    targets: Tensor
    valids: Tensor
    variances: Tensor

    def __len__(self) -> int:
        return len(self.images)


def prepare_windows(samples: Iterable[Sample], window: Window, cell: int, net_size: tuple[int, int],
                    mean: Sequence[float], std: Sequence[float], ignore_index: int) -> PolicyData:
    """Every :func:`~algm.data.windows.tiles` window of every sample as one item.

    ``mean`` / ``std`` are the backbone's (the variance reference sees what the model
    sees; padding is its mean colour); the stored images are un-normalised back to RGB.
    """
    images, targets, valids, variances = [], [], [], []
    for sample in samples:
        for x, y in tiles(sample.image, window, mean, std, sample.label, ignore_index):
            variances.append(variance_scores(x, cell)[0])
            rgb = denormalise(x, mean, std) * 255
            rgb = F.interpolate(rgb, size=net_size, mode="bilinear", align_corners=False, antialias=True)
            images.append(rgb[0].round().clamp(0, 255).to(torch.uint8))
            t, v = superpatch_targets(y, cell, ignore_index)
            targets.append(t[0])
            valids.append(v[0])
    return PolicyData(torch.stack(images), torch.stack(targets), torch.stack(valids), torch.stack(variances))


def _load_split(dataset: str, split: str, *, window: Window, cell: int, net_size: tuple[int, int],
                mean: Sequence[float], std: Sequence[float], ignore_index: int, root: str | None,
                limit: int | None, progress: bool) -> PolicyData:
    """Decode a split once into :class:`PolicyData`."""
    ds = build_dataset(dataset, split, root=root, limit=limit)
    samples = tqdm((ds[i] for i in range(len(ds))), total=len(ds), desc=f"load {dataset} {split}",
                   disable=not progress, leave=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small per-image ops: threads only add overhead (10x on a busy CPU)
    try:
        return prepare_windows(samples, window, cell, net_size, mean, std, ignore_index)
    finally:
        torch.set_num_threads(threads)


def _policy_input(images_u8: Tensor) -> Tensor:
    """(B, 3, h, w) uint8 RGB -> the net's input (0..1, normalised with POLICY_MEAN / STD)."""
    return normalise(images_u8.float() / 255, POLICY_MEAN, POLICY_STD)


# ----------------------------------------------------------------------------- metrics


def topk_precision(scores: Tensor, targets: Tensor, k: int) -> float:
    """Share of the top-``k`` superpatches per image (by score) whose target is 1."""
    idx = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return targets.flatten(1).gather(1, idx).mean().item()


@torch.no_grad()
def evaluate_policy(net: PolicyNet, images_u8: Tensor, targets: Tensor, valids: Tensor,
                    k: int, batch_size: int = 32) -> dict:
    """Loss, accuracy and top-K precision of ``net`` on prepared data."""
    net.eval()
    grid2 = tuple(targets.shape[-2:])
    logits = torch.cat([net(_policy_input(images_u8[i: i + batch_size]), grid2)
                        for i in range(0, len(images_u8), batch_size)])
    t, v = targets.flatten(1), valids.flatten(1)
    loss = F.binary_cross_entropy_with_logits(logits[v], t[v]).item()
    acc = ((logits > 0).float() == t)[v].float().mean().item()
    return {"loss": loss, "accuracy": acc, "topk_precision": topk_precision(logits, t, k)}


# ----------------------------------------------------------------------------- training


def _flip_where(x: Tensor, flip: Tensor) -> Tensor:
    """(B, ...) with the items where ``flip`` (B,) is True mirrored along the last dim."""
    return torch.where(flip.view(-1, *[1] * (x.dim() - 1)), x.flip(-1), x)


def _bce_step(net: PolicyNet, data: PolicyData, grid2: tuple[int, int], idx: Tensor,
              gen: torch.Generator) -> StepResult:
    """Binary cross-entropy on the valid superpatches of items ``idx``, each flipped with
    probability 0.5 (drawn from the epoch generator, so a resumed epoch flips the same)."""
    flip = torch.rand(len(idx), generator=gen) < 0.5
    x, t, v = (_flip_where(a[idx], flip) for a in (data.images, data.targets, data.valids))
    logits = net(_policy_input(x), grid2)
    v = v.flatten(1)
    loss = F.binary_cross_entropy_with_logits(logits[v], t.flatten(1)[v])
    return StepResult(loss, weight=len(idx))  # train_loss: mean over items, as before


def _validate(net: PolicyNet, val: PolicyData, k: int, progress: bool, epoch: int, entry: dict) -> None:
    """``on_epoch``: the val metrics go into the epoch's history entry as ``val_*``."""
    metrics = evaluate_policy(net, val.images, val.targets, val.valids, k=k)
    entry.update({f"val_{name}": value for name, value in metrics.items()})
    if progress:
        tqdm.write(f"epoch {epoch}: loss {entry['loss']:.3f}, val accuracy {metrics['accuracy']:.3f}, "
                   f"val top-{k} precision {metrics['topk_precision']:.3f}")


def _schedule(lr: float, steps_per_epoch: int, epochs: int) -> Schedule:
    """Warm-up over the first epoch (at most a tenth of the run + 1 step), then cosine.

    The ramp reaches ``lr`` at the same step as the former ``LambdaLR`` (whose cosine
    started at step 0, under the ramp); the loop's cosine starts after it.
    """
    total = steps_per_epoch * epochs
    ramp = min(steps_per_epoch, total // 10 + 1)
    return Schedule(lr, "cosine", warmup=float(ramp - 1))  # 0 or a step count, never a fraction


def _policy_history(entries: list[dict]) -> list[dict]:
    """The loop's history without its timings, so reruns and resumed runs compare equal."""
    return [{"epoch": e["epoch"], "train_loss": e["loss"],
             **{name: value for name, value in e.items() if name.startswith("val_")}} for e in entries]


def train_policy(dataset: str = "camvid", backbone: str = "vit-s14", epochs: int = 12, *,
                 arch: str = DEFAULT_ARCH, batch_size: int = 16, lr: float = 2e-3,
                 weight_decay: float = 1e-4, seed: int = 0, k_ratio: float = 103 / 256,
                 root: str | None = None, limit: int | None = None, resume: bool = True,
                 out: str | Path | None = None, progress: bool = True) -> dict:
    """Train the CTS policy on ``dataset``'s train split, evaluate on val, save it.

    Deterministic for a given seed (init from ``torch.manual_seed(seed)``, data order and
    flips from the loop's epoch generators). After every epoch the training state goes to
    ``<out>.train.pt``, keyed by the run's settings; with ``resume`` a later call with the
    same settings continues from it (and, if all ``epochs`` are done, only rewrites the
    final file); a state of other settings is an error (pass ``resume=False``). The final
    checkpoint ``out`` (default :func:`~baselines.cts_policy.policy_path`) holds ``arch``,
    ``state_dict`` and ``meta`` (dataset, backbone, patch size, epochs, val metrics of the
    policy and of the ``variance`` baseline). Returns ``meta`` plus ``path`` and ``seconds``.
    """
    t0 = time.perf_counter()
    cfg, spec = get_backbone(backbone), get_dataset(dataset)
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    window = spec.window(cfg.patch_size)
    grid = (window[0] // cfg.patch_size, window[1] // cfg.patch_size)
    if grid[0] % 2 or grid[1] % 2:
        raise ValueError(f"CTS needs an even patch grid; {dataset} with {backbone} gives {grid}")
    grid2 = (grid[0] // 2, grid[1] // 2)
    out = Path(out) if out is not None else policy_path(dataset, cfg.patch_size, arch)
    out.parent.mkdir(parents=True, exist_ok=True)
    state_path = out.with_name(out.name + ".train.pt")
    if not resume:
        state_path.unlink(missing_ok=True)

    torch.manual_seed(seed)
    net = PolicyNet(arch)
    load = partial(_load_split, dataset, window=window, cell=2 * cfg.patch_size,
                   net_size=net.input_size(grid2), mean=cfg.mean, std=cfg.std,
                   ignore_index=spec.ignore_index, root=root, limit=limit, progress=progress)
    train, val = load("train"), load("val")
    k = round(k_ratio * grid2[0] * grid2[1])
    # The checkpoint key: a state is resumed only by a run with the same settings.
    run = {"arch": arch, "dataset": dataset, "patch_size": cfg.patch_size, "seed": seed, "epochs": epochs,
           "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "limit": limit}
    entries = fit(net, torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay),
                  partial(_bce_step, net, train, grid2), n_items=len(train), batch_size=batch_size,
                  epochs=epochs, schedule=_schedule(lr, math.ceil(len(train) / batch_size), epochs), seed=seed,
                  checkpoint=state_path, key="cts-policy " + json.dumps(run, sort_keys=True),
                  progress=progress, desc=f"train policy ({arch})",
                  on_epoch=partial(_validate, net, val, k, progress))

    meta = {
        "dataset": dataset, "backbone": backbone, "patch_size": cfg.patch_size, "arch": arch,
        "grid2": list(grid2), "epochs": epochs, "seed": seed, "k": k, "train_windows": len(train),
        "train_positive_share": train.targets[train.valids].mean().item(),
        "val": evaluate_policy(net, val.images, val.targets, val.valids, k=k),
        "val_variance_topk_precision": topk_precision(val.variances, val.targets.flatten(1), k),
        "history": _policy_history(entries),
    }
    atomic.save_torch({"arch": arch, "state_dict": net.state_dict(), "meta": meta}, out)
    return {**meta, "path": str(out), "seconds": time.perf_counter() - t0}
