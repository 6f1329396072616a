"""CTS policy networks, their ground truth, and their training (SPEC section 3, CTS).

A policy scores every 2 x 2 superpatch of the patch grid: high = "holds one class, can
share one token". :class:`PolicyNet` maps a (B, 3, H, W) image to (B, h/2 * w/2) logits in
raster order: the image is resized so that the network's output grid *is* the superpatch
grid (``(h/2) * stride`` x ``(w/2) * stride`` pixels), then a 1 x 1 conv scores each cell.

Architectures (``arch``):

* ``tiny`` (default): 6 plain 3 x 3 conv-BN-ReLU layers (16-32-64-64-128-128 channels,
  total stride 16) on the image at 16 px per superpatch (half resolution for patch 16;
  192 x 256 for CamVid's 12 x 16 superpatches). 0.105 GFLOPs at CamVid's size (fvcore),
  12 epochs on CamVid train take about 3 minutes on this 2-core CPU.
* ``lite0``: the authors' choice, timm ``efficientnet_lite0`` features (stride 32, 320
  channels; no pretrained weights offline) + 1 x 1 conv, on the image at 32 px per
  superpatch (384 x 512 for CamVid). Over an order of magnitude slower to train on CPU,
  and from scratch it has no ImageNet features to make up for it.

Targets (:func:`superpatch_targets`, as the authors' ``policy_gt_gen``): 1 if the
superpatch holds a single label (all-ignore counts as one), 0 if it holds several
classes; "one class plus ignore" is 0, except on the image border where it is left out
of the loss.

Inputs of the network are 0..1 RGB normalised with (0.5, 0.5, 0.5): the CTS method
un-normalises the backbone's input first, so one checkpoint serves every backbone with
the same patch size. Checkpoints live in ``algm.cache.cache_dir("cts")`` as
``policy-<dataset>-p<patch>-<arch>.pt``; train one with
``algm-bench train-policy --dataset camvid --backbone vit-s14``.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from algm.cache import cache_dir
from algm.config import get_backbone, get_dataset

ARCHS = ("tiny", "lite0")
DEFAULT_ARCH = "tiny"
POLICY_MEAN = (0.5, 0.5, 0.5)
POLICY_STD = (0.5, 0.5, 0.5)


# ----------------------------------------------------------------------------- networks


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class PolicyNet(nn.Module):
    """Superpatch scorer: ``forward(images, grid2) -> (B, h2 * w2)`` logits.

    images: (B, 3, H, W) RGB on the 0..1 scale normalised with (0.5, 0.5, 0.5) (any size;
    resized here); grid2: (h2, w2) superpatch grid.
    """

    def __init__(self, arch: str = DEFAULT_ARCH):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown policy arch {arch!r}; choose one of: {', '.join(ARCHS)}")
        self.arch = arch
        if arch == "tiny":
            self.stride = 16
            self.features = nn.Sequential(
                _conv(3, 16, 2), _conv(16, 32, 2), _conv(32, 64, 2), _conv(64, 64),
                _conv(64, 128, 2), _conv(128, 128),
            )
            channels = 128
        else:
            import timm

            self.stride = 32
            self.features = timm.create_model("efficientnet_lite0", pretrained=False,
                                              features_only=True, out_indices=(4,))
            channels = self.features.feature_info.channels()[-1]
        self.head = nn.Conv2d(channels, 1, 1)

    def input_size(self, grid2: tuple[int, int]) -> tuple[int, int]:
        return (grid2[0] * self.stride, grid2[1] * self.stride)

    def forward(self, images: Tensor, grid2: tuple[int, int]) -> Tensor:
        size = self.input_size((int(grid2[0]), int(grid2[1])))
        in_size = (int(images.shape[-2]), int(images.shape[-1]))
        if in_size != size:
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False,
                                   antialias=size[0] < in_size[0])
        feats = self.features(images)
        if isinstance(feats, (list, tuple)):
            feats = feats[-1]
        return self.head(feats).flatten(1)


def policy_path(dataset: str, patch_size: int, arch: str = DEFAULT_ARCH) -> Path:
    """Where the trained policy for ``dataset`` at this patch size lives."""
    return cache_dir("cts") / f"policy-{dataset}-p{patch_size}-{arch}.pt"


def train_command(dataset: str, backbone: str, arch: str = DEFAULT_ARCH) -> str:
    extra = "" if arch == DEFAULT_ARCH else f" --arch {arch}"
    return f"algm-bench train-policy --dataset {dataset} --backbone {backbone}{extra}"


def load_policy(path: str | Path, *, dataset: str = "?", backbone: str = "?",
                arch: str = DEFAULT_ARCH) -> PolicyNet:
    """A trained :class:`PolicyNet` in eval mode; a clear error when the file is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"CTS learned policy checkpoint not found: {path}\n"
            f"train it first (CPU, a few minutes): {train_command(dataset, backbone, arch)}\n"
            f"or use a training-free policy: --policy variance (or oracle, which needs labels)")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "arch" not in ckpt:
        raise ValueError(f"{path} is not a CTS policy checkpoint (expected keys 'arch', 'state_dict')")
    net = PolicyNet(ckpt["arch"])
    net.load_state_dict(ckpt["state_dict"], strict=True)
    return net.eval()


