# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: install demo test lint lock broker-start broker-stop bench clean

# Installs are reproducible: exact versions from the lock files (see `make lock`).
$(BIN)/revline: pyproject.toml requirements-dev.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements-dev.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $(BIN)/revline

install: $(BIN)/revline

demo: install
	$(BIN)/revline demo

test: install
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

# Re-resolve the locks after changing dependencies in pyproject.toml (needs uv: pip install uv).
lock:
	uv pip compile pyproject.toml --python-version 3.11 --universal -o requirements.lock -q --custom-compile-command "make lock"
	uv pip compile pyproject.toml --extra dev --python-version 3.11 --universal -o requirements-dev.lock -q --custom-compile-command "make lock"

broker-start: install
	$(BIN)/revline broker start

broker-stop: install
	$(BIN)/revline broker stop

clean:
	-$(BIN)/revline broker stop
	rm -rf .revline .pytest_cache .mypy_cache .ruff_cache
