# The two commands of the README: `make repro` (the pipeline) and `make test` (the tests).
# Both install the project into .venv first (once; again when pyproject.toml changes).
SHELL := bash
.SHELLFLAGS := -eo pipefail -c
VENV ?= .venv
export PATH := $(abspath $(VENV))/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: install repro test lint docs gpu bench vega

# uv installs what pip would (the best version on any index, pip's own indexes, links and
# constraints), in a tenth of pip's time, with bytecode compiled as pip does; pip if uv fails.
PIP = $(VENV)/bin/python -m pip --quiet --disable-pip-version-check
PIP_SOURCES_FOR_UV = $(shell python3 -m pip config list 2>/dev/null | python3 -c 'import sys; print(" ".join(dict.fromkeys( \
	f"--{key} {value}" for line in sys.stdin for name, _, values in [line.partition("=")] for key in [name.rpartition(".")[2]] \
	if key in ("index-url", "extra-index-url", "find-links", "constraint") for value in values.strip().strip(chr(39)).split())))')

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	{ { $(PIP) install uv && $(VENV)/bin/python -m uv pip install --quiet --python $(VENV)/bin/python --compile-bytecode \
		--index-strategy unsafe-best-match $(PIP_SOURCES_FOR_UV) -e '.[dev]'; } \
		|| { echo "uv failed: installing with pip"; $(PIP) install -e '.[dev]'; }; } 2>&1 | { grep -v '^WARNING: Location' || true; }
	touch $@

install: $(VENV)/.installed

repro: install
	dvc repro

test: install
	python -m pytest

lint: install
	ruff check .

# The documentation site (mkdocs.yml, docs/) into .site/; a broken link or anchor fails it
docs: install
	mkdocs build --strict --site-dir .site

# On a GPU machine (docs/gpu.md): the gpu profile end to end, and the bench. No install step,
# so a machine that carries its wheels (and has no .venv) runs them with its own python.
gpu:
	python3 -m flows profile gpu
	dvc repro

bench:
	python3 -m flows bench

# Vega, Vega-Lite and vega-embed inlined into the `dvc plots` page, from npm (.dvc/plots/vendor_vega.py)
vega:
	python .dvc/plots/vendor_vega.py
