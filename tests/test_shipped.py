"""Trained parts shipped with the package: installed into the cache instead of trained
(algm.shipped), listed and checked (suites.shipped_parts, ``algm-bench parts``)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

import algm.training.head as head_mod
from algm import shipped
from algm.cache import cache_dir
from algm.files import file_sha256
from algm.reduction import NoReduction, TrainingTask
from algm.training.head import TrainConfig, load_head, train_head, trained_head_path
from suites.definition import load_suite
from suites.plan import RunOptions
from suites.shipped_parts import ship, suite_parts, tensor_difference
from test_train import FakeData, tiny_setup

pytestmark = pytest.mark.usefixtures("one_thread", "isolated_cache")


def _ship(folder: Path, files: dict[str, bytes], what: str = "toy part") -> Path:
    """A shipped folder holding ``files`` (cache-relative path -> content) and their manifest."""
    parts = []
    for relpath, content in files.items():
        (folder / relpath).parent.mkdir(parents=True, exist_ok=True)
        (folder / relpath).write_bytes(content)
        parts.append({"path": relpath, "what": what, "sha256": file_sha256(folder / relpath),
                      "bytes": len(content), "used_by": {}})
    (folder / "manifest.json").write_text(json.dumps({"format": shipped.MANIFEST_FORMAT, "parts": parts}))
    return folder


def test_a_listed_file_is_copied_into_the_cache_and_said_on_stderr(tmp_path, capsys):
    folder = _ship(tmp_path / "shipped", {"toy/part.pt": b"weights"})
    target = cache_dir("toy") / "part.pt"
    assert shipped.install(target, folder)
    assert target.read_bytes() == b"weights"
    assert capsys.readouterr().err.startswith("algm-bench: using the shipped toy part (toy/part.pt, sha256 ")


def test_unlisted_paths_paths_outside_the_cache_and_a_disabled_switch_install_nothing(tmp_path, monkeypatch):
    folder = _ship(tmp_path / "shipped", {"toy/part.pt": b"weights"})
    assert not shipped.install(cache_dir("toy") / "other.pt", folder)
    assert not shipped.install(tmp_path / "toy" / "part.pt", folder)  # same name, not in the cache
    monkeypatch.setenv(shipped.ENV, "0")
    assert not shipped.install(cache_dir("toy") / "part.pt", folder)
    assert not (cache_dir("toy") / "part.pt").exists()


def test_a_shipped_file_that_does_not_match_its_checksum_is_refused(tmp_path):
    folder = _ship(tmp_path / "shipped", {"toy/part.pt": b"weights"})
    (folder / "toy" / "part.pt").write_bytes(b"tampered")
    with pytest.raises(ValueError) as err:
        shipped.install(cache_dir("toy") / "part.pt", folder)
    assert str(err.value) == (f"{folder / 'toy' / 'part.pt'}: the shipped file is missing or does not match the "
                              f"sha256 of {folder / 'manifest.json'}; reinstall the package")
    assert not (cache_dir("toy") / "part.pt").exists()


class Trained(NoReduction):
    """A method with one trained file; training it is an error here."""

    name = "trained-toy"

    @classmethod
    def training_tasks(cls, config, backbone, dataset):
        def run(context):
            raise AssertionError("trained although the part is shipped")

        return [TrainingTask("toy part", cache_dir("toy") / "part.pt", run)]


def test_required_training_installs_shipped_parts_instead_of_training(tmp_path, monkeypatch, isolated_registry):
    from algm.config import get_backbone, get_dataset
    from algm.methods import register_method, required_training

    register_method(Trained)
    monkeypatch.setattr(shipped, "SHIPPED_DIR", _ship(tmp_path / "shipped", {"toy/part.pt": b"weights"}))
    vit, camvid = get_backbone("vit-s14"), get_dataset("camvid")
    monkeypatch.setenv(shipped.ENV, "0")
    assert [t.name for t in required_training("trained-toy", vit, camvid)] == ["toy part"]
    monkeypatch.delenv(shipped.ENV)
    assert required_training("trained-toy", vit, camvid) == []
    assert (cache_dir("toy") / "part.pt").read_bytes() == b"weights"


def _ship_head(tmp_path, monkeypatch, config: TrainConfig) -> tuple[Path, bytes]:
    """Train a tiny head into the cache, move it into a shipped folder; (its cache path, bytes)."""
    path = train_head(tiny_setup(), config=config, dataset=FakeData(4), progress=False)
    relpath = path.relative_to(cache_dir()).as_posix()
    content = path.read_bytes()
    shutil.rmtree(cache_dir("heads"))
    monkeypatch.setattr(shipped, "SHIPPED_DIR", _ship(tmp_path / "shipped", {relpath: content}))
    return path, content


def test_train_head_uses_a_shipped_head_instead_of_training(tmp_path, monkeypatch):
    config = TrainConfig(epochs=1, batch_size=2, warmup=0, precision="fp32")
    path, content = _ship_head(tmp_path, monkeypatch, config)
    monkeypatch.setattr(head_mod, "extract_features", lambda *a, **k: pytest.fail("trained a shipped head"))
    setup = tiny_setup()  # the same encoder: the head's key hashes its weights
    assert train_head(setup, config=config, dataset=FakeData(4), progress=False) == path
    assert path.read_bytes() == content
    shipped_state = torch.load(path, weights_only=True)["state_dict"]
    assert all(torch.equal(v, shipped_state[k]) for k, v in setup.model.decoder.state_dict().items())


def test_auto_precision_takes_a_head_of_the_other_precision_rather_than_train(tmp_path, monkeypatch):
    monkeypatch.setattr(head_mod, "native_bf16", lambda: False)  # auto resolves to fp32 here
    config = TrainConfig(epochs=1, batch_size=2, warmup=0)
    path, _ = _ship_head(tmp_path, monkeypatch, dataclasses.replace(config, precision="bf16"))
    assert trained_head_path(tiny_setup(), config=config, dataset=FakeData(4)) == path
    # an explicit precision is kept: fp32 is not found, and then trained
    assert trained_head_path(tiny_setup(), config=dataclasses.replace(config, precision="fp32"),
                             dataset=FakeData(4)) is None


def test_tensor_difference_compares_tensors_only(tmp_path):
    a, b, c = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "c.pt"
    torch.save({"state_dict": {"w": torch.ones(3)}, "meta": "seconds 1", "list": [torch.zeros(2)]}, a)
    torch.save({"state_dict": {"w": torch.tensor([1.0, 1.5, 1.0])}, "meta": "seconds 2",
                "list": [torch.zeros(2)]}, b)
    torch.save({"state_dict": {"v": torch.ones(3)}}, c)
    assert tensor_difference(a, a) == 0.0
    assert tensor_difference(a, b) == 0.5
    assert tensor_difference(a, c) == float("inf")


def test_the_committed_manifest_matches_its_files():
    parts = shipped.manifest()["parts"]
    assert parts, "no shipped parts"
    for part in parts:
        path = shipped.SHIPPED_DIR / part["path"]
        assert file_sha256(path) == part["sha256"] and path.stat().st_size == part["bytes"], part["path"]
    on_disk = {p.relative_to(shipped.SHIPPED_DIR).as_posix() for p in shipped.SHIPPED_DIR.rglob("*.pt")}
    assert on_disk == {p["path"] for p in parts}


def test_the_shipped_parts_are_those_the_default_suite_reads_today(tmp_path):
    """A head's folder name hashes its encoder weights, frames and recipe: if any of them
    changed, today's suite would read other paths and the parts must be shipped again
    (``python -m suites.shipped_parts camvid`` after a run that trained them)."""
    from algm.data.datasets import resolve_root

    suite = load_suite("camvid")
    if not resolve_root(suite.dataset).is_dir():
        pytest.skip(f"no CamVid at {resolve_root(suite.dataset)}")
    real_weights = Path.home() / ".cache" / "algm-bench" / "weights"
    for f in real_weights.glob("*.pt") if real_weights.is_dir() else ():
        shutil.copyfile(f, cache_dir("weights") / f.name)  # skips converting the encoder again
    opts = RunOptions(progress=False)
    committed = shipped.manifest()
    assert {p.path.relative_to(cache_dir()).as_posix() for p in suite_parts(suite, opts)} == \
           {p["path"] for p in committed["parts"]}
    written = ship(suite, opts, tmp_path / "again")
    assert [(p["path"], p["sha256"], p["used_by"]) for p in written["parts"]] == \
           [(p["path"], p["sha256"], p["used_by"]) for p in committed["parts"]]


def test_parts_lists_every_shipped_file(capsys):
    from algm.cli import main

    assert main(["parts"]) == 0
    out = capsys.readouterr().out
    parts = shipped.manifest()["parts"]
    assert out.startswith(f"{len(parts)} part(s) shipped in {shipped.SHIPPED_DIR} (suite camvid):")
    assert all(f"  {p['path']}\n    {p['what']}; sha256 {p['sha256'][:16]}" in out for p in parts)
    assert "used by vit-s14 algm with its trained head" in out


def test_parts_verify_prints_each_part_and_fails_when_one_does_not_reproduce(monkeypatch, capsys, tmp_path):
    import suites.shipped_parts
    from algm.cli import main

    def result(what, reproduces):
        return {"path": f"x/{what}.pt", "what": what, "row": "algm", "retrain_seconds": 90.0,
                "max_abs_difference": 0.0 if reproduces else 0.25, "miou_shipped": {"miou": 49.7, "miou_trained": 49.2},
                "miou_retrained": {"miou": 49.7, "miou_trained": 48.1 if not reproduces else 49.2},
                "reproduces": reproduces}

    results = [result("same head", True)]
    monkeypatch.setattr(suites.shipped_parts, "verify", lambda work, opts, tolerance: results)
    assert main(["parts", "--verify", "--work", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["same", "head", "algm", "1.5", "0", "49.70/49.20", "49.70/49.20", "yes"]
    results.append(result("other head", False))
    assert main(["parts", "--verify", "--work", str(tmp_path), "--tolerance", "1"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split()[-3:] == ["49.70/49.20", "49.70/48.10", "NO"]
    assert "within 1.0 points" in lines[-1]


def test_verify_without_data_fails_naming_the_root_and_writes_nothing(tmp_path, monkeypatch):
    from suites.shipped_parts import verify

    monkeypatch.setenv("ALGM_BENCH_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=f"camvid train: the root {tmp_path / 'nowhere' / 'camvid'} does not"):
        verify(tmp_path / "work", RunOptions(progress=False))
    assert not (tmp_path / "work").exists()
