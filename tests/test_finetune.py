"""Fine-tuning with a method active (`algm-bench finetune`, finetune suites) on fixtures: a
tiny ADE20K tree and official-format ViT-S checkpoints with random weights."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from algm.build import make_setup
from algm.cli import main
from algm.training import finetune as finetune_module
from algm.training.finetune import FinetuneConfig, finetune
from algm.weights.checkpoint import load_checkpoint
from test_reproduce import write_ade, write_checkpoint


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    base = tmp_path_factory.mktemp("finetune")
    return {"checkpoint": write_checkpoint(base / "ckpt" / "ade20k" / "vit-s16" / "none", seed=1),
            "checkpoints": base / "ckpt", "data": write_ade(base / "data", n=3)}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ALGM_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DATA_ROOT", raising=False)


def run(start, out, *extra, method="algm"):
    """The exit status of `algm-bench finetune` (usage errors exit through SystemExit)."""
    try:
        return main(["finetune", "--checkpoint", str(start["checkpoint"]), "--method", method,
                     "--data-root", str(start["data"]), "--out", str(out), "--epochs", "2", "--views", "2",
                     "--batch-size", "2", "--quiet", "--json", *extra])
    except SystemExit as err:
        return err.code


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def test_frozen_prefix_then_remaining_blocks_is_the_forward(start):
    """The split that fine-tuning with frozen blocks relies on: prefix + rest == forward."""
    setup = make_setup(checkpoint=start["checkpoint"], method="algm", tau=0.0)
    encoder, method = setup.model.encoder, setup.model.method
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        full, alive = encoder(x, method)
        prefix, first = encoder.run_blocks(encoder.start(x, method), method, range(5))
        rest, last = encoder.run_blocks(prefix, method, range(5, 12))
    assert prefix.num_tokens < 17  # both ALGM stages ran inside the prefix
    assert torch.equal(encoder.finish(rest).x, full.x)
    assert torch.equal(torch.stack(first + last, 1), alive)


def test_finetune_trains_the_unfrozen_part_and_writes_a_checkpoint_that_reloads(start, tmp_path):
    setup = make_setup(checkpoint=start["checkpoint"], method="algm")
    before = {k: v.clone() for k, v in setup.model.state_dict().items()}
    config = FinetuneConfig(epochs=1, freeze_blocks=5, views=2, batch_size=2)
    result = finetune(setup, config, tmp_path / "out", root=start["data"], progress=False)
    after = setup.model.state_dict()
    frozen = ("encoder.patch_embed.", "encoder.pos_embed", "encoder.cls_token",
              *(f"encoder.blocks.{i}." for i in range(5)))
    for name, value in before.items():
        changed = not torch.equal(value, after[name])
        assert changed != name.startswith(frozen) or name.endswith("num_batches_tracked"), name
    budget = result.record["budget"]
    assert (budget["items"], budget["frames"], budget["iterations"]) == (6, 3, 3)  # 3 frames x 2 views
    assert result.record["method"] == "algm" and result.record["settings"]["tau"] == 0.88
    model, info = load_checkpoint(result.checkpoint)
    assert info.window == (64, 64) and info.stride == (48, 48) and model.n_cls == 150
    model = model.with_method(setup.model.method).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), setup.model.eval()(x))
    # the suites' checkpoint reader sees the same model (variant.yml names backbone and dataset)
    again = make_setup(checkpoint=result.checkpoint, method="algm")
    assert again.backbone.name == "vit-s16" and again.dataset.name == "ade20k"


def test_finetune_without_frozen_blocks_trains_everything(start, tmp_path):
    setup = make_setup(checkpoint=start["checkpoint"], method="none")
    embed = setup.model.encoder.patch_embed.proj.weight.clone()
    result = finetune(setup, FinetuneConfig(epochs=1, batch_size=3), tmp_path / "out",
                      root=start["data"], progress=False)
    assert result.record["budget"]["iterations"] == 1
    assert not torch.equal(setup.model.encoder.patch_embed.proj.weight, embed)


def test_a_killed_finetune_resumes_to_the_same_weights(start, tmp_path, monkeypatch, capsys):
    assert run(start, tmp_path / "straight", "--freeze-blocks", "5") == 0
    capsys.readouterr()
    monkeypatch.setenv("ALGM_BENCH_CACHE", str(tmp_path / "other-cache"))
    real_collate, calls = finetune_module.collate, []

    def killed_in_epoch_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # epoch 2, after 3 steps of epoch 1
            raise KeyboardInterrupt
        return real_collate(*args, **kwargs)

    monkeypatch.setattr(finetune_module, "collate", killed_in_epoch_two)
    assert run(start, tmp_path / "resumed", "--freeze-blocks", "5") == 130
    assert not (tmp_path / "resumed").exists()  # nothing published before the end
    monkeypatch.setattr(finetune_module, "collate", real_collate)
    assert run(start, tmp_path / "resumed", "--freeze-blocks", "5") == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [h["epoch"] for h in out["history"]] == [1, 2]
    a, b = weights(tmp_path / "straight" / "checkpoint.pth"), weights(tmp_path / "resumed" / "checkpoint.pth")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a finished run is returned as is; another model in --out needs --overwrite
    assert run(start, tmp_path / "resumed", "--freeze-blocks", "5") == 0
    # killed between the checkpoint and its variant.yml: the run's own checkpoint is not "another model"
    (tmp_path / "resumed" / "variant.yml").unlink()
    assert run(start, tmp_path / "resumed", "--freeze-blocks", "5") == 0
    c = weights(tmp_path / "resumed" / "checkpoint.pth")
    assert (tmp_path / "resumed" / "variant.yml").is_file() and all(torch.equal(a[k], c[k]) for k in a)
    assert run(start, tmp_path / "resumed", "--freeze-blocks", "6") == 2
    assert "holds another model; pass another --out or --overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--method", "nope"], "argument --method: unknown method 'nope'"),
    (["--freeze-blocks", "13"], "--freeze-blocks 13: vit-s16 has 12 blocks"),
    (["--freeze-blocks", "-1"], "freeze_blocks must be a whole number >= 0, got -1"),
    (["--tau", "0.9", "--method", "tome"], "unrecognized arguments: --tau 0.9; --tau is an option of algm"),
])
def test_bad_options_are_one_line_and_write_nothing(start, tmp_path, argv, message, capsys):
    out = tmp_path / "out"
    assert run(start, out, *argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_a_checkpoint_whose_classes_do_not_fit_the_dataset_is_refused(start, tmp_path, capsys):
    bad = write_checkpoint(tmp_path / "bad", seed=3, n_cls=19)
    out = tmp_path / "out"
    assert main(["finetune", "--checkpoint", str(bad), "--method", "algm", "--data-root", str(start["data"]),
                 "--out", str(out)]) == 2
    assert "predicts 19 classes but ade20k has 150" in capsys.readouterr().err
    assert not out.exists()


def test_a_finetune_suite_reports_both_models_at_equal_budget(start, tmp_path):
    suite = tmp_path / "mini-finetune.yaml"
    suite.write_text(
        "dataset: ade20k\nsplit: val\nbackbones: [vit-s16]\nflops_images: 2\n"
        "throughput: {batch_sizes: [1], warmup: 0, repeats: 1, contended_retries: 0}\n"
        "finetune: {freeze_blocks: 5, views: 1, epochs: 1, batch_size: 3}\n"
        "methods:\n  none: [{}]\n  algm: [{train: true}]\n")
    out = tmp_path / "out"
    assert main(["bench", "--dataset", str(suite), "--data-root", str(start["data"]),
                 "--checkpoints", str(start["checkpoints"]), "--out", str(out), "--no-progress"]) == 0
    df = pd.read_csv(out / "results.csv")
    assert list(df.method) == ["none", "algm", "algm"]
    assert list(df.trained_with_method) == [False, False, True]
    assert df.checkpoint.str.contains("finetuned").all()  # every row runs on fine-tuned weights
    assert df.checkpoint_sha256.iloc[0] == df.checkpoint_sha256.iloc[1] != df.checkpoint_sha256.iloc[2]
    assert (df.miou_pct.notna() | df.miou_trained_pct.notna()).all()
    table = (out / "table.md").read_text()
    assert "mIoU fine-tuned w/ method" in table and "fine-tuned with the method" in (out / "diagnostics.md").read_text()
    assert "vit-s16 none: 1 epoch x 3 views of 3 frames = 1 iteration of batch 3, blocks 1-5 frozen" in table
    assert "vit-s16 algm: 1 epoch x 3 views" in table


@pytest.mark.parametrize("finetune_yaml,message", [
    ("{freeze_blocks: 13}", "freeze_blocks 13: vit-s16 has 12 blocks"),
    ("{epoch: 2}", "finetune: unknown key(s) epoch; valid: epochs"),
    ("{lr: 1e-3}", "finetune lr must be a number, got '1e-3'"),
])
def test_a_bad_finetune_section_names_the_key(tmp_path, finetune_yaml, message):
    from suites.definition import load_suite

    suite = tmp_path / "bad.yaml"
    suite.write_text(f"dataset: ade20k\nbackbones: [vit-s16]\nfinetune: {finetune_yaml}\n"
                     "methods:\n  none: [{}]\n")
    with pytest.raises(ValueError, match="invalid suite") as err:
        load_suite(str(suite))
    assert message in str(err.value)


def test_a_finetune_suite_fine_tunes_one_model_per_method(tmp_path):
    from suites.definition import load_suite

    suite = tmp_path / "twice.yaml"
    suite.write_text("dataset: ade20k\nbackbones: [vit-s16]\nfinetune: {}\n"
                     "methods:\n  algm: [{train: true}, {tau: 0.9, train: true}]\n")
    with pytest.raises(ValueError, match="methods.algm marks more than one setting train"):
        load_suite(str(suite))
