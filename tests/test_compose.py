"""docker-compose.yml: the stack docs/catalog.md describes (``docker compose config`` validates it where
Docker is installed; here its content is checked)."""

from pathlib import Path

import yaml

COMPOSE = yaml.safe_load((Path(__file__).resolve().parent.parent / "docker-compose.yml").read_text())


def test_services_and_localhost_ports():
    services = COMPOSE["services"]
    assert set(services) == {"neo4j", "api", "ingest", "neo4j-import"}
    assert services["neo4j"]["image"].startswith("neo4j:5")
    for svc in services.values():
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), port


def test_neo4j_auth_from_env_with_data_volume_and_healthcheck():
    neo = COMPOSE["services"]["neo4j"]
    assert "${NEO4J_PASSWORD" in neo["environment"]["NEO4J_AUTH"]
    assert any(v.startswith("neo4j-data:/data") for v in neo["volumes"])
    assert "cypher-shell" in " ".join(neo["healthcheck"]["test"])
    assert COMPOSE["services"]["api"]["depends_on"]["neo4j"]["condition"] == "service_healthy"


def test_the_importer_service_builds_the_neo4j_services_database_from_the_ingest_workers_files():
    """A first load (docs/catalog.md): `ingest --store neo4j-import:/import` in the worker writes the files and
    their import.sh into a folder the importer service mounts too, which runs that script with the image's
    neo4j-admin into the neo4j service's own data volume, only when asked for (a profile)."""
    services = COMPOSE["services"]
    importer, worker, neo = services["neo4j-import"], services["ingest"], services["neo4j"]
    assert importer["image"] == neo["image"] and importer["profiles"] == ["import"]
    assert importer["command"] == ["sh", "/import/import.sh"]
    data = next(v for v in neo["volumes"] if v.endswith(":/data"))
    assert data in importer["volumes"]
    assert "./import:/import" in importer["volumes"] and "./import:/import" in worker["volumes"]


def test_ingest_worker_reserves_a_gpu():
    devices = COMPOSE["services"]["ingest"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


def test_the_image_copies_every_package_the_project_installs():
    """The Dockerfile's COPY lines cover pyproject's packages (the CLI lives in cli/, its own package)."""
    import re
    import tomllib

    root = Path(__file__).resolve().parent.parent
    include = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.rstrip("*") for p in include}
    copied = set(re.findall(r"^COPY (\w+) \./\1$", (root / "Dockerfile").read_text(), re.M))
    assert packages == {"catalog", "ingest", "api", "cli"} and packages <= copied


def test_neo4j_ends_a_runaway_query_or_a_full_heap_and_restarts():
    """The stack's share of the Cypher bound (docs/catalog.md): the launcher's jar mounted as a plugin that
    registers the runaway watchdog as a Neo4j extension, the JVM flags, and a restart policy."""
    import zipfile

    from cli.neo4j_server import MODULE, build

    neo = COMPOSE["services"]["neo4j"]
    mounts = [v.split(":") for v in neo["volumes"]]
    jar = next(Path(__file__).resolve().parent.parent / src for src, dst, *_ in mounts if dst.startswith("/plugins/"))
    build()
    assert jar == MODULE / "target" / "neo4j-server-0.1.0.jar" and jar.exists()
    with zipfile.ZipFile(jar) as z:
        services = z.read("META-INF/services/org.neo4j.kernel.extension.ExtensionFactory").decode().split()
        assert services == ["circuitcatalog.RunawayWatchdog"] and "circuitcatalog/RunawayWatchdog.class" in z.namelist()
    flags = neo["environment"]["NEO4J_server_jvm_additional"].split()
    assert "-XX:+ExitOnOutOfMemoryError" in flags and "-Dcircuitcatalog.runawayGraceSeconds=10" in flags
    assert neo["restart"] == "unless-stopped"
