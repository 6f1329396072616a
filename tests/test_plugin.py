"""Methods from a plain Python file: ``--plugin path.py`` and ``$ALGM_BENCH_PLUGINS``, with
the README's example method written to a file by the test (no package, no entry point)."""

from __future__ import annotations

import json
import os
import re
import sys

import pytest

import algm.methods
from algm.cli import main
from test_custom_method import COMMON, write_ade
from test_readme import METHOD_DOC

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def plugins(tmp_path, monkeypatch, isolated_registry):
    """A fresh plugin state (files, loaded, broken) and a file holding the README's method."""
    for name in ("_LOADED", "_BROKEN"):
        monkeypatch.setattr(algm.methods, name, type(getattr(algm.methods, name))(getattr(algm.methods, name)))
    monkeypatch.setattr(algm.methods, "_PLUGIN_FILES", [])
    monkeypatch.setattr(sys, "modules", dict(sys.modules))  # the plugin's module is forgotten too
    monkeypatch.setenv("ALGM_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(algm.methods.PLUGINS_ENV, raising=False)
    blocks = re.findall(r"```python\n(.*?)```", METHOD_DOC.read_text(), re.S)
    path = tmp_path / "my_method.py"
    path.write_text(next(b for b in blocks if "class MergeOnePair" in b))
    return {"file": path, "data": write_ade(tmp_path / "data", n=2)}


def flops(argv, capsys) -> dict:
    assert main(["flops", *COMMON, *argv, "--limit", "2", "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_plugin_file_registers_its_method_and_options(plugins, capsys):
    assert "merge-one-pair" not in algm.methods.methods()
    base = flops([], capsys)
    mine = flops(["--plugin", str(plugins["file"]), "--method", "merge-one-pair", "--layer", "1",
                  "--data-root", str(plugins["data"])], capsys)
    assert mine["method"] == "merge-one-pair" and mine["settings"] == {"layer": 1}
    assert mine["gflops"] < base["gflops"]


def test_the_environment_names_plugin_files(plugins, capsys, monkeypatch, tmp_path):
    other = tmp_path / "empty_plugin.py"
    other.write_text("X = 1\n")
    monkeypatch.setenv(algm.methods.PLUGINS_ENV, os.pathsep.join([str(other), str(plugins["file"])]))
    monkeypatch.setattr(algm.methods, "_discovered", False)  # the variable is read on discovery
    mine = flops(["--method", "merge-one-pair", "--data-root", str(plugins["data"])], capsys)
    assert mine["settings"] == {"layer": 3}  # the Config default


def test_a_broken_plugin_breaks_only_itself(plugins, capsys, tmp_path):
    broken = tmp_path / "broken_plugin.py"
    broken.write_text("import no_such_module_anywhere\n")
    argv = ["--plugin", str(broken), "--plugin", str(plugins["file"]), "--data-root", str(plugins["data"])]
    assert flops([*argv, "--method", "merge-one-pair"], capsys)["method"] == "merge-one-pair"
    assert flops([*argv, "--method", "tome"], capsys)["method"] == "tome"
    with pytest.raises(SystemExit) as exit_:
        main(["flops", *argv, "--method", "mine"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert "unknown method 'mine'" in err and "merge-one-pair" in err
    assert (f"the plugin file {broken} failed to import (ModuleNotFoundError: No module named "
            f"'no_such_module_anywhere')") in err


def test_a_missing_plugin_file_is_a_usage_error(plugins, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["flops", "--plugin", str(tmp_path / "nope.py")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"argument --plugin: {tmp_path / 'nope.py'}: no such file" in err
    assert err.count("\n") == 1
