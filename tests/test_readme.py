"""Every CLI command is documented (README or docs/), the README has its two commands, fits a front door's
length and links every docs/ page."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DOCS = "\n".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))


def test_every_command_is_documented():
    import typer.main

    from cli import app

    commands = set(typer.main.get_command(app).commands)
    assert len(commands) >= 17
    for cmd in commands:
        assert any(f"circuit-catalog {cmd}" in text or f"`{cmd}`" in text for text in (README, DOCS)), cmd


def test_the_two_commands():
    block = README.split("## The two commands")[1].split("##")[0]
    assert re.findall(r"^make (\w+)", block, re.M) == ["demo", "test"]
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert ci.strip().splitlines()[-1] == "make test"


def test_the_readme_is_a_front_door_to_docs():
    assert len(README.splitlines()) <= 250
    linked = set(re.findall(r"\]\((docs/[\w.-]+\.md)", README))
    assert linked == {str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")}
    assert README.index("## The two commands") < README.index("## A five-minute tour") < README.index("## GPT-2 Small")
