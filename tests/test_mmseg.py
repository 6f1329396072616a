"""mmsegmentation Segmenter checkpoints: the config read without running it, the weights
mapped onto algm's Segmenter (checked against mmseg's own modules), and the commands."""

from __future__ import annotations

import importlib.machinery
import sys
import types

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from algm.cli import main
from algm.weights.mmseg import convert_mmseg, load_mmseg_checkpoint, mmseg_model, read_mmseg_config
from run_cli import run_json
from test_reproduce import write_ade

pytestmark = pytest.mark.usefixtures("one_thread", "isolated_cache")

CONFIG = """\
_base_ = ['base.py']
crop_size = (64, 64)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(img_size=crop_size, embed_dims={dim}, num_layers={depth}, num_heads={heads}),
    decode_head=dict(in_channels={dim}, channels={dim}, num_classes=150, embed_dims={dim}, num_heads={heads}),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(48, 48)))
"""
BASE = """\
norm_cfg = dict(type='LN', eps=1e-6, requires_grad=True)
data_preprocessor = dict(type='SegDataPreProcessor', mean=[127.5, 127.5, 127.5], std=[127.5, 127.5, 127.5],
                         bgr_to_rgb=True, pad_val=0, seg_pad_val=255)
model = dict(
    type='EncoderDecoder', data_preprocessor=data_preprocessor,
    backbone=dict(type='VisionTransformer', img_size=(512, 512), patch_size=16, in_channels=3, embed_dims=768,
                  num_layers=12, num_heads=12, final_norm=True, norm_cfg=norm_cfg, with_cls_token=True,
                  interpolate_mode='bicubic'),
    decode_head=dict(type='SegmenterMaskTransformerHead', in_channels=768, channels=768, num_classes=150,
                     num_layers=2, num_heads=12, embed_dims=768, dropout_ratio=0.0),
    test_cfg=dict(mode='slide', crop_size=(512, 512), stride=(480, 480)))
dataset_type = 'ADE20KDataset'
img_ratios = [0.5, 1.0]
tta_pipeline = [dict(type='Resize', scale_factor=r) for r in img_ratios]
"""


def mmseg_modules():
    """mmseg's VisionTransformer and SegmenterMaskTransformerHead: mmseg.models imports
    mmcv's compiled ops, absent from mmcv-lite, so a stub stands in (SPEC section 8)."""
    if "mmcv._ext" not in sys.modules:
        stub = types.ModuleType("mmcv._ext")
        stub.__spec__ = importlib.machinery.ModuleSpec("mmcv._ext", None)

        def missing(name):
            if name.startswith("__"):
                raise AttributeError(name)

            def op(*args, **kwargs):
                raise NotImplementedError(f"mmcv._ext.{name} (a compiled op) is not available")
            return op
        stub.__getattr__ = missing
        sys.modules["mmcv._ext"] = stub
    from mmseg.models.backbones.vit import VisionTransformer
    from mmseg.models.decode_heads.segmenter_mask_head import SegmenterMaskTransformerHead
    return VisionTransformer, SegmenterMaskTransformerHead


def write_mmseg(folder, dim=64, depth=2, heads=1, seed=0):
    """A random-weight mmseg Segmenter (every parameter random) saved as mmengine does,
    its config (inheriting a base file) beside it; returns (config, checkpoint, backbone, head)."""
    vit, mask_head = mmseg_modules()
    torch.manual_seed(seed)
    backbone = vit(img_size=(64, 64), patch_size=16, embed_dims=dim, num_layers=depth, num_heads=heads,
                   final_norm=True, norm_cfg=dict(type="LN", eps=1e-6), interpolate_mode="bicubic")
    head = mask_head(in_channels=dim, channels=dim, num_classes=150, num_layers=2, num_heads=heads,
                     embed_dims=dim, dropout_ratio=0.0)
    state = {}
    for prefix, module in (("backbone.", backbone), ("decode_head.", head)):
        module.eval()
        with torch.no_grad():
            for p in module.parameters():
                p.normal_(0, 0.2)
        state.update({prefix + k: v for k, v in module.state_dict().items()})
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"meta": {"mmseg_version": "1.2.2"}, "state_dict": state}, folder / "iter_160000.pth")
    (folder / "base.py").write_text(BASE)
    (folder / "segmenter.py").write_text(CONFIG.format(dim=dim, depth=depth, heads=heads))
    return folder / "segmenter.py", folder / "iter_160000.pth", backbone, head


