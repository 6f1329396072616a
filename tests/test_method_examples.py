"""Two methods of the kinds that came after ALGM, each one class written against the
method contract only, run through ``flops``, ``throughput``, ``eval``, a fixture
``bench`` and ``predict`` with no framework file edited:

* :class:`ClsRank` ranks the patch tokens by the cls token's attention (``mid_block``'s
  attention view) and fuses the rest into one attention-weighted token (EViT's rule);
* :class:`GridCluster` clusters the tokens after one block into a coarser grid and
  reconstructs every patch's features before the decoder (``before_decoder``), so the
  decoder sees the full grid while the tokens kept are the clusters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from algm.cli import main
from algm.merging.index_map import apply_token_map
from algm.methods import option, register_method
from algm.reduction import AttentionView, TokenReduction, TokenState
from test_reproduce import WINDOW, write_ade, write_checkpoint


def define_methods() -> tuple[type, type]:
    """Define (and so register) the two example methods."""

    @register_method
    class ClsRank(TokenReduction):
        name = "cls-rank"

        @dataclass(frozen=True)
        class Config:
            keep: int = option(8, "patch tokens kept at the block", type=int)
            layers: str = option("2", "1-based blocks that reduce, comma-separated")

        def __init__(self, keep: int = 8, layers: str = "2"):
            super().__init__()
            self.keep, self.blocks = keep, {int(v) - 1 for v in str(layers).split(",")}

        def settings(self) -> dict:
            return {"keep": self.keep, "layers": ",".join(str(b + 1) for b in sorted(self.blocks))}

        def mid_block(self, state: TokenState, layer: int, attn: AttentionView) -> TokenState:
            p, n = state.prefix, state.num_tokens - state.prefix
            if layer not in self.blocks or self.keep >= n:
                return state
            score = attn.cls_attention().mean(1)[:, p:]  # (B, n) over the patch tokens
            top = score.topk(self.keep, dim=1).indices
            kept = torch.zeros_like(score).scatter(1, top, 1.0) > 0
            rank = kept.long().cumsum(1) - 1
            dest = torch.where(kept, rank + p, torch.full_like(rank, p + self.keep))  # rest -> one slot
            prefix = torch.arange(p, device=dest.device).expand(dest.shape[0], p)
            # attention-weighted fusion: weight every token by its score, sizes add
            weights = torch.where(kept, torch.ones_like(score), score * n)
            fused = apply_token_map(state.replace(size=torch.cat([state.size[:, :p], weights], 1)),
                                    torch.cat([prefix, dest], 1), p + self.keep + 1)
            sizes = apply_token_map(state, torch.cat([prefix, dest], 1), p + self.keep + 1).size
            return fused.replace(size=sizes)

    @register_method
    class GridCluster(TokenReduction):
        name = "grid-cluster"

        @dataclass(frozen=True)
        class Config:
            block: int = option(2, "1-based block after which tokens cluster", type=int)
            stride: int = option(2, "cluster grid = patch grid / stride", type=int)

        def __init__(self, block: int = 2, stride: int = 2):
            super().__init__()
            self.block, self.stride = block, stride

        def settings(self) -> dict:
            return {"block": self.block, "stride": self.stride}

        def after_block(self, state: TokenState, layer: int) -> TokenState:
            if layer != self.block - 1:
                return state
            (h, w), s, p = state.grid, self.stride, state.prefix
            rows = torch.arange(h, device=state.x.device) // s
            cols = torch.arange(w, device=state.x.device) // s
            cell = (rows[:, None] * (-(-w // s)) + cols[None, :]).reshape(1, -1)
            cell = cell.expand(state.x.shape[0], -1)
            prefix = torch.arange(p, device=cell.device).expand(cell.shape[0], p)
            k = int(cell.max()) + 1
            clustered = apply_token_map(state, torch.cat([prefix, cell + p], 1), p + k)
            return clustered.replace(aux=state.patches)  # the features at the cluster block

        def before_decoder(self, state: TokenState) -> TokenState:
            if state.aux is None:
                return state
            # every patch: softmax over the clusters by similarity of its features at the
            # block to the clusters' features there (k = all clusters, temperature 0.1)
            at_block = F.normalize(state.aux, dim=-1)
            centres = F.normalize(state.patches, dim=-1)
            weights = (at_block @ centres.transpose(1, 2) / 0.1).softmax(-1)  # (B, N, K)
            patches = weights @ state.patches
            b, n = patches.shape[:2]
            x = torch.cat([state.x[:, :state.prefix], patches], 1)
            return state.replace(x=x, size=torch.ones(b, state.prefix + n, dtype=state.size.dtype,
                                                      device=x.device),
                                 source=torch.arange(n, device=x.device).expand(b, n), keep=None, aux=None)

    return ClsRank, GridCluster


@pytest.fixture
def fixtures(tmp_path, monkeypatch, isolated_registry):
    monkeypatch.setenv("ALGM_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DATA_ROOT", raising=False)
    define_methods()
    ckpt = write_checkpoint(tmp_path / "ckpt", seed=1)
    return {"data": write_ade(tmp_path / "data"), "ckpt": ckpt, "tmp": tmp_path}


def run_json(argv, capsys) -> dict:
    assert main(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("method,options", [("cls-rank", ["--keep", "6"]), ("grid-cluster", ["--stride", "2"])])
def test_commands_run_the_new_kinds_of_method(fixtures, method, options, capsys):
    common = ["--checkpoint", str(fixtures["ckpt"]), "--data-root", str(fixtures["data"]), "--json"]
    base = run_json(["flops", *common, "--limit", "1"], capsys)
    mine = run_json(["flops", *common, "--method", method, *options, "--limit", "2"], capsys)
    assert mine["gflops"] < base["gflops"] and mine["images"] == 2
    tp = run_json(["throughput", *common, "--method", method, *options, "--warmup", "0", "--repeats", "1"],
                  capsys)
    assert tp["images_per_s"] > 0
    ev = run_json(["eval", *common, "--method", method, *options, "--no-progress"], capsys)
    assert 0 <= ev["miou"] <= 100 and ev["method"] == method
    out = fixtures["tmp"] / "pictures"
    image = fixtures["data"] / "ADEChallengeData2016" / "images" / "validation" / "ADE_val_00000000.jpg"
    assert main(["predict", "--image", str(image), "--checkpoint", str(fixtures["ckpt"]),
                 "--method", method, *options, "--out", str(out)]) == 0
    assert (out / "ADE_val_00000000_tokens.png").is_file()


def test_a_suite_reports_the_tokens_the_clusters_keep(fixtures):
    """The cluster method reconstructs the grid before the decoder, yet its row reports
    the tokens its later blocks ran on (16 patches -> 4 clusters after block 2)."""
    suite = fixtures["tmp"] / "mine.yaml"
    suite.write_text(
        "dataset: ade20k\nsplit: val\nbackbones: [vit-s16]\n"
        f"windows: {{vit-s16: [{WINDOW}, {WINDOW}]}}\nflops_images: 2\n"
        "throughput: {batch_sizes: [1], warmup: 1, repeats: 1, contended_retries: 0}\n"
        "methods:\n  none: [{}]\n  grid-cluster: [{stride: 2}]\n  cls-rank: [{keep: 6}]\n")
    out = fixtures["tmp"] / "out"
    assert main(["bench", "--dataset", str(suite), "--data-root", str(fixtures["data"]), "--out", str(out),
                 "--no-progress"]) == 0
    rows = pd.read_csv(out / "results.csv").set_index("method")
    tokens = json.loads(rows.loc["grid-cluster", "tokens_per_layer"].replace("'", '"'))
    assert tokens[:2] == [17, 5] and tokens[-1] == 5  # cls + 16 patches, then cls + 4 clusters
    assert rows.loc["grid-cluster", "tokens_kept_pct"] < 100
    rank = json.loads(rows.loc["cls-rank", "tokens_per_layer"].replace("'", '"'))
    assert rank[1] == 1 + 6 + 1  # cls, the 6 most attended patches, one fused token
    assert rows.loc["grid-cluster", "gflops"] < rows.loc["none", "gflops"]
