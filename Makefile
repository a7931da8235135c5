# `make run` and `make test` both set everything up first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup browser run test bench clean

setup: $(STAMP)

# torch first, pinned to the local CPU wheel, so no later requirement pulls CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

# Debian's chromium for the real-browser UI test (Playwright drives it; no browser download).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo -n)
browser:
	@test -x /usr/bin/chromium || { command -v apt-get >/dev/null && \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium could not be installed: the browser test will be skipped"

# The sample documents go into the default knowledge base once; then the chat UI starts.
run: setup
	@$(BIN)/moerag docs list --json 2>/dev/null | grep -q '"id"' || $(BIN)/moerag ingest docs/*.md
	$(BIN)/moerag ui --port 8501

test: setup browser
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
