"""Every command and snippet in the README and docs/ is run by a test, and the README's tour works as written.

Each fenced block is one of:
- a ``bash`` block that another test runs as written (CLAIMED: the GPT-2 block, the job-array script; the
  claim is checked: that test reads the block from the page under its heading);
- the README's tour, run here as one script on a catalog made the way ``make demo`` makes it, with what its
  prose says checked against what the commands print;
- ``bash`` lines run here one by one on a copy of that catalog (a server command is started, asked for
  /healthz and stopped), or, for a usage synopsis (placeholders such as URL or [--opt]), checked against the
  command's own options; ``pip install`` and ``make`` lines against pyproject.toml and the Makefile;
- ``cypher`` blocks: only docs/catalog.md's two, which tests/test_runs.py and tests/test_qk_ingest.py run on
  a live server;
- ``text`` (or no language): shapes and layouts, never a command.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOUR = ("README.md", "## A five-minute tour")
CLAIMED = {  # (page, heading) -> the test that runs that block as written
    ("docs/ingest.md", "### GPT-2 Small with the seed's SAEs"): "tests/test_gpt2_hub.py",
    ("README.md", "## GPT-2 Small with the seed's SAEs"): "tests/test_gpt2_hub.py",
    ("docs/ingest.md", "### Job arrays"): "tests/test_spool.py",
    ("README.md", "## The two commands"): "tests/test_readme.py",
}
PLACEHOLDER = re.compile(r"^[A-Z][A-Z_]*$")
SERVERS = {"serve": 8000}  # commands that serve until stopped: started, asked for /healthz, stopped


@dataclass
class Block:
    page: str
    heading: str
    lang: str
    text: str


def blocks() -> list[Block]:
    out = []
    for path in PAGES:
        heading, lang, lines, inside = "", "", [], False
        for line in path.read_text().splitlines():
            if line.startswith("```"):
                if inside:
                    out.append(Block(str(path.relative_to(ROOT)), heading, lang, "\n".join(lines)))
                inside, lang, lines = not inside, line[3:].strip(), []
            elif inside:
                lines.append(line)
            elif re.match(r"^#{1,3} ", line):
                heading = line
    return out


def commands(text: str) -> list[str]:
    """The block's command lines: continuations joined, comment lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [line for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def words(line: str) -> list[str]:
    return shlex.split(line, comments=True)


def is_synopsis(line: str) -> bool:
    return any(PLACEHOLDER.match(w) or w.startswith("[") or w.endswith("]") or w == "..." or "|" in w
               for w in words(line)[2:] if not w.startswith(("'", '"')))


def cli_options(command: str) -> set[str]:
    import typer.main

    from cli import app

    click_command = typer.main.get_command(app).commands[command]
    return {opt for p in click_command.params for opt in (*p.opts, *p.secondary_opts)}


def test_every_block_has_a_runner():
    """No block is left out: every language is one the runners below take, and every claim is real."""
    found = blocks()
    assert len(found) >= 15
    for b in found:
        assert b.lang in ("bash", "cypher", "text", ""), (b.page, b.heading, b.lang)
        if b.lang in ("text", ""):
            assert not [line for line in commands(b.text) if line.lstrip().startswith("circuit-catalog")], b
    for (page, heading), test in CLAIMED.items():
        assert any(b.page == page and b.heading == heading and b.lang == "bash" for b in found), (page, heading)
        source = (ROOT / test).read_text()
        name = Path(page).name
        assert name in source and heading.lstrip("# ") in source, (test, page, heading)
    cypher = [b for b in found if b.lang == "cypher"]
    assert [b.page for b in cypher] == ["docs/catalog.md", "docs/catalog.md"]
    assert "docs\" / \"catalog.md" in (ROOT / "tests" / "test_runs.py").read_text()
    assert "A QK walk" in (ROOT / "tests" / "test_qk_ingest.py").read_text()


def test_synopses_name_only_options_the_commands_have():
    checked = 0
    for b in blocks():
        if b.lang != "bash" or (b.page, b.heading) in CLAIMED:
            continue
        for line in commands(b.text):
            w = words(line)
            if w[0] == "circuit-catalog" and is_synopsis(line):
                opts = {re.sub(r"^\[+|[\])]+$", "", x).split("=")[0] for x in w[2:] for x in x.split("|")}
                opts = {o for o in opts if o.startswith("--")}
                assert opts <= cli_options(w[1]), (b.page, line, opts - cli_options(w[1]))
                checked += 1
            elif w[:2] == ["pip", "install"]:
                import tomllib

                extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
                assert re.fullmatch(r"circuit-catalog\[(\w+)\]", w[2]) and w[2][16:-1] in extras, line
            elif w[0] == "make":
                assert re.search(rf"^{w[1]}:", (ROOT / "Makefile").read_text(), re.M), line
    assert checked >= 2


