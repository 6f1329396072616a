"""CPU timing keeps freed host memory in the process (algm.measure.allocator)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from algm.measure.allocator import POLICY

# Whether a live 64 MiB tensor is an mmapped block (mallinfo2().hblkhd, glibc's mmapped
# bytes): before, inside (after a nested use has ended) and after freed_memory_kept.
PROBE = """
import ctypes, torch
from algm.measure.allocator import freed_memory_kept
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena ordblks smblks hblks hblkhd usmblks fsmblks "
                                              "uordblks fordblks keepcost").split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
def mapped():
    x = torch.ones(2**24)
    return libc.mallinfo2().hblkhd >= 2**26
before = mapped()
with freed_memory_kept():
    with freed_memory_kept():
        pass
    inside = mapped()  # still inside the outer one
print(before, inside, mapped())
"""


@pytest.mark.skipif(not POLICY.startswith("glibc"), reason="the policy acts on glibc malloc only")
def test_large_blocks_come_from_the_heap_only_while_timing():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "False", "True"]


def test_cpu_timing_runs_inside_the_policy_and_machine_records_name_it(monkeypatch):
    from contextlib import contextmanager

    import torch

    import algm.measure.throughput as throughput
    from suites.machine import machine_record

    seen = []

    @contextmanager
    def spy():
        seen.append("enter")
        yield POLICY
        seen.append("exit")

    monkeypatch.setattr(throughput, "freed_memory_kept", spy)
    model = torch.nn.Module()
    model.forward = lambda x: seen.append("forward") or x
    throughput.measure_throughput(model, torch.zeros(1, 3, 4, 4), warmup=1, repeats=2)
    assert seen == ["enter", "forward", "forward", "forward", "exit"]
    assert machine_record()["cpu_allocator"] == POLICY