# ----------------------------------------------------------------------------- targets


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


def majority_fraction(labels: Tensor, cell: int, n_cls: int, ignore_index: int) -> Tensor:
    """(B, H, W) labels -> (B, S) share of the most frequent class in each superpatch.

    Ignore pixels (and values outside 0..n_cls-1) do not count; an all-ignore superpatch
    scores 1 (its pixels count in no metric, so sharing it is free). Superpatches holding
    a single class score exactly 1. Vectorised: one ``bincount`` over (image, superpatch,
    class) keys.
    """
    b, h, w = labels.shape
    if h % cell or w % cell:
        raise ValueError(f"label map {h}x{w} does not tile into {cell}-px superpatches")
    h2, w2 = h // cell, w // cell
    s = h2 * w2
    lab = labels.long()
    lab = torch.where((lab < 0) | (lab >= n_cls) | (lab == ignore_index), n_cls, lab)
    rows = torch.arange(h, device=lab.device) // cell
    cols = torch.arange(w, device=lab.device) // cell
    sp = (rows[:, None] * w2 + cols[None, :]).expand(b, h, w)
    img = torch.arange(b, device=lab.device)[:, None, None]
    key = ((img * s + sp) * (n_cls + 1) + lab).flatten()
    counts = torch.bincount(key, minlength=b * s * (n_cls + 1)).view(b, s, n_cls + 1)[..., :n_cls]
    total = counts.sum(-1)
    frac = counts.max(-1).values.float() / total.clamp(min=1).float()
    return torch.where(total > 0, frac, torch.ones_like(frac))


# ----------------------------------------------------------------------------- training


def _prepare(dataset_name: str, split: str, window: tuple[int, int], cell: int, net_size: tuple[int, int],
             ignore_index: int, root: str | None, limit: int | None, progress: bool,
             mean: tuple[float, ...], std: tuple[float, ...]):
    """Decode a split once: images at the policy input size (uint8), superpatch targets,
    and the ``variance`` policy's scores at the model's input resolution (a reference)."""
    from algm.data.datasets import build_dataset

    ds = build_dataset(dataset_name, split, root=root, limit=limit)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small per-image ops: threads only add overhead (10x on a busy CPU)
    try:
        return _prepare_items(ds, window, cell, net_size, ignore_index, progress, mean, std, dataset_name, split)
    finally:
        torch.set_num_threads(threads)


def _prepare_items(ds, window, cell, net_size, ignore_index, progress, mean, std, dataset_name, split):
    from tqdm import tqdm

    from algm.data.transforms import scaled_size

    images, targets, valids, variances = [], [], [], []
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    for i in tqdm(range(len(ds)), desc=f"load {dataset_name} {split}", disable=not progress, leave=False):
        sample = ds[i]
        img = sample.image.unsqueeze(0).float()
        lab = sample.label
        # Test-time geometry: short side to the window's short side, then the window crop
        # (CamVid 480x360 -> 448x336 exactly, so the crop is the whole frame).
        size = scaled_size(tuple(img.shape[-2:]), min(window))
        img = F.interpolate(img, size=size, mode="bilinear", align_corners=False)
        lab = F.interpolate(lab[None, None].float(), size=size, mode="nearest")[0, 0].long()
        if size[0] < window[0] or size[1] < window[1]:
            raise ValueError(f"{sample.name}: image {size} is smaller than the window {window}")
        top, left = (size[0] - window[0]) // 2, (size[1] - window[1]) // 2  # one centre window
        img = img[..., top: top + window[0], left: left + window[1]]
        lab = lab[top: top + window[0], left: left + window[1]]
        variances.append(variance_scores((img / 255 - mean_t) / std_t, cell)[0])
        img = F.interpolate(img, size=net_size, mode="bilinear", align_corners=False, antialias=True)
        images.append(img[0].round().clamp(0, 255).to(torch.uint8))
        t, v = superpatch_targets(lab[None], cell, ignore_index)
        targets.append(t[0])
        valids.append(v[0])
    return torch.stack(images), torch.stack(targets), torch.stack(valids), torch.stack(variances)


