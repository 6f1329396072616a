"""torch.distributed sharding: two gloo processes give exactly the single-process numbers."""

from __future__ import annotations

import json
import os
import socket
import sys
from dataclasses import replace

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from algm import distributed
from algm.cli import main
from algm.config import DecoderConfig, get_backbone
from algm.data.datasets import DEFAULT_CAMVID_ROOT, build_dataset
from algm.evaluate import evaluate
from algm.measure.flops import average_flops
from algm.model.segmenter import build_segmenter

FRAMES = 4
WINDOW = (64, 64)  # CamVid frames at short side 64: 64x85, 2 windows each
CFG = get_backbone("vit-s14")  # ImageNet normalisation; the model below is a tiny random ViT
WORLD = 2


def tiny_segmenter() -> nn.Module:
    """The same random 2-layer ViT in every process (seeded)."""
    torch.manual_seed(0)
    cfg = replace(CFG, embed_dim=48, depth=2, num_heads=2, patch_size=16, pos_grid=(4, 4), weights=None)
    return build_segmenter(cfg, 11, DecoderConfig("linear")).eval()


def flops_images() -> list[torch.Tensor]:
    """Five inputs of distinct sizes, so each image's GFLOPs tell which image it was."""
    return [torch.zeros(1, 3, 8 + 2 * i, 10) for i in range(5)]


def flops_model() -> nn.Module:
    return nn.Conv2d(3, 4, 3)


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    assert distributed.init() and distributed.world_size() == WORLD
    dataset = build_dataset("camvid", "val", root=DEFAULT_CAMVID_ROOT, limit=FRAMES)
    result = evaluate(tiny_segmenter(), dataset, WINDOW, progress=False, batch_size=1, distributed=True)
    mean, per_image = average_flops(flops_model(), flops_images(), distributed=True)
    torch.manual_seed(rank)  # random weights that differ per rank until broadcast
    layer = distributed.broadcast_module(nn.Linear(3, 2))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"confusion": result.confusion.tolist(), "miou": result.miou, "acc": result.acc,
                   "n_images": result.n_images, "shard": list(distributed.shard(range(5))),
                   "gflops": mean, "per_image": per_image, "weights": layer.weight.tolist(),
                   "object": distributed.broadcast_object(f"from rank {rank}")}, f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    if not (DEFAULT_CAMVID_ROOT / "val.txt").is_file():
        pytest.skip(f"CamVid not found at {DEFAULT_CAMVID_ROOT}")
    out = tmp_path_factory.mktemp("ranks")
    # fork: the workers start with this process's imports (spawn re-imports torch: slow here)
    mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=WORLD, start_method="fork")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_two_process_evaluation_equals_single_process(ranks):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: the same float summation order
    try:
        dataset = build_dataset("camvid", "val", root=DEFAULT_CAMVID_ROOT, limit=FRAMES)
        single = evaluate(tiny_segmenter(), dataset, WINDOW, progress=False, batch_size=1)
    finally:
        torch.set_num_threads(threads)
    assert single.n_images == FRAMES and single.confusion.sum() > 0
    for r in ranks:  # every rank holds the whole split's result
        assert torch.equal(torch.tensor(r["confusion"]), single.confusion)
        assert r["n_images"] == FRAMES
        assert r["miou"] == single.miou and r["acc"] == single.acc
    assert [r["shard"] for r in ranks] == [[0, 2, 4], [1, 3]]


def test_sharded_flops_gather_the_per_image_list_in_order(ranks):
    mean, per_image = average_flops(flops_model(), flops_images())
    assert len(set(per_image)) == 5  # distinct, so the order is checked
    for r in ranks:
        assert r["per_image"] == per_image and r["gflops"] == mean


def test_broadcasts_give_rank_0s_values(ranks):
    torch.manual_seed(0)
    assert [r["weights"] for r in ranks] == [nn.Linear(3, 2).weight.tolist()] * WORLD
    assert [r["object"] for r in ranks] == ["from rank 0"] * WORLD


def test_single_process_helpers_are_the_identity():
    assert distributed.rank() == 0 and distributed.world_size() == 1 and distributed.is_main()
    assert list(distributed.shard(range(3))) == [0, 1, 2]
    assert distributed.gather_in_order([5, 6]) == [5, 6]
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert torch.equal(distributed.all_reduce_sum(torch.arange(4)), torch.arange(4))


def test_nproc_reruns_the_same_arguments_under_torchrun(monkeypatch):
    calls = []

    class Done:
        returncode = 0

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(distributed.subprocess, "run", lambda cmd: calls.append(cmd) or Done())
    assert main(["eval", "--nproc", "3", "--limit", "4", "--json"]) == 0
    assert main(["bench", "--nproc=2", "--flops-only"]) == 0
    assert calls == [
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3",
         "-m", "algm.cli", "eval", "--limit", "4", "--json"],
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "algm.cli", "bench", "--flops-only"],
    ]


def test_gpu_timing_settings_are_recorded_and_refused_on_cpu():
    from algm.measure.throughput import measure_throughput

    model, batch = nn.Conv2d(3, 4, 3), torch.zeros(2, 3, 8, 8)
    result = measure_throughput(model, batch, warmup=1, repeats=2)
    assert (result.precision, result.tf32, result.cudnn_benchmark, result.compile) == ("fp32", False, False, False)
    assert result.peak_memory_mib is None  # GPU memory only
    for options in ({"tf32": True}, {"cudnn_benchmark": True}):
        with pytest.raises(ValueError, match="CUDA settings"):
            measure_throughput(model, batch, **options)
    with pytest.raises(ValueError, match="warm-up"):
        measure_throughput(model, batch, warmup=0, compile=True)
