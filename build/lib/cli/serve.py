"""Commands that serve: the API and pages, and a local Neo4j for development."""

from __future__ import annotations

from catalog.stores.base import DEFAULT_URL
from cli.common import SERVE, Port, StoreOpt, app, friendly


@app.command(rich_help_panel=SERVE)
@friendly
def serve(store: StoreOpt = DEFAULT_URL, host: str = "127.0.0.1", port: Port = 8000):
    """Serve the browser pages (/), the REST API and its docs (/docs) over a catalog. Binds to 127.0.0.1 unless told otherwise."""
    import uvicorn

    from api.app import create_app
    from api.settings import Settings

    settings = Settings(store=store, host=host, port=port)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port)


@app.command("neo4j-server", rich_help_panel=SERVE)
@friendly
def neo4j_server(home: str = ".neo4j/data", port: Port = 7687, page_cache: str = "256m"):
    """Build (first time, Maven) and run Neo4j Community with Bolt on 127.0.0.1 for local use."""
    from cli.neo4j_server import run_foreground

    run_foreground(home, port, page_cache)


