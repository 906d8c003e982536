"""circuit-catalog's torch-free core: node ids, schema, stores, queries and mining."""

__version__ = "0.1.0"
