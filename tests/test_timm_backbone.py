"""``--backbone timm:<name>``: a timm plain ViT on the hook points, weights from a file or random."""

from __future__ import annotations


import pandas as pd
import pytest
import timm
import torch
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

from algm.build import make_setup
from algm.cli import main
from algm.config import get_backbone
from algm.weights.timm import encoder_from_timm
from run_cli import run_json
from test_reproduce import write_ade

pytestmark = pytest.mark.usefixtures("one_thread", "isolated_cache")
NAME = "algm_test_tiny_vit"  # registered with timm below: depth 2, width 64, 64 x 64 input


@register_model
def algm_test_tiny_vit(pretrained: bool = False, **kwargs) -> VisionTransformer:
    from timm.models.vision_transformer import _create_vision_transformer

    return _create_vision_transformer(NAME, pretrained=False, img_size=64, patch_size=16, embed_dim=64,
                                      depth=2, num_heads=2, init_values=1e-3, **kwargs)


def randomised(**kwargs) -> VisionTransformer:
    """A tiny timm ViT whose every parameter is random (LayerNorms, layer scales, cls and
    position embeddings included, so no mapping mistake hides behind an init value)."""
    torch.manual_seed(0)
    model = VisionTransformer(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=2,
                              num_classes=0, **kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("kwargs", [
    {}, {"qkv_bias": False, "init_values": 1e-3, "no_embed_class": True},
])
def test_the_encoder_computes_timm_forward_features(kwargs):
    model = randomised(**kwargs)
    encoder = encoder_from_timm(model, "timm:tiny")
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        state, alive = encoder(images)
        assert torch.allclose(state.x, model.forward_features(images), atol=1e-5)
    assert alive.tolist() == [[17, 17]] * 2
    assert encoder.cfg.layer_scale == ("init_values" in kwargs) and encoder.cfg.pos_interp == "bicubic"


@pytest.mark.parametrize("kwargs,feature", [
    ({"reg_tokens": 4}, "4 register tokens"),
    ({"class_token": False, "global_pool": "avg"}, "no cls token"),
    ({"qk_norm": True}, "block 0: attention q_norm"),
    ({"pre_norm": True}, "norm_pre (LayerNorm)"),
])
def test_what_the_hook_points_cannot_compute_is_refused_naming_it(kwargs, feature):
    with pytest.raises(ValueError) as err:
        encoder_from_timm(randomised(**kwargs), "timm:odd")
    assert str(err.value).startswith(f"timm:odd: {feature} cannot be represented by the hook-point ViT")


def test_backbone_names_resolve_through_timm():
    cfg = get_backbone("timm:vit_small_patch14_dinov2")
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.patch_size, cfg.pos_grid) == (384, 12, 6, 14, (37, 37))
    assert cfg.layer_scale and cfg.norm_eps == 1e-6 and cfg.mean == (0.485, 0.456, 0.406)
    with pytest.raises(ValueError, match="unknown timm model 'no_such_vit'"):
        get_backbone("timm:no_such_vit")
    with pytest.raises(ValueError, match="timm:convnext_tiny: a ConvNeXt, not a plain ViT"):
        get_backbone("timm:convnext_tiny")
    with pytest.raises(ValueError, match="timm:vit_small_patch14_reg4_dinov2: 4 register tokens"):
        get_backbone("timm:vit_small_patch14_reg4_dinov2")


@pytest.fixture
def weights(tmp_path):
    """A timm state dict of the registered tiny model, random, with its classifier."""
    torch.manual_seed(1)
    model = timm.create_model(NAME, num_classes=7)
    path = tmp_path / "tiny.pth"
    torch.save(model.state_dict(), path)
    return path, model.eval()


def test_a_weights_file_loads_strictly(weights, tmp_path):
    path, model = weights
    setup = make_setup(f"timm:{NAME}", "ade20k", window=(64, 64), weights=path)
    assert setup.weights.kind == "file" and setup.weights.path == str(path)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(setup.model.encoder(images)[0].x, model.forward_features(images), atol=1e-5)
    state = torch.load(path)
    del state["blocks.1.mlp.fc2.bias"]
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="does not match the model; missing: blocks.1.mlp.fc2.bias"):
        make_setup(f"timm:{NAME}", "ade20k", window=(64, 64), weights=tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="--weights loads timm state dicts into timm:<model> backbones"):
        make_setup("vit-ti16", "ade20k", weights=path)


def test_commands_run_a_timm_backbone(weights, tmp_path, capsys):
    path, _ = weights
    data = write_ade(tmp_path / "data")
    model = ["--backbone", f"timm:{NAME}", "--dataset", "ade20k", "--crop", "64", "--data-root", str(data)]
    fl = run_json(["flops", *model, "--weights", str(path), "--method", "algm", "--limit", "1", "--json"], capsys)
    assert fl["backbone"] == f"timm:{NAME}" and fl["gflops"] > 0 and str(path) in fl["weights"]
    tp = run_json(["throughput", *model, "--weights", str(path), "--warmup", "0", "--repeats", "1", "--json"], capsys)
    assert tp["images_per_s"] > 0
    head = run_json(["train-head", *model, "--weights", str(path), "--random-weights", "--epochs", "1",
                     "--no-eval", "--quiet", "--json"], capsys)
    ev = run_json(["eval", *model, "--weights", str(path), "--head", head["head"], "--no-progress", "--json"],
                  capsys)
    assert ev["images"] == 2 and 0 <= ev["miou"] <= 100 and head["backbone"] == ev["backbone"]
    assert main(["flops", "--backbone", "timm:no_such_vit"]) == 2
    assert "unknown timm model 'no_such_vit'" in capsys.readouterr().err


def test_a_suite_runs_a_timm_backbone(tmp_path):
    suite = tmp_path / "timm.yaml"
    suite.write_text(f"dataset: ade20k\nsplit: val\nbackbones: ['timm:{NAME}']\nflops_images: 2\n"
                     f"windows: {{'timm:{NAME}': [64, 64]}}\n"
                     "throughput: {batch_sizes: [1], warmup: 0, repeats: 1, contended_retries: 0}\n"
                     "methods:\n  none: [{}]\n  tome: [{r: 4}]\n")
    out = tmp_path / "out"
    assert main(["bench", "--dataset", str(suite), "--data-root", str(write_ade(tmp_path / "data")),
                 "--out", str(out), "--no-progress"]) == 0
    df = pd.read_csv(out / "results.csv")
    assert list(df.backbone) == [f"timm:{NAME}"] * 2 and (df.gflops > 0).all()
    assert df.set_index("method").gflops["tome"] < df.set_index("method").gflops["none"]
