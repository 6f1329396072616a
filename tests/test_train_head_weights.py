"""``train-head --backbone timm:<name> --weights FILE``: a weights file is real weights."""

from __future__ import annotations

import pytest
import timm
import torch

from algm.cli import main
from run_cli import run_json
from test_reproduce import write_ade
from test_timm_backbone import NAME  # (importing it registers the tiny timm ViT)

pytestmark = pytest.mark.usefixtures("one_thread", "isolated_cache")


def test_train_head_takes_a_weights_file_for_a_timm_backbone(tmp_path, capsys):
    torch.manual_seed(1)
    weights = tmp_path / "tiny.pth"
    torch.save(timm.create_model(NAME).state_dict(), weights)
    argv = ["train-head", "--backbone", f"timm:{NAME}", "--dataset", "ade20k", "--crop", "64",
            "--data-root", str(write_ade(tmp_path / "data")), "--epochs", "1", "--no-eval", "--quiet", "--json"]
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        f"algm-bench train-head: error: backbone 'timm:{NAME}' has no offline weights; train heads on vit-s14 "
        "or vit-s16-dinov2, pass --weights FILE (timm:<model>) or --random-weights\n")
    head = run_json([*argv, "--weights", str(weights)], capsys)
    assert head["backbone"] == f"timm:{NAME}" and head["n_windows"] > 0 and len(head["epoch_seconds"]) == 1
