"""A real Schema Registry for the tests: one local Apicurio Registry per session.

Started like the test broker (``revline.tools.registry_server.LocalRegistry``: Maven-fetched
distribution, system ``java`` 17) under ``.revline/test-registry-<pid>``, with basic auth
on. Skipped only when ``java`` or ``mvn`` is missing (CI installs both); any other
failure to start fails the tests.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from revline.tools.registry_server import LocalRegistry
from tests._procs import owner_alive

REPO = Path(__file__).resolve().parent.parent
STATE_DIR = REPO / ".revline"
# Shared with `python -m revline.tools.registry_server` and .ci/run, so a session never
# re-runs Maven.
SHARED_REGISTRY_JARS = STATE_DIR / "registry" / "lib"


def _reap_stale_test_registries() -> None:
    """Stop registries left by test sessions that died before their teardown ran."""
    for home in STATE_DIR.glob("test-registry-*"):
        try:
            owner = int(home.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if owner_alive(owner):
            continue
        LocalRegistry(home, jars_dir=SHARED_REGISTRY_JARS).stop(timeout=10)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def local_registry() -> Iterator[LocalRegistry]:
    missing = [tool for tool in ("java", "mvn") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"a local Schema Registry needs {' and '.join(missing)} on PATH "
                    "(apt-get install -y openjdk-17-jre-headless maven)")
    import os

    _reap_stale_test_registries()
    home = STATE_DIR / f"test-registry-{os.getpid()}"
    registry = LocalRegistry(home, jars_dir=SHARED_REGISTRY_JARS, auth=True)
    failure = None
    try:
        registry.start(timeout=120, fresh=True)
    except Exception as exc:  # start() already stopped the JVM; home stays for a post-mortem
        failure = str(exc)
    if failure is not None:
        pytest.fail(f"the local Schema Registry (Apicurio) failed to start:\n{failure}",
                    pytrace=False)
    try:
        yield registry
    finally:
        registry.stop()
        assert registry.status() is None, f"test registry in {home} did not stop"
        shutil.rmtree(home, ignore_errors=True)
