from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Fresh machine\n.*?```(?:bash|sh)?\n(.*?)```", text, re.S)
    assert block, "README lacks the 'Fresh machine' code block"
    return [l.strip() for l in block.group(1).splitlines() if l.strip() and not l.strip().startswith("#")]


def test_readme_has_exactly_two_fresh_machine_commands():
    cmds = _readme_commands()
    assert len(cmds) == 2, cmds
    assert "nilmc example" in cmds[0]
    assert "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert _readme_commands()[1] in ci
