"""Catalog stores: the embedded SQLite default and Neo4j, behind one protocol (base.Store)."""

from catalog.stores.base import StoreError, StoreUnavailable, open_store

__all__ = ["open_store", "StoreError", "StoreUnavailable"]
