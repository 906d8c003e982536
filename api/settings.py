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
    warm_patterns: bool = True  # mine the default composition patterns in the background at start-up
    write_token: str | None = None  # endpoints that write or trigger work stay off while this is unset

    @field_validator("write_token")
    @classmethod
    def _strong_token(cls, v: str | None) -> str | None:
        if v is not None and len(v) < 16:
            raise ValueError("write_token must be at least 16 characters (or unset, which disables writes)")
        return v

    @field_validator("max_limit", "cypher_row_cap")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("limits must be positive")
        return v
