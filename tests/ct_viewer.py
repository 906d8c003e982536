"""circuit-tracer's own graph viewer and graph model, fetched once for the export tests.

``pip download --no-deps circuit-tracer==0.5.0`` brings the wheel: its ``frontend/assets`` (the viewer
that ``circuit_tracer.frontend.local_server`` serves) and ``frontend/graph_models.py`` (pydantic only,
loaded from the wheel without importing circuit_tracer, whose ``__init__`` wants torch and a pinned
transformers). The viewer's index.html loads d3 and the d3-jetpack helpers from transformer-circuits.pub
and dagre and pako from unpkg: here the same libraries come from npm (``d3-jetpack``'s build bundles
d3 v7 with the helpers; the page's own ``jetpack_2024-07-20.js`` is not published anywhere a test can
fetch), and the live-reload client is left out. Everything else is the wheel's files, unchanged.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType

from hub_fixture import CACHE, npm_files

CIRCUIT_TRACER = ("circuit-tracer", "0.5.0")
NPM = {"d3-jetpack": ("2.3.0", "build/d3v7+jetpack.js"), "dagre": ("0.8.5", "dist/dagre.min.js"),
       "pako": ("2.1.0", "dist/pako.min.js")}
REMOTE_SCRIPTS = {
    "https://transformer-circuits.pub/2025/attribution-graphs/static_js/lib/hotserver-client-ws.js": None,
    "https://transformer-circuits.pub/2025/attribution-graphs/static_js/lib/d3.js": "vendor/d3v7+jetpack.js",
    "https://transformer-circuits.pub/2025/attribution-graphs/static_js/lib/jetpack_2024-07-20.js":
        "vendor/jetpack-2024-shim.js",
    "https://transformer-circuits.pub/2025/attribution-graphs/static_js/lib/npy_v0.js": None,
    "https://unpkg.com/dagre@0.8.5/dist/dagre.min.js": "vendor/dagre.min.js",
    "https://unpkg.com/pako@2.1.0/dist/pako.min.js": "vendor/pako.min.js",
}


def wheel() -> Path:
    """circuit-tracer's wheel, downloaded from PyPI once (pip checks PyPI's hash)."""
    name, version = CIRCUIT_TRACER
    folder = CACHE / f"{name}-{version}"
    found = sorted(folder.glob("circuit_tracer-*.whl"))
    if not found:
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                        f"{name}=={version}", "-d", str(folder)], check=True)
        found = sorted(folder.glob("circuit_tracer-*.whl"))
    return found[0]


def graph_models() -> ModuleType:
    """``circuit_tracer.frontend.graph_models`` from the wheel, as a module of its own."""
    with zipfile.ZipFile(wheel()) as z:
        source = z.read("circuit_tracer/frontend/graph_models.py")
    target = CACHE / f"{CIRCUIT_TRACER[0]}-{CIRCUIT_TRACER[1]}" / "graph_models.py"
    target.write_bytes(source)
    spec = importlib.util.spec_from_file_location("circuit_tracer_graph_models", target)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


JETPACK_LAST_LINE = b"selection.prototype.prop = selection.prototype.property;"
# d3-jetpack 2.3.0's d3v7 bundle holds two copies of d3-selection and d3-transition and adds its methods
# to the copies d3.select does not use; this line, appended to its own, adds them to the exported ones.
JETPACK_EXPOSE = (b"\n  for (const [to, from] of [[selection$1, selection], [transition$1, transition]]) for (const k of "
                  b"['translate', 'append', 'insert', 'parent', 'selectAppend', 'tspans', 'appendMany', 'at', 'st', "
                  b"'prop']) if (Object.hasOwn(from.prototype, k)) to.prototype[k] = from.prototype[k];\n")


# What the viewer calls of its own jetpack build that npm's d3-jetpack 2.3.0 lacks, written from how the
# viewer uses it: c.drawAxis(svg) draws c's x and y axes into svg (d3-jetpack has d3.drawAxis(c)).
JETPACK_2024_SHIM = """
(function () {
  var conventions = d3.conventions
  d3.conventions = function (c) {
    c = conventions(c)
    c.drawAxis = function (svg) {
      svg = svg || c.svg
      svg.append('g').attr('class', 'x axis').attr('transform', 'translate(0,' + c.height + ')').call(c.xAxis)
      svg.append('g').attr('class', 'y axis').call(c.yAxis)
    }
    return c
  }
})()
"""


def _expose_jetpack(code: bytes) -> bytes:
    assert code.count(JETPACK_LAST_LINE) == 1 and b"exports.select = select$1;" in code, "d3-jetpack's bundle changed"
    return code.replace(JETPACK_LAST_LINE, JETPACK_LAST_LINE + JETPACK_EXPOSE)


def site(root: Path, graphs: list[dict]) -> Path:
    """A folder that serves the viewer over ``graphs`` the way circuit-tracer's local server does:
    ``data/graph-metadata.json`` lists them and ``graph_data/{slug}.json`` holds each."""
    with zipfile.ZipFile(wheel()) as z:
        prefix = "circuit_tracer/frontend/assets/"
        for member in z.namelist():
            if member.startswith(prefix) and not member.endswith("/"):
                out = root / member[len(prefix):]
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(z.read(member))
    (root / "vendor").mkdir()
    for package, (version, member) in NPM.items():
        code = (npm_files(package, version, [member], "circuit-tracer viewer's libraries") / Path(member).name).read_bytes()
        if package == "d3-jetpack":
            code = _expose_jetpack(code)
        (root / "vendor" / Path(member).name).write_bytes(code)
    (root / "vendor" / "jetpack-2024-shim.js").write_text(JETPACK_2024_SHIM)
    index = (root / "index.html").read_text()
    for url, local in REMOTE_SCRIPTS.items():
        tag = f"<script src='{url}'></script>"
        assert tag in index, f"circuit-tracer's index.html no longer loads {url}"
        index = index.replace(tag, f"<script src='./{local}'></script>" if local else "")
    (root / "index.html").write_text(index)
    (root / "data").mkdir()
    (root / "graph_data").mkdir()
    (root / "data" / "graph-metadata.json").write_text(json.dumps({"graphs": [
        {"slug": g["metadata"]["slug"], "scan": g["metadata"]["scan"], "prompt": g["metadata"]["prompt"]}
        for g in graphs]}))
    for g in graphs:
        (root / "graph_data" / f"{g['metadata']['slug']}.json").write_text(json.dumps(g))
    return root
