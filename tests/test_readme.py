"""Every CLI command is documented in the README, and the README has its two commands."""

import re
from pathlib import Path

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_command_is_documented():
    import typer.main

    from cli import app

    commands = set(typer.main.get_command(app).commands)
    assert len(commands) >= 17
    for cmd in commands:
        assert f"circuit-catalog {cmd}" in README or f"`{cmd}`" in README, cmd


def test_the_two_commands():
    block = README.split("## The two commands")[1].split("##")[0]
    assert re.findall(r"^make (\w+)", block, re.M) == ["demo", "test"]
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert ci.strip().splitlines()[-1] == "make test"
