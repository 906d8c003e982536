"""Every CLI command is documented in the README, and the README has its two commands."""

import re
import subprocess
import sys
from pathlib import Path

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_command_is_documented():
    out = subprocess.run([sys.executable, "-m", "catalog.cli", "--help"], capture_output=True, text=True).stdout
    commands = set(re.findall(r"│ ([a-z][a-z-]+) {2,}", out))
    assert len(commands) >= 18
    for cmd in commands:
        assert f"circuit-catalog {cmd}" in README or f"`{cmd}`" in README, cmd


def test_the_two_commands():
    block = README.split("## The two commands")[1].split("##")[0]
    assert re.findall(r"^make (\w+)", block, re.M) == ["demo", "test"]
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert ci.strip().splitlines()[-1] == "make test"
