# The API and ingest image. torch comes from PyPI (CUDA build); the API itself never imports it.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY catalog ./catalog
COPY ingest ./ingest
COPY api ./api
COPY cli ./cli
RUN pip install --no-cache-dir .
ENTRYPOINT ["circuit-catalog"]
