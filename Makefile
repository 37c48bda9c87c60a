# The two commands of the README: `make demo` (the whole bootstrap against the local sandbox)
# and `make test` (the whole suite). Each installs what it needs on a fresh machine.
SHELL := /bin/bash
export PATH := $(HOME)/.local/bin:$(PATH)
export UV_LINK_MODE := copy
# The Prefect servers started here (the CLI's ephemeral one, the bench's) send no telemetry.
export PREFECT_SERVER_ANALYTICS_ENABLED := false
RUN := uv run --frozen

.PHONY: setup system lint test demo bench clean

setup:
	@command -v uv >/dev/null || python3 -m pip install --quiet uv
	uv sync --frozen

# Debian packages, the services venv, the guest image and the guests' wheels (root; cached).
system: setup
	$(RUN) sails-sandbox install

lint: setup
	$(RUN) ruff check .
	$(RUN) ruff format --check .
	$(RUN) mypy

test: system lint
	$(RUN) pytest

demo: system
	$(RUN) sails-sandbox up
	eval "$$($(RUN) sails-sandbox env)" && \
	  $(RUN) sails-bootstrap blocks register && \
	  $(RUN) sails-sandbox blocks --config examples/sandbox.yaml && \
	  $(RUN) sails-bootstrap up --config examples/sandbox.yaml && \
	  $(RUN) sails-bootstrap backup --config examples/sandbox.yaml && \
	  $(RUN) sails-bootstrap ui --config examples/sandbox.yaml --out ui-screenshots

bench: system
	$(RUN) python -m bench
	$(RUN) python -m bench.load

clean:
	-$(RUN) sails-sandbox down
