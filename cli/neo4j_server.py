"""Build and run the repo's Neo4j Community launcher (tools/neo4j-server) — for tests and local use.

Maven fetches Neo4j from Maven Central once (~125 MB into ~/.m2 and target/lib); the server then
runs embedded with Bolt on 127.0.0.1, auth disabled (local use only).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MODULE = Path(__file__).resolve().parent.parent / "tools" / "neo4j-server"
JVM_FLAGS = ["--add-opens=java.base/java.nio=ALL-UNNAMED", "--add-opens=java.base/java.io=ALL-UNNAMED",
             "--add-opens=java.base/sun.nio.ch=ALL-UNNAMED", "--enable-native-access=ALL-UNNAMED",
             "-Dio.netty.tryReflectionSetAccessible=true"]


def build() -> None:
    sources = sorted((MODULE / "src" / "main" / "java" / "circuitcatalog").glob("*.java"))
    classes = [MODULE / "target" / "classes" / "circuitcatalog" / f"{s.stem}.class" for s in sources]
    if (MODULE / "target" / "lib").is_dir() and all(
            c.exists() and c.stat().st_mtime >= s.stat().st_mtime for s, c in zip(sources, classes)):
        return
    if shutil.which("mvn") is None:
        raise RuntimeError("Maven (mvn) is needed to build the Neo4j launcher: apt-get install maven")
    subprocess.run(["mvn", "-q", "-B", "package", "-DskipTests"], cwd=MODULE, check=True)


def command(home: str, port: int, page_cache: str = "256m", heap: str = "1g", runaway_grace_s: int = 10) -> list[str]:
    """The supervised server (tools/neo4j-server: Supervisor restarts Neo4jServer after an out-of-heap exit
    or a runaway query that outlived its timeout by ``runaway_grace_s``; docs/catalog.md)."""
    cp = f"{MODULE / 'target' / 'classes'}{os.pathsep}{MODULE / 'target' / 'lib' / '*'}"
    server = ["java", f"-Xmx{heap}", "-XX:+ExitOnOutOfMemoryError", *JVM_FLAGS, "-Dcircuitcatalog.supervised=true",
              f"-Dcircuitcatalog.runawayGraceSeconds={runaway_grace_s}", "-cp", cp, "circuitcatalog.Neo4jServer",
              home, str(port), page_cache]
    return ["java", "-Xmx32m", "-XX:+UseSerialGC", "-cp", str(MODULE / "target" / "classes"), "circuitcatalog.Supervisor",
            "--", *server]


def start(home: str, port: int, page_cache: str = "256m", timeout_s: float = 120, heap: str = "1g",
          runaway_grace_s: int = 10, new_session: bool = False) -> subprocess.Popen:
    """Start in the background; return once it prints READY (raise with its log otherwise).
    ``new_session``: the server outlives this process and its terminal (``neo4j-server --detach``)."""
    build()
    Path(home).mkdir(parents=True, exist_ok=True)
    log = open(Path(home) / "server.log", "w")
    proc = subprocess.Popen(command(home, port, page_cache, heap, runaway_grace_s), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=new_session)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if "READY" in (Path(home) / "server.log").read_text():
            return proc
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"Neo4j did not start on port {port}:\n{(Path(home) / 'server.log').read_text()[-3000:]}")


def start_detached(home: str, port: int, page_cache: str) -> str:
    """``neo4j-server --detach``: start, wait until it answers, leave it running; its pid in HOME/server.pid."""
    pid_file = Path(home) / "server.pid"
    if pid_file.exists() and _alive(int(pid_file.read_text())):
        raise ValueError(f"a server started with --detach is already running from {home} "
                           f"(pid {pid_file.read_text().strip()}); --stop stops it")
    try:
        proc = start(home, port, page_cache, new_session=True)
    except RuntimeError:
        log = (Path(home) / "server.log").read_text().strip().splitlines() if (Path(home) / "server.log").exists() else []
        cause = next((line for line in reversed(log) if "Exception" in line or "rror" in line), log[-1] if log else "")
        raise ValueError(f"Neo4j did not start on port {port} ({cause.strip()[:300]}); its log is "
                         f"{Path(home) / 'server.log'}") from None
    pid_file.write_text(str(proc.pid))
    return f"bolt://127.0.0.1:{port}"


def stop_detached(home: str, timeout_s: float = 120) -> str:
    """``neo4j-server --stop``: SIGTERM the server started from ``home`` and wait for its clean shutdown."""
    import signal

    pid_file = Path(home) / "server.pid"
    if not pid_file.exists() or not _alive(pid := int(pid_file.read_text())):
        pid_file.unlink(missing_ok=True)
        return f"no server started with --detach is running from {home}"
    os.kill(pid, signal.SIGTERM)
    deadline = time.time() + timeout_s
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.2)
    if _alive(pid):
        raise RuntimeError(f"the server (pid {pid}) did not stop within {timeout_s:g} s")
    pid_file.unlink()
    return f"stopped the server of {home}"


def import_files(home: str, folder: str, heap: str = "1g") -> str:
    """``neo4j-server --import FOLDER``: build a new database in ``home`` from the import files of a
    ``neo4j-import:FOLDER`` publish, with Neo4j's offline importer (``neo4j-admin database import full``),
    before any server runs on it. Refuses a home that holds a database already. Returns the importer's summary."""
    from catalog.stores.neo4j_import import Neo4jImportFiles

    if (Path(home) / "data" / "databases" / "neo4j").exists():
        raise ValueError(f"{home} holds a database already: Neo4j's importer only builds a new one (choose an empty "
                         "--home, or publish into the running server instead)")
    pid_file = Path(home) / "server.pid"
    if pid_file.exists() and _alive(int(pid_file.read_text())):
        raise ValueError(f"a server is running from {home}; the importer needs it stopped")
    arguments = Neo4jImportFiles(folder, None).import_arguments()
    build()
    conf = Path(home) / "conf"
    conf.mkdir(parents=True, exist_ok=True)
    (conf / "neo4j.conf").touch()
    cp = f"{MODULE / 'target' / 'lib' / '*'}"
    done = subprocess.run(["java", f"-Xmx{heap}", *JVM_FLAGS, "-cp", cp, "org.neo4j.cli.AdminTool", "database",
                           "import", "full", *arguments], cwd=folder, capture_output=True, text=True,
                          env={**os.environ, "NEO4J_HOME": str(Path(home).resolve()), "NEO4J_CONF": str(conf.resolve())})
    if done.returncode != 0:
        shutil.rmtree(Path(home) / "data", ignore_errors=True)  # a failed import leaves a partial store
        lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        cause = next((line for line in lines if "Exception" in line or "rror" in line), lines[-1] if lines else "")
        raise ValueError(f"Neo4j's importer failed on {folder}: {cause.strip()[:400]}")
    summary = done.stdout[done.stdout.find("IMPORT DONE"):].split("Peak memory")[0]
    return " ".join(summary.split())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def run_foreground(home: str, port: int, page_cache: str) -> None:
    build()
    Path(home).mkdir(parents=True, exist_ok=True)
    print(f"Neo4j Community on bolt://127.0.0.1:{port} (data in {home}); Ctrl-C stops it", flush=True)
    os.execvp("java", command(home, port, page_cache))


def start_on_free_port(home: str, page_cache: str = "256m", heap: str = "1g",
                       runaway_grace_s: int = 10) -> tuple[subprocess.Popen, str]:
    """Start on a free loopback port; returns (process, bolt:// URL): one server needs no routing, and
    the routing driver (neo4j://) costs every query ~0.25 ms of Python CPU (measured in-process)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return (start(home, port, page_cache=page_cache, heap=heap, runaway_grace_s=runaway_grace_s),
            f"bolt://127.0.0.1:{port}")


@contextmanager
def running_on_free_port(home: str, page_cache: str = "256m", heap: str = "1g") -> Iterator[str]:
    """A server for the length of a ``with`` block (benchmarks): yields its bolt:// URL, stops it after."""
    proc, url = start_on_free_port(home, page_cache=page_cache, heap=heap)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)
