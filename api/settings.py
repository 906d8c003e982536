"""API settings (pydantic-settings): environment variables CIRCUIT_CATALOG_*, or arguments."""

from __future__ import annotations

from pydantic import field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CIRCUIT_CATALOG_", extra="ignore")

    store: str = "sqlite:///catalog.db"
    host: str = "127.0.0.1"  # never 0.0.0.0 unless asked for
    port: int = 8000
    max_limit: int = 500  # cap on every list an endpoint returns
    cypher_row_cap: int = 1000
    cypher_timeout_s: float = 5.0
    evidence_limit: int = 50
    check_responses: bool = False  # validate each hot answer against its response model (the tests turn it on)
    # gc.freeze() at start-up (api.app); `serve` turns it on. Off for a process that builds many apps, as
    # the tests do: frozen objects are never collected, so each app's garbage would stay
    freeze_gc: bool = False
    warm_patterns: bool = True  # mine the default composition patterns in the background at start-up ...
    warm_patterns_max_edges: int = 200_000  # ... on catalogs this small (the demo's has 72k edges)
    # no write settings: the API has no endpoint that writes (extra="ignore" drops unknown variables)

    @field_validator("max_limit", "cypher_row_cap", "evidence_limit")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("max_limit, cypher_row_cap and evidence_limit must be at least 1")
        return v
