"""Ingest: model and SAE loading, RDFA attribution, corpora and batch jobs. The only torch user."""
