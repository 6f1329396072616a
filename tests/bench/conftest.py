"""Benchmark cases time under the suites' CPU protocol: freed host memory stays in the
process while they run (algm.measure.allocator), so no case pays page faults that
depend on what ran before it."""

import pytest

from algm.measure.allocator import freed_memory_kept


@pytest.fixture(autouse=True)
def _kept_memory():
    with freed_memory_kept():
        yield
