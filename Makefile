# The two commands of the README:
#   make run   installs everything and runs the node
#   make test  installs everything and runs the whole test suite
# Both work on a fresh Debian 12 / Ubuntu / Raspberry Pi OS machine, as root (CI) or as a user
# who has installed the Debian packages that scripts/system-deps.sh names.

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: run test fresh check lint typecheck imports unit integration tor clients bench clean

$(STAMP): pyproject.toml
	@scripts/system-deps.sh run
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $@

run: $(STAMP)
	$(BIN)/onionpost init --if-missing
	$(BIN)/onionpost run

test: $(STAMP)
	@scripts/system-deps.sh test
	$(MAKE) --no-print-directory check
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=25 tests

# What CI runs: `make test` in clean Debian 12 and 13 roots (as root; several minutes each).
fresh:
	bash .ci/run

check: lint typecheck imports

lint: $(STAMP)
	$(BIN)/ruff check onionpost gateway tests bench
	$(BIN)/ruff format --check onionpost gateway tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

imports: $(STAMP)
	$(BIN)/lint-imports

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

integration: $(STAMP)
	$(BIN)/python -m pytest -q tests/integration

tor: $(STAMP)
	$(BIN)/python -m pytest -q tests/tor

clients: $(STAMP)
	@scripts/system-deps.sh test
	$(BIN)/python -m pytest -q tests/clients

bench: $(STAMP)
	-@scripts/system-deps.sh bench
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