def _to_input(images_u8: Tensor) -> Tensor:
    mean = torch.tensor(POLICY_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(POLICY_STD).view(1, 3, 1, 1)
    return (images_u8.float() / 255 - mean) / std


def variance_scores(images: Tensor, cell: int) -> Tensor:
    """(B, 3, H, W) -> (B, S) negative mean per-channel pixel variance of each superpatch
    (higher = flatter = more shareable); the ``variance`` policy's score."""
    b, c, h, w = (int(v) for v in images.shape)
    h2, w2 = h // cell, w // cell
    blocks = images[..., : h2 * cell, : w2 * cell].reshape(b, c, h2, cell, w2, cell)
    return -blocks.float().var(dim=(3, 5), unbiased=False).mean(1).flatten(1)


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
    logits = torch.cat([net(_to_input(images_u8[i: i + batch_size]), grid2)
                        for i in range(0, len(images_u8), batch_size)])
    t, v = targets.flatten(1), valids.flatten(1)
    loss = F.binary_cross_entropy_with_logits(logits[v], t[v]).item()
    acc = ((logits > 0).float() == t)[v].float().mean().item()
    return {"loss": loss, "accuracy": acc, "topk_precision": topk_precision(logits, t, k)}


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train_policy(dataset: str = "camvid", backbone: str = "vit-s14", epochs: int = 12, *,
                 arch: str = DEFAULT_ARCH, batch_size: int = 16, lr: float = 2e-3,
                 weight_decay: float = 1e-4, seed: int = 0, k_ratio: float = 103 / 256,
                 root: str | None = None, limit: int | None = None, resume: bool = True,
                 out: str | Path | None = None, progress: bool = True) -> dict:
    """Train the CTS policy on ``dataset``'s train split, evaluate on val, save it.

    Deterministic for a given seed (torch and Python RNGs seeded, data order and flips
    drawn from a seeded generator). After every epoch the full training state goes to
    ``<out>.train.pt``; with ``resume`` a later call continues from it (and, if all
    ``epochs`` are done, only rewrites the final file). The final checkpoint ``out``
    (default :func:`policy_path`) holds ``arch``, ``state_dict`` and ``meta`` (dataset,
    backbone, patch size, epochs, val metrics of the policy and of the ``variance``
    baseline). Returns ``meta`` plus ``path`` and ``seconds``.
    """
    from tqdm import tqdm

    t0 = time.perf_counter()
    cfg, spec = get_backbone(backbone), get_dataset(dataset)
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    window = spec.window(cfg.patch_size)
    grid = (window[0] // cfg.patch_size, window[1] // cfg.patch_size)
    if grid[0] % 2 or grid[1] % 2:
        raise ValueError(f"CTS needs an even patch grid; {dataset} with {backbone} gives {grid}")
    grid2 = (grid[0] // 2, grid[1] // 2)
    cell = 2 * cfg.patch_size
    out = Path(out) if out is not None else policy_path(dataset, cfg.patch_size, arch)
    out.parent.mkdir(parents=True, exist_ok=True)
    state_path = out.with_name(out.name + ".train.pt")

    torch.manual_seed(seed)
    random.seed(seed)
    net = PolicyNet(arch)
    net_size = net.input_size(grid2)
    train = _prepare(dataset, "train", window, cell, net_size, spec.ignore_index, root, limit, progress,
                     cfg.mean, cfg.std)[:3]
    *val, val_var = _prepare(dataset, "val", window, cell, net_size, spec.ignore_index, root, limit,
                             progress, cfg.mean, cfg.std)
    n = len(train[0])
    steps_per_epoch = math.ceil(n / batch_size)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    total_steps = epochs * steps_per_epoch
    warmup = min(steps_per_epoch, total_steps // 10 + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))
    gen = torch.Generator().manual_seed(seed)
    start, history = 0, []
    # A training state is resumed only if it was made with the same settings.
    run = {"arch": arch, "dataset": dataset, "patch_size": cfg.patch_size, "seed": seed, "epochs": epochs,
           "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "limit": limit}
    if resume and state_path.is_file():
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        if st.get("run") == run:
            net.load_state_dict(st["model"])
            opt.load_state_dict(st["optimizer"])
            sched.load_state_dict(st["scheduler"])
            gen.set_state(st["generator"])
            torch.set_rng_state(st["torch_rng"])
            start, history = st["epoch"], list(st["history"])
        elif progress:
            print(f"ignoring {state_path}: it was made with other settings ({st.get('run')})")

    k = round(k_ratio * grid2[0] * grid2[1])
    frac_pos = train[1][train[2]].mean().item()
    bar = tqdm(range(start, epochs), desc=f"train policy ({arch})", disable=not progress,
               initial=start, total=epochs)
    for epoch in bar:
        net.train()
        order = torch.randperm(n, generator=gen)
        flips = torch.rand(n, generator=gen) < 0.5
        running = 0.0
        for i in range(0, n, batch_size):
            idx = order[i: i + batch_size]
            x, t, v = train[0][idx], train[1][idx], train[2][idx]
            f = flips[idx]
            x = torch.where(f[:, None, None, None], x.flip(-1), x)
            t = torch.where(f[:, None, None], t.flip(-1), t)
            v = torch.where(f[:, None, None], v.flip(-1), v)
            logits = net(_to_input(x), grid2)
            loss = F.binary_cross_entropy_with_logits(logits[v.flatten(1)], t.flatten(1)[v.flatten(1)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item() * len(idx)
        metrics = evaluate_policy(net, *val, k=k)
        history.append({"epoch": epoch + 1, "train_loss": running / n, **{f"val_{name}": value for name, value in metrics.items()}})
        bar.set_postfix(loss=f"{running / n:.3f}", val_acc=f"{metrics['accuracy']:.3f}",
                        val_topk=f"{metrics['topk_precision']:.3f}")
        _save_atomic({"run": run, "epoch": epoch + 1, "model": net.state_dict(),
                      "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                      "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
                      "history": history}, state_path)

    val_variance = topk_precision(val_var, val[1].flatten(1), k)
    final = evaluate_policy(net, *val, k=k)
    meta = {
        "dataset": dataset, "backbone": backbone, "patch_size": cfg.patch_size, "arch": arch,
        "grid2": list(grid2), "epochs": epochs, "seed": seed, "k": k, "train_images": n,
        "train_positive_share": frac_pos, "val": final, "val_variance_topk_precision": val_variance,
        "history": history,
    }
    _save_atomic({"arch": arch, "state_dict": net.state_dict(), "meta": meta}, out)
    return {**meta, "path": str(out), "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- CLI


def _run_train_policy(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    result = train_policy(args.dataset, args.backbone, args.epochs, arch=args.arch,
                          batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                          root=args.data_root, limit=args.limit, resume=not args.no_resume,
                          out=args.out, progress=not args.quiet)
    val = result["val"]
    print(f"saved {result['path']} ({result['seconds']:.0f} s)")
    print(f"val: accuracy {val['accuracy']:.3f}, loss {val['loss']:.3f}, top-{result['k']} precision "
          f"{val['topk_precision']:.3f} (variance policy {result['val_variance_topk_precision']:.3f})")
    return 0


def add_train_policy_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``train-policy`` on an ``argparse`` subparsers object; returns the parser.

    The handler is set with ``set_defaults(func=...)``; it returns an exit code.
    """
    p = subparsers.add_parser(
        "train-policy", help="train the CTS policy network (CPU, minutes)",
        description="Train the CTS superpatch policy on a dataset's train split (labels: 'this 2x2 "
                    "superpatch holds one class'), report its val accuracy and top-K precision "
                    "next to the training-free variance policy, and save it where "
                    "'--method cts --policy learned' finds it. Resumes an interrupted run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="camvid", help="dataset whose train split trains the policy")
    p.add_argument("--backbone", default="vit-s14",
                   help="backbone whose patch size and input window define the superpatches")
    p.add_argument("--arch", default=DEFAULT_ARCH, choices=ARCHS,
                   help="policy network: tiny CNN or the authors' EfficientNet-Lite0 (no pretrained weights)")
    p.add_argument("--epochs", type=int, default=12, help="training epochs (val top-K precision peaks near 12 on CamVid, then overfits)")
    p.add_argument("--batch-size", type=int, default=16, help="images per step")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (cosine schedule)")
    p.add_argument("--seed", type=int, default=0, help="random seed (training is deterministic for it)")
    p.add_argument("--data-root", default=None, help="dataset root (default: $DATA_ROOT or the CamVid default)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N frames of each split")
    p.add_argument("--out", default=None, help="checkpoint path (default: the cache dir, where CTS looks)")
    p.add_argument("--no-resume", action="store_true", help="start over even if a training state exists")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_train_policy)
    return p
