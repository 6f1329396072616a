"""The public API: ``import algm`` stays cheap, and docs/api.md's example runs as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import algm

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"
pytestmark = pytest.mark.usefixtures("one_thread")


def test_import_algm_does_not_import_torch():
    code = "import sys, algm; assert 'torch' not in sys.modules, 'torch imported'; print(algm.__all__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_every_name_in_all_resolves_and_others_do_not():
    for name in algm.__all__:
        assert callable(getattr(algm, name)) and getattr(algm, name).__doc__
    with pytest.raises(AttributeError, match="module 'algm' has no attribute 'nothing'"):
        algm.nothing


def test_the_documented_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 1
    exec(compile(blocks[0], str(DOC), "exec"), {})
    assert "'tome'" in capsys.readouterr().out
