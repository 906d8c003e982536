"""Commands that serve: the API and pages, and a local Neo4j for development."""

from __future__ import annotations

from typing import Annotated

import typer

from catalog.stores.base import DEFAULT_URL
from cli.common import SERVE, Port, StoreOpt, app, bounded, friendly


@app.command(rich_help_panel=SERVE)
@friendly
def serve(store: StoreOpt = DEFAULT_URL, host: str = "127.0.0.1", port: Port = 8000,
          workers: Annotated[int, bounded(1, 64, "server processes (one Python process uses one core at most)")] = 1,
          access_log: Annotated[bool, typer.Option(help="log every request (costs ~5-10% of throughput)")] = True):
    """Serve the browser pages (/), the REST API and its docs (/docs) over a catalog. Binds to 127.0.0.1 unless told otherwise."""
    import os

    import uvicorn

    from api.app import create_app
    from api.settings import Settings

    settings = Settings(store=store, host=host, port=port, freeze_gc=True)
    if workers == 1:
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port, access_log=access_log)
        return
    # each worker process builds its own app (and store connection) from the environment
    os.environ.update(CIRCUIT_CATALOG_STORE=settings.store, CIRCUIT_CATALOG_HOST=settings.host,
                      CIRCUIT_CATALOG_PORT=str(settings.port), CIRCUIT_CATALOG_FREEZE_GC="1")
    uvicorn.run("api.app:create_app", factory=True, host=settings.host, port=settings.port, workers=workers,
                access_log=access_log)


@app.command("neo4j-server", rich_help_panel=SERVE)
@friendly
def neo4j_server(home: str = ".neo4j/data", port: Port = 7687, page_cache: str = "256m",
                 detach: Annotated[bool, typer.Option(help="start it in the background, return once it answers")] = False,
                 stop: Annotated[bool, typer.Option(help="stop the server --detach started in this --home")] = False,
                 import_: Annotated[str | None, typer.Option(
                     "--import", help="first build a new database in --home from the files a publish into "
                     "neo4j-import:FOLDER wrote, with Neo4j's offline importer")] = None):
    """Build (first time, Maven) and run Neo4j Community with Bolt on 127.0.0.1 for local use."""
    from cli import neo4j_server as server

    if import_ and not stop:
        print(f"imported {import_} into {home}: {server.import_files(home, import_)}", flush=True)
    if stop:
        print(server.stop_detached(home))
    elif detach:
        print(f"Neo4j Community on {server.start_detached(home, port, page_cache)} (data in {home}); "
              f"`circuit-catalog neo4j-server --stop --home {home}` stops it")
    else:
        server.run_foreground(home, port, page_cache)


