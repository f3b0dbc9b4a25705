"""Sink fixtures: one real PostgreSQL server per test session, a fresh database per test.

Where PostgreSQL comes from, in order:
  1. ``REVLINE_TEST_POSTGRES_DSN`` (an existing server; its role needs CREATEDB;
     nothing is started or stopped);
  2. a throwaway cluster from the installed server binaries (Debian's
     ``postgresql`` package): ``initdb`` into a temp dir, ``pg_ctl start`` on a free
     127.0.0.1 port with trust auth and no unix socket, stopped and deleted at the
     end of the session. PostgreSQL refuses to run as root, so as root the cluster
     runs as the ``postgres`` user (or ``revline-ci``, created if neither exists).
Without either the PostgreSQL tests fail, never skip.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa

from revline.sinks.ledger import normalize_url
from tests._procs import owner_alive

PG_ENV = "REVLINE_TEST_POSTGRES_DSN"
PG_USER = "revline"
TMP_PREFIX = "revline-pg-"
INSTALL_HINT = (
    "no PostgreSQL server binaries (initdb, pg_ctl, postgres) found: install Debian's "
    "`postgresql` package (apt-get install postgresql) or set "
    f"{PG_ENV}=postgresql://user@host:port/db to use a running server"
)


@dataclass(frozen=True)
class PostgresServer:
    admin_url: sa.URL  # a database to run CREATE/DROP DATABASE from
    source: str  # "env" | "local"


def find_pg_bin() -> Path | None:
    """A directory whose initdb, pg_ctl and postgres actually run (newest version first)."""
    candidates: list[Path] = []
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            candidates.append(Path(out.stdout.strip()))

    def version(p: Path) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", p.parent.name))

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl:
        candidates.append(Path(pg_ctl).resolve().parent)
    for d in candidates:
        tools = [d / name for name in ("initdb", "pg_ctl", "postgres")]
        if not all(t.is_file() and os.access(t, os.X_OK) for t in tools):
            continue
        ok = subprocess.run([str(d / "postgres"), "--version"], capture_output=True)
        if ok.returncode == 0:
            return d
    return None


def _run_as() -> tuple[list[str], str | None]:
    """Command prefix that runs as a non-root cluster owner, and that owner."""
    if os.geteuid() != 0:
        return [], None
    for owner in ("postgres", "revline-ci"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(owner)
            return ["runuser", "-u", owner, "--"], owner
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "revline-ci"],
        check=True,
    )
    return ["runuser", "-u", "revline-ci", "--"], "revline-ci"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _reap_stale_clusters(pg_bin: Path, prefix: list[str]) -> None:
    """Stop and delete clusters left by test sessions that died before their teardown."""
    for home in Path(tempfile.gettempdir()).glob(f"{TMP_PREFIX}*-*"):
        try:
            owner_pid = int(home.name[len(TMP_PREFIX) :].split("-", 1)[0])
        except ValueError:
            continue
        if owner_alive(owner_pid):
            continue
        if (home / "data" / "postmaster.pid").exists():
            subprocess.run(
                [
                    *prefix,
                    str(pg_bin / "pg_ctl"),
                    "stop",
                    "-D",
                    str(home / "data"),
                    "-m",
                    "immediate",
                ],
                capture_output=True,
            )
        shutil.rmtree(home, ignore_errors=True)


@contextlib.contextmanager
def local_postgres() -> Iterator[sa.URL]:
    pg_bin = find_pg_bin()
    if pg_bin is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    prefix, owner = _run_as()
    _reap_stale_clusters(pg_bin, prefix)
    home = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-"))
    if owner is not None:
        shutil.chown(home, user=owner)
    data, log = home / "data", home / "server.log"
    try:
        init = subprocess.run(
            [*prefix, str(pg_bin / "initdb"), "-D", str(data), "-U", PG_USER, "--auth=trust",
             "-E", "UTF8", "--locale=C", "--no-sync"],
            capture_output=True, text=True,
        )  # fmt: skip
        if init.returncode != 0:
            pytest.fail(f"initdb failed:\n{init.stdout}\n{init.stderr}", pytrace=False)
        port = 0
        for _ in range(3):  # the free port may be taken between probing and binding
            port = _free_port()
            started = subprocess.run(
                [*prefix, str(pg_bin / "pg_ctl"), "start", "-w", "-t", "60", "-D", str(data),
                 "-l", str(log), "-o",
                 f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories=''"],
                capture_output=True, text=True,
            )  # fmt: skip
            if started.returncode == 0:
                break
        else:
            tail = log.read_text()[-3000:] if log.exists() else ""
            pytest.fail(f"pg_ctl start failed:\n{started.stderr}\n{tail}", pytrace=False)
        try:
            yield sa.URL.create(
                "postgresql+psycopg", username=PG_USER, host="127.0.0.1", port=port,
                database="postgres",
            )  # fmt: skip
        finally:
            subprocess.run(
                [*prefix, str(pg_bin / "pg_ctl"), "stop", "-D", str(data), "-m", "fast", "-w"],
                capture_output=True,
            )
    finally:
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    dsn = os.environ.get(PG_ENV)
    if dsn:
        yield PostgresServer(sa.make_url(normalize_url(dsn)), "env")
        return
    with local_postgres() as url:
        yield PostgresServer(url, "local")


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """URL of a database created for this test alone, dropped after it."""
    name = f"revline_t_{uuid.uuid4().hex[:16]}"
    admin = sa.create_engine(postgres_server.admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        yield postgres_server.admin_url.set(database=name).render_as_string(hide_password=False)
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.dispose()
