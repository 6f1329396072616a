"""Running the command line inside a test, shared by the command tests."""

from __future__ import annotations

import json

from algm.cli import main


def run_json(argv: list[str], capsys) -> dict:
    """Run ``algm-bench argv`` (it must succeed; its stderr is the failure message) and
    return the JSON object on the last line of its stdout."""
    assert main(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])
