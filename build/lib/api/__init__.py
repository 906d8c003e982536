"""The REST API over a catalog (FastAPI). Never imports torch, transformer_lens or sae_lens."""
