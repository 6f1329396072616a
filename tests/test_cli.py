"""The algm-bench command line: help, JSON output, errors."""

import json
import subprocess
import sys

import pytest
import torch

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
    (["bench", "--dataset", "pascal"], "VOCdevkit/VOC2010"),
    (["bench", "--dataset", "nosuch"], "known suites"),
])
def test_bad_input_exits_2_with_a_clear_message(argv, message, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("DATA_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv,message", [
    (["eval", "--limit", "0"], "argument --limit: must be >= 1, got 0"),
    (["flops", "--limit", "-3"], "argument --limit: must be >= 1, got -3"),
    (["bench", "--nproc", "0"], "argument --nproc: must be >= 1, got 0"),
    (["flops", "--method", "none", "--tau", "0.9"],
     "unrecognized arguments: --tau 0.9; --tau is an option of algm"),
    (["flops", "--method", "bogus"], "argument --method: unknown method 'bogus'"),
    (["eval", "--device", "gpu7"], "argument --device: not a torch device: 'gpu7'"),
    pytest.param(["throughput", "--device", "cuda"], "argument --device: cuda: CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
])
def test_bad_arguments_get_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and err.count("\n") == 1


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    import algm.commands.flops as flops

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(flops, "run", interrupted)
    assert main(["flops"]) == 130
    assert capsys.readouterr().err == "algm-bench flops: interrupted\n"


def test_unknown_backbone_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["flops", "--backbone", "vit-huge"])
    assert exit_.value.code == 2
    assert "invalid choice: 'vit-huge'" in capsys.readouterr().err


def imported_after_parsing(argv: list[str]) -> set[str]:
    """The modules a fresh interpreter has imported once it built the parser for ``argv``
    and parsed it (``--help`` exits there)."""
    code = ("import sys\nfrom algm.cli import build_parser\n"
            f"argv = {argv!r}\n"
            "try:\n    build_parser(argv).parse_args(argv)\nexcept SystemExit:\n    pass\n"
            "print('MODULES', *sorted(sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.splitlines()[-1].split()[1:])


@pytest.mark.parametrize("argv", [["--help"], ["flops", "--help"], ["fetch", "--help"], ["bogus"],
                                  ["compare", "--help"], ["bench", "--help"], ["train-head", "--help"],
                                  ["finetune", "--help"]])
def test_help_and_usage_errors_do_not_import_torch(argv):
    loaded = imported_after_parsing(argv)
    assert "torch" not in loaded
    assert not any(m.startswith("baselines") for m in loaded)  # nor any method plugin


def test_a_chosen_method_imports_its_own_plugin_only():
    loaded = imported_after_parsing(["flops", "--method", "tome", "--help"])
    assert "baselines.tome" in loaded
    assert not any(m.startswith("baselines.") and m != "baselines.tome" for m in loaded)