def sandbox(tmp: Path, demo_db: Path) -> tuple[Path, dict]:
    tmp.mkdir(parents=True, exist_ok=True)
    shutil.copy(demo_db, tmp / "demo-catalog.db")
    (tmp / ".venv").symlink_to(VENV_BIN.parent)
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "CIRCUIT_CATALOG_TORCH_THREADS": "1",
           "COLUMNS": "200"}
    return tmp, env


@pytest.fixture(scope="module")
def demo_db(tmp_path_factory) -> Path:
    """The catalog ``make demo`` makes: its recipe is exactly ``circuit-catalog demo``."""
    recipe = (ROOT / "Makefile").read_text().split("\ndemo: setup\n")[1].splitlines()[0].strip()
    assert recipe == "$(VENV)/bin/circuit-catalog demo"
    where = tmp_path_factory.mktemp("demo")
    subprocess.run([str(VENV_BIN / "circuit-catalog"), "demo"], cwd=where, check=True, capture_output=True,
                   env={**os.environ, "CIRCUIT_CATALOG_TORCH_THREADS": "1"}, timeout=900)
    return where / "demo-catalog.db"


def _stop_detached_neo4j(cwd: Path, env: dict) -> None:
    subprocess.run(["circuit-catalog", "neo4j-server", "--stop"], cwd=cwd, env=env, capture_output=True, timeout=180)


def test_the_readme_tour_works_as_written_and_says_what_it_prints(tmp_path, demo_db):
    cwd, env = sandbox(tmp_path / "tour", demo_db)
    block = next(b for b in blocks() if (b.page, b.heading) == TOUR and b.lang == "bash")
    lines = commands(block.text)
    script = "set -euo pipefail\n" + "".join(f"echo '@@@ {k}'\n{line}\n" for k, line in enumerate(lines))
    try:
        done = subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    finally:
        _stop_detached_neo4j(cwd, env)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    out = dict(zip(range(len(lines)), done.stdout.split("@@@ ")[1:], strict=True))
    said = {line.split()[1] if line.startswith("circuit-catalog") else line.split()[0]: out[k].split("\n", 1)[1]
            for k, line in enumerate(lines)}
    assert lines[0] == "source .venv/bin/activate"

    # the prose: fed most by R2.189, read through heads 2 and 3 on 217 prompts, positive, then R2's bias, then
    # (direct) the transcoder features T0.158 and T1.394
    upstream = json.loads(subprocess.run(["circuit-catalog", "upstream", "A2.186", "--store", "sqlite:///demo-catalog.db",
                                          "--top", "5", "--json"], cwd=cwd, env=env, capture_output=True, text=True,
                                         check=True).stdout)
    assert [(r["id"], r["edge_kind"]) for r in upstream[:4]] == \
        [("R2.189", "attn_in"), ("R2.BIAS", "attn_in"), ("T0.158", "direct"), ("T1.394", "direct")]
    assert all(r["id"] in said["upstream"] for r in upstream)
    edge = json.loads(said["edge"])["kinds"][0]
    assert (edge["edge_kind"], set(edge["heads"]), edge["n_prompts"], edge["sign_share"]) == \
        ("attn_in", {"2", "3"}, 217, 1.0)
    assert edge["evidence"] and edge["roles"]

    curls = [k for k, line in enumerate(lines) if line.startswith("curl")]
    rest = json.loads(out[curls[0]].split("\n", 1)[1])
    assert [(r["id"], r["edge_kind"], r["sum"]) for r in rest["items"]] == \
        [(r["id"], r["edge_kind"], r["sum"]) for r in upstream]
    assert out[curls[1]].split("\n", 1)[1].strip() == "200"
    cypher = said["cypher"]
    r2189 = next(r for r in upstream if r["id"] == "R2.189")
    assert "R2.189" in cypher and "attn_in" in cypher and f"{r2189['sum']:.3f}"[:6] in cypher.replace(",", "")

    # the feature page's paragraph: A2.225 fires on "went", reading the sentence's first name through head 2, R2.159
    fires = json.loads(subprocess.run(["circuit-catalog", "feature", "A2.225", "--store", "sqlite:///demo-catalog.db",
                                       "--contexts", "10", "--json"], cwd=cwd, env=env, capture_output=True, text=True,
                                      check=True).stdout)
    assert fires["contexts"] and all(c["token"] == "went" for c in fires["contexts"])
    for c in fires["contexts"]:
        assert (c["source"]["id"], c["source"]["head"]) == ("R2.159", 2)
        assert c["source"]["pos"] == c["start"] + c["tokens"].index("After") + 1  # "After John and Mary went"


