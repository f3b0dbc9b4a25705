# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: install demo test lint broker-start broker-stop bench clean

$(BIN)/revline: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
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

broker-start: install
	$(BIN)/revline broker start

broker-stop: install
	$(BIN)/revline broker stop

clean:
	-$(BIN)/revline broker stop
	rm -rf .revline .pytest_cache .mypy_cache .ruff_cache
