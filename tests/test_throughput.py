"""Interleaved timing of several models (algm.measure.throughput)."""

import pytest
import torch
from torch import nn

from algm.measure.throughput import measure_interleaved, measure_throughput


class Recorder(nn.Module):
    def __init__(self, name: str, log: list):
        super().__init__()
        self.name, self.log = name, log

    def forward(self, x):
        self.log.append((self.name, self.training, torch.is_grad_enabled()))
        return x * 2


def test_models_are_warmed_up_then_timed_in_turn():
    log = []
    a, b = Recorder("a", log), Recorder("b", log)
    a.eval()
    results = measure_interleaved([a, b], torch.zeros(3, 1), warmup=2, repeats=3)
    assert [name for name, _, _ in log] == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert not any(training or grad for _, training, grad in log)  # eval mode, no grad
    assert b.training and not a.training  # training flags restored
    assert [r.repeats for r in results] == [3, 3] and all(r.batch_size == 3 for r in results)
    assert all(0 < r.cpu_utilisation for r in results) and all(r.images_per_s > 0 for r in results)


def test_single_model_measurement_is_the_interleaved_one():
    log = []
    result = measure_throughput(Recorder("a", log), torch.zeros(2, 1), warmup=1, repeats=4)
    assert len(log) == 5 and result.repeats == 4 and result.min_latency_s <= result.max_latency_s
    with pytest.raises(ValueError, match="repeats >= 1"):
        measure_interleaved([Recorder("a", log)], torch.zeros(1, 1), warmup=1, repeats=0)