def _json(cwd: Path, env: dict, *args: str):
    done = subprocess.run(["circuit-catalog", *args, "--store", "sqlite:///demo-catalog.db", "--json"], cwd=cwd, env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def test_the_readme_circuit_through_the_mlps_is_what_the_demo_catalog_holds(tmp_path, demo_db):
    """README "Through the MLPs": what it found (A0.10, A0.204, A0.222 and EMB -> T0.158 -> T1.394 -> A2.186 at
    "When", heads 2 and 3 at offset 0, positive on every prompt, 216 prompts) and what it did not (a third of
    T1.394's inputs from errors, T0.ERR the largest, and R2.189's too; 17-47% of each layer's inputs on errors)."""
    cwd, env = sandbox(tmp_path / "mlps", demo_db)
    text = (ROOT / "README.md").read_text().split("## Through the MLPs: transcoders", 1)[1].split("\n## ", 1)[0]
    direct = _json(cwd, env, "upstream", "A2.186", "--edge-kind", "direct", "--top", "3")
    assert [r["id"] for r in direct[:2]] == ["T0.158", "T1.394"]
    chain = [("T0.158", "A2.186"), ("T1.394", "A2.186"), ("T0.158", "T1.394")] + \
        [(a, "T0.158") for a in ("A0.10", "A0.204", "A0.222", "EMB")]
    for src, dst in chain:
        (kind,) = _json(cwd, env, "edge", src, dst)["kinds"]
        assert kind["sign_share"] == 1.0 and kind["sum"] > 0 and kind["n_prompts"] in (216, 217), (src, dst)
        assert all(v["src_token"] == v["dst_token"] == "When" for v in kind["evidence"]), (src, dst)
        if dst == "A2.186":
            offsets = [r for r in kind["roles"] if r["role"].startswith("offset")]
            assert set(kind["heads"]) == {"2", "3"} and max(offsets, key=lambda r: r["share"])["role"] == "offset 0"
    assert _json(cwd, env, "edge", "A0.10", "T0.158")["kinds"][0]["n_prompts"] == 216 and "216 prompts" in text
    feeding = _json(cwd, env, "upstream", "T0.158", "--top", "5")
    assert {"A0.10", "A0.204", "A0.222", "EMB"} <= {r["id"] for r in feeding}
    into_t1 = _json(cwd, env, "upstream", "T1.394", "--top", "6")
    assert into_t1[0]["id"] == "T0.ERR" and "T0.158" in {r["id"] for r in into_t1}
    assert 0.3 <= _json(cwd, env, "feature", "T1.394")["inputs"]["errors"] < 0.37  # "a third"
    assert _json(cwd, env, "upstream", "R2.189", "--top", "1")[0]["id"] == "T0.ERR"
    errors = [r["errors"] for r in _json(cwd, env, "completeness", "--run", "demo")["layers"] if r["errors"]]
    assert round(100 * min(errors)) == 17 and round(100 * max(errors)) == 47 and "17-47%" in text
    for name in ("A0.10", "A0.204", "A0.222", "T0.158", "T1.394", "A2.186", "T0.ERR", "R2.189"):
        assert f"`{name}`" in text


def test_every_other_command_in_the_docs_runs(tmp_path, demo_db):
    cwd, env = sandbox(tmp_path / "docs", demo_db)
    ran: list[str] = []
    try:
        for b in blocks():
            if b.lang != "bash" or (b.page, b.heading) in CLAIMED or (b.page, b.heading) == TOUR:
                continue
            for line in commands(b.text):
                w = words(line)
                if w[0] != "circuit-catalog" or is_synopsis(line):
                    continue  # checked by test_synopses_name_only_options_the_commands_have
                if w[1] in SERVERS:
                    _serve_once(line, cwd, env, SERVERS[w[1]])
                else:
                    done = subprocess.run(line, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
                    assert done.returncode == 0, (b.page, line, done.stdout[-2000:], done.stderr[-2000:])
                    assert "Traceback" not in done.stderr, (b.page, line, done.stderr[-2000:])
                ran.append(f"{b.page}: {line}")
    finally:
        _stop_detached_neo4j(cwd, env)
    assert len(ran) >= 20, ran
    for page in ("docs/catalog.md", "docs/rdfa.md", "docs/evaluation.md", "docs/ingest.md"):
        assert any(r.startswith(page) for r in ran), page


def _serve_once(line: str, cwd: Path, env: dict, port: int) -> None:
    import httpx

    proc = subprocess.Popen(shlex.split(line), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        pytest.fail(f"{line} did not answer on port {port}: {proc.stdout.read() if proc.poll() is not None else ''}")
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"^#+ ", "", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def test_links_between_pages_point_at_pages_and_headings_that_exist():
    anchors = {path: {_slug(line) for line in path.read_text().splitlines() if re.match(r"^#{1,4} ", line)}
               for path in PAGES}
    checked = 0
    for path in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            assert dest.exists(), (str(path.relative_to(ROOT)), target)
            if anchor:
                assert anchor in anchors[dest], (str(path.relative_to(ROOT)), target, sorted(anchors[dest]))
            checked += 1
    assert checked > 20
