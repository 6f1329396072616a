"""The algm-bench command line: help, JSON output, errors."""

import json
import subprocess
import sys

import pytest

from algm.cli import build_parser, main


def subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "algm.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for name in subcommands():
        assert name in out.stdout


@pytest.mark.parametrize("name", subcommands())
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([name, "--help"])
    assert exit_.value.code == 0
    assert "usage: algm-bench " + name in capsys.readouterr().out


def test_flops_json(capsys):
    assert main(["flops", "--backbone", "vit-s16", "--dataset", "pascal", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"gflops", "backbone", "dataset", "crop", "method"} <= set(result)
    assert result["gflops"] == pytest.approx(32.1, rel=0.005)
    assert result["crop"] == [480, 480] and result["method"] == "none"


@pytest.mark.parametrize("argv,message", [
    (["flops", "--backbone", "vit-s14", "--crop", "500"], "not divisible by the patch size 14"),
    (["flops", "--method", "none", "--tau", "0.9"], "--tau do(es) not apply to method 'none'"),
    (["bench", "--dataset", "pascal"], "VOCdevkit/VOC2010"),
    (["bench", "--dataset", "nosuch"], "known suites"),
])
def test_bad_input_exits_2_with_a_clear_message(argv, message, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("DATA_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_unknown_backbone_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["flops", "--backbone", "vit-huge"])
    assert exit_.value.code == 2
    assert "invalid choice: 'vit-huge'" in capsys.readouterr().err