def test_the_config_is_read_with_its_base_and_without_running_it(tmp_path):
    config, *_ = write_mmseg(tmp_path)
    spec = mmseg_model(read_mmseg_config(config), config)
    assert (spec.encoder.embed_dim, spec.encoder.depth, spec.encoder.pos_grid) == (64, 2, (4, 4))
    assert spec.encoder.norm_eps == 1e-6 and spec.decoder.norm_eps == 1e-5 and spec.encoder.mean == (0.5,) * 3
    assert spec.window == (64, 64) and spec.stride == (48, 48) and spec.dataset == "ade20k"
    (tmp_path / "evil.py").write_text("import os\nmodel = dict()\n")
    with pytest.raises(ValueError, match=r"evil.py:1: imports"):
        read_mmseg_config(tmp_path / "evil.py")
    (tmp_path / "odd.py").write_text("_base_ = 'segmenter.py'\nmodel = dict(backbone=dict(_delete_=True, "
                                     "type='VisionTransformer', final_norm=[n for n in 'x']))\n")
    with pytest.raises(ValueError, match=r"model.backbone.final_norm cannot be read without executing"):
        mmseg_model(read_mmseg_config(tmp_path / "odd.py"), "odd.py")
    (tmp_path / "cascade.py").write_text("_base_ = 'segmenter.py'\nmodel = dict(backbone=dict(pre_norm=True))\n")
    with pytest.raises(ValueError, match=r"cascade.py: model.backbone.pre_norm=True: a norm before the first"):
        mmseg_model(read_mmseg_config(tmp_path / "cascade.py"), tmp_path / "cascade.py")


def test_the_weights_compute_what_mmseg_computes(tmp_path):
    config, checkpoint, backbone, head = write_mmseg(tmp_path)
    model, _ = load_mmseg_checkpoint(config, checkpoint)
    for size in ((64, 64), (96, 128)):  # the training grid, and a resized position embedding
        images = torch.randn(2, 3, *size)
        with torch.no_grad():
            theirs = F.interpolate(head(backbone(images)), size=size, mode="bilinear", align_corners=False)
            assert torch.allclose(model(images), theirs, atol=1e-4)
    state = torch.load(checkpoint)
    del state["state_dict"]["decode_head.patch_proj.weight"]
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="does not match the model; missing: decoder.proj_patch"):
        load_mmseg_checkpoint(config, tmp_path / "bad.pth")


def test_commands_and_a_suite_run_an_mmseg_checkpoint(tmp_path, capsys):
    config, checkpoint, *_ = write_mmseg(tmp_path / "mmseg", dim=192, depth=12, heads=3)  # a ViT-Ti
    data = write_ade(tmp_path / "data")
    common = ["--checkpoint", str(checkpoint), "--mmseg-config", str(config), "--data-root", str(data), "--json"]
    ev = run_json(["eval", *common, "--no-progress"], capsys)
    assert ev["backbone"] == "vit-ti16" and ev["dataset"] == "ade20k" and ev["stride"] == [48, 48]
    fl = run_json(["flops", *common, "--method", "algm", "--limit", "1"], capsys)
    tp = run_json(["throughput", *common, "--warmup", "0", "--repeats", "1"], capsys)
    assert fl["gflops"] > 0 and tp["images_per_s"] > 0
    assert main(["flops", "--mmseg-config", str(config)]) == 2
    assert "--mmseg-config describes a --checkpoint: pass both" in capsys.readouterr().err
    # the suite reads the official layout: convert once, then bench
    converted = convert_mmseg(config, checkpoint, tmp_path / "ckpts" / "ade20k" / "vit-ti16" / "none")
    ours = run_json(["eval", "--checkpoint", str(converted), "--data-root", str(data), "--json", "--no-progress"],
                    capsys)
    assert ours["miou"] == pytest.approx(ev["miou"], abs=1e-9)
    suite = tmp_path / "mini.yaml"
    suite.write_text("dataset: ade20k\nsplit: val\nbackbones: [vit-ti16]\nflops_images: 2\n"
                     "throughput: {batch_sizes: [1], warmup: 0, repeats: 1, contended_retries: 0}\n"
                     "methods:\n  none: [{}]\n")
    out = tmp_path / "out"
    assert main(["bench", "--dataset", str(suite), "--data-root", str(data), "--checkpoints",
                 str(tmp_path / "ckpts"), "--out", str(out), "--no-progress"]) == 0
    row = pd.read_csv(out / "results.csv").iloc[0]
    none = run_json(["flops", "--checkpoint", str(converted), "--limit", "2", "--data-root", str(data), "--json"],
                    capsys)
    assert row.checkpoint == str(converted) and row.gflops == pytest.approx(none["gflops"], rel=1e-9)
