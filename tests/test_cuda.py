"""The CUDA paths: every method's Segmenter on CUDA equals the CPU one, CUDA-event timing
and peak memory, autocast forwards, torch.compile. Skipped without a GPU; ``make
gpu-check`` runs them (``pytest -m cuda``). Real ViT-S/14 weights on real CamVid frames:
on random inputs a merge decision can sit within rounding of its threshold, and then the
CPU and the GPU rightly disagree."""

import math

import pytest
import torch

from algm.build import make_setup
from algm.data.datasets import build_dataset
from algm.data.windows import center_window
from algm.measure.throughput import cuda_settings, measure_interleaved, measure_throughput
from algm.precision import autocast_context

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = torch.device("cuda")
METHODS = {"none": {}, "algm": {}, "tome": {"r": 16}, "cts": {"policy": "variance"},
           "prune": {"random_heads": True}}


def build(method: str):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return make_setup("vit-s14", "camvid", method, pretrained=True, **METHODS[method]).model.eval()


@pytest.fixture(scope="module")
def frames() -> torch.Tensor:
    """(2, 3, 336, 448): the centre windows of the first two CamVid val frames."""
    try:
        data = build_dataset("camvid", "val", limit=2)
    except FileNotFoundError as missing:
        pytest.skip(f"CamVid val not found (set DATA_ROOT): {missing}")
    setup = make_setup("vit-s14", "camvid")
    mean, std = setup.backbone.mean, setup.backbone.std
    return torch.cat([center_window(data[i].image, setup.window, mean, std) for i in range(len(data))])


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-8), (torch.float32, 1e-3)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("method", METHODS)
def test_cuda_forward_equals_cpu(method, dtype, tol, frames):
    model = build(method).to(dtype)
    x = frames.to(dtype)
    with torch.no_grad():
        cpu = model.run(x)
        # TF32 off: the default lets cuDNN run the patch-embed convolution in TF32 (1e-3 error)
        with cuda_settings(CUDA, tf32=False, cudnn_benchmark=False):
            gpu = model.to(CUDA).run(x.to(CUDA))
    assert torch.equal(gpu.tokens.cpu(), cpu.tokens), "tokens kept per layer differ between CPU and CUDA"
    torch.testing.assert_close(gpu.logits.cpu(), cpu.logits, atol=tol, rtol=tol)


def test_cuda_event_timing_gives_finite_rates_and_restores_settings(frames):
    model = build("algm").to(CUDA)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark
    result = measure_throughput(model, frames.to(CUDA), warmup=2, repeats=3, tf32=True, cudnn_benchmark=True)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.backends.cudnn.benchmark) == saved
    assert result.device.startswith("cuda") and result.tf32 and result.cudnn_benchmark
    rates = (result.images_per_s, result.median_images_per_s, result.std_images_per_s)
    assert all(math.isfinite(r) for r in rates) and result.images_per_s > 0
    assert 0 < result.min_latency_s <= result.max_latency_s
    assert result.cpu_utilisation is None  # a CPU-only figure


def test_peak_memory_is_reported_and_grows_with_the_batch(frames):
    models = [build("algm").to(CUDA), build("none").to(CUDA)]
    params_mib = sum(p.numel() * p.element_size() for p in models[0].parameters()) / 2**20
    small = measure_interleaved(models, frames.to(CUDA), warmup=1, repeats=2)
    large = measure_interleaved(models, frames.repeat(8, 1, 1, 1).to(CUDA), warmup=1, repeats=2)
    for s, l in zip(small, large):
        assert params_mib < s.peak_memory_mib < l.peak_memory_mib


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("method", METHODS)
def test_autocast_forward_runs(method, precision, frames):
    model, x = build(method).to(CUDA), frames.to(CUDA)
    with torch.no_grad():
        reference = model(x)
        with autocast_context(CUDA, precision):
            logits = model(x)
    assert logits.shape == reference.shape and torch.isfinite(logits).all()
    if method == "none":  # no merge decision to flip: the result is fp32's up to rounding
        assert (logits.float() - reference).abs().mean() < 0.1 * reference.abs().mean()
    result = measure_throughput(model, x, warmup=1, repeats=2, precision=precision)
    assert math.isfinite(result.images_per_s) and result.precision == precision


@pytest.mark.parametrize("method", ["none", "algm"])
def test_torch_compile_gives_the_same_logits(method, frames):
    model, x = build(method).to(CUDA), frames.to(CUDA)
    compiled = torch.compile(model)
    with torch.no_grad(), cuda_settings(CUDA, tf32=False, cudnn_benchmark=False):
        eager = model(x)
        out = compiled(x)
    torch.testing.assert_close(out, eager, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("freeze_blocks", [0, 5])
def test_finetune_on_cuda_writes_the_model_it_trained(tmp_path, freeze_blocks):
    from test_reproduce import write_ade, write_checkpoint

    from algm.training.finetune import FinetuneConfig, finetune
    from algm.weights.checkpoint import load_checkpoint

    data = write_ade(tmp_path / "data", n=2)
    setup = make_setup(checkpoint=write_checkpoint(tmp_path / "start", seed=1), method="algm")
    config = FinetuneConfig(epochs=1, freeze_blocks=freeze_blocks, views=1, batch_size=2)
    result = finetune(setup, config, tmp_path / "out", root=data, device="cuda", cache=tmp_path / "cache",
                      progress=False)
    assert result.record["budget"]["precision"] == "bf16" and result.record["budget"]["iterations"] == 1
    model, _ = load_checkpoint(result.checkpoint)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.with_method(setup.model.method).eval()(x), setup.model.eval()(x))
