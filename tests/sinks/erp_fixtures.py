"""Tryton fixtures: one real ``trytond`` server per test session, over JSON-RPC.

A module of fixtures rather than ``tests/sinks/conftest.py`` (that one holds the
PostgreSQL fixtures): test modules that need Tryton import ``tryton_server`` from
here, which makes pytest register it for that module.

The database is copied from the template under ``.revline/tryton-template/``
(built once, about 30 s; later sessions copy it in well under a second) into the
session's temp dir, and the server listens on a free 127.0.0.1 port. Without
Tryton installed the tests fail, never skip: ``pip install -e '.[dev]'`` has it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from revline.sinks.erp import (
    TrytonErp,
    TrytonServer,
    prepare_database,
    start_server,
    tryton_available,
)

# Shared with `python -m revline.sinks.erp prepare`, so the template is built once per machine.
STATE_DIR = Path(__file__).resolve().parents[2] / ".revline"


@pytest.fixture(scope="session")
def tryton_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrytonServer]:
    if not tryton_available():
        pytest.fail(
            "Tryton is not installed: pip install -e '.[dev]' (or '.[erp]') installs trytond, "
            "trytond-sale, trytond-account-invoice and proteus"
        )
    started = time.monotonic()
    database = prepare_database(tmp_path_factory.mktemp("tryton"), state_dir=STATE_DIR)
    prepared = time.monotonic()
    server = start_server(database)
    print(
        f"\ntrytond {server.url}: database ready in {prepared - started:.1f}s, "
        f"server answering in {time.monotonic() - prepared:.1f}s"
    )
    try:
        yield server
    finally:
        server.stop()


def tryton_adapter(server: TrytonServer, timeout: float = 30.0) -> TrytonErp:
    db = server.database
    return TrytonErp(server.url, db.name, db.user, db.password, timeout=timeout)
