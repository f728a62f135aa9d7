# LabelLoop: `make run` sets up and serves the sample data; `make test` sets up and runs every test.

PYTHON ?= python3
VENV ?= .venv
HOST ?= 127.0.0.1
PORT ?= 8000
SAMPLE_DATA ?= sample-data
STUDIES ?= $(SAMPLE_DATA)/segmentation
SAMPLE_ARGS ?=
CONF ?=
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.labelloop-installed
export PIP_CONSTRAINT := $(abspath constraints.txt)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: run test install sample-data lint benchmarks clean FORCE

install: $(STAMP)

# The stamp holds a hash of the pins, the package metadata and this checkout's path: a reused VENV is
# re-installed only when one of them changes (a new clone re-links its editable install in seconds).
$(STAMP): FORCE
	@want=$$(cat pyproject.toml constraints.txt | sha1sum | cut -c1-16)-$$(echo "$(CURDIR)" | sha1sum | cut -c1-8); \
	if [ "$$(cat $(STAMP) 2>/dev/null)" != "$$want" ]; then \
		set -e; \
		test -x $(BIN)/python || $(PYTHON) -m venv $(VENV); \
		$(BIN)/python -m pip install --quiet --upgrade "pip>=24" wheel "setuptools>=68"; \
		$(BIN)/python -m pip install --quiet -e ".[dev]"; \
		echo "$$want" > $(STAMP); \
	fi

FORCE:

sample-data: $(STAMP)
	$(BIN)/python -m labelloop_app.synthetic --out $(SAMPLE_DATA) $(SAMPLE_ARGS)

# The venv's Python itself, not MONAI Label's `monailabel` script, which runs whatever `python` is first on PATH.
run: sample-data
	$(BIN)/python -m monailabel.main start_server --app apps/labelloop --studies $(STUDIES) --host $(HOST) --port $(PORT) $(CONF)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) $(SAMPLE_DATA)/segmentation $(SAMPLE_DATA)/classification .pytest_cache
