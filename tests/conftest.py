"""Shared fixtures: one real Kafka broker per test session, and fresh topics per test.

Where Kafka comes from, in order:
  1. ``KAFKA_BOOTSTRAP_SERVERS`` (an existing cluster; nothing is started or stopped);
  2. a testcontainers Kafka, if a Docker engine answers;
  3. a ``LocalBroker`` (Maven jars + java) under ``.revline/test-kafka-<pid>``.
If none works the fixture fails loudly: Kafka tests must never be silently skipped.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from revline.tools.broker import LocalBroker
from tests._procs import owner_alive

REPO = Path(__file__).resolve().parent.parent
STATE_DIR = REPO / ".revline"
# Shared with `revline broker start`, so a session never re-runs Maven.
SHARED_JARS = STATE_DIR / "kafka" / "lib"
KAFKA_IMAGE = "confluentinc/cp-kafka:7.7.1"


@dataclass(frozen=True)
class KafkaSession:
    bootstrap: str
    source: str  # "env" | "docker" | "local"
    local: LocalBroker | None


class TopicFactory(Protocol):
    def __call__(
        self, name_hint: str = "t", partitions: int = 3, config: dict[str, str] | None = None
    ) -> str: ...


def _docker_answers() -> bool:
    # Without this shortcut docker-py leaks a socket when the default one is absent.
    if not os.environ.get("DOCKER_HOST") and not Path("/var/run/docker.sock").exists():
        return False
    try:
        import docker

        client = docker.from_env(timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # no socket, no daemon, no permission: all mean "no Docker"
        return False


def _reap_stale_test_brokers() -> None:
    """Stop brokers left by test sessions that died before their teardown ran."""
    for home in STATE_DIR.glob("test-kafka-*"):
        try:
            owner = int(home.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if owner_alive(owner):
            continue
        LocalBroker(home, jars_dir=SHARED_JARS).stop(timeout=10)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def kafka_session() -> Iterator[KafkaSession]:
    env = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    if env:
        yield KafkaSession(env, "env", None)
        return

    if _docker_answers():
        try:
            from testcontainers.community.kafka import KafkaContainer
        except ImportError:  # testcontainers < 4.10 kept it at the top level
            from testcontainers.kafka import KafkaContainer

        with KafkaContainer(KAFKA_IMAGE).with_kraft() as container:
            yield KafkaSession(container.get_bootstrap_server(), "docker", None)
        return

    _reap_stale_test_brokers()
    home = STATE_DIR / f"test-kafka-{os.getpid()}"
    broker = LocalBroker(home, jars_dir=SHARED_JARS)
    failure = None
    try:
        bootstrap = broker.start(timeout=120)
    except Exception as exc:
        # start() already stopped the JVM; `home` stays for a post-mortem and is
        # removed by the next session's _reap_stale_test_brokers().
        failure = str(exc)
    if failure is not None:
        pytest.fail(
            "No Kafka broker for the tests: KAFKA_BOOTSTRAP_SERVERS is unset, no Docker "
            f"engine answers, and the local broker failed to start:\n{failure}",
            pytrace=False,
        )
    try:
        yield KafkaSession(bootstrap, "local", broker)
    finally:
        broker.stop()
        assert broker.status() is None, f"test broker in {home} did not stop"
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_session: KafkaSession) -> str:
    return kafka_session.bootstrap


@pytest.fixture(scope="session")
def broker_jars_dir() -> Path:
    return SHARED_JARS


@pytest.fixture
def kafka_config(kafka_bootstrap: str) -> dict[str, Any]:
    # A fresh dict per test so tests can add client settings freely.
    return {"bootstrap.servers": kafka_bootstrap}


@pytest.fixture
def new_topic(kafka_bootstrap: str) -> Iterator[TopicFactory]:
    """Factory for uniquely named topics; they are deleted after the test."""
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    created: list[str] = []

    def make(
        name_hint: str = "t", partitions: int = 3, config: dict[str, str] | None = None
    ) -> str:
        hint = re.sub(r"[^a-zA-Z0-9._-]", "-", name_hint)[:200] or "t"
        name = f"{hint}-{uuid.uuid4().hex[:12]}"
        # replication_factor=-1 takes the broker default, so external clusters work too.
        spec = NewTopic(name, num_partitions=partitions, replication_factor=-1, config=config or {})
        admin.create_topics([spec], operation_timeout=30)[name].result(timeout=60)
        created.append(name)
        _wait_for_topic(admin, name, partitions)
        return name

    yield make

    if created:
        futures = admin.delete_topics(created, operation_timeout=30)
        for fut in futures.values():
            with contextlib.suppress(Exception):  # cleanup is best effort
                fut.result(timeout=30)


def _wait_for_topic(admin: AdminClient, name: str, partitions: int, timeout: float = 30) -> None:
    # CreateTopics returns before every partition has a leader; producers that
    # start earlier see transient UNKNOWN_TOPIC errors.
    deadline = time.monotonic() + timeout
    while True:
        md = admin.list_topics(topic=name, timeout=5).topics.get(name)
        if (
            md is not None
            and md.error is None
            and len(md.partitions) == partitions
            and all(p.leader >= 0 for p in md.partitions.values())
        ):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"topic {name} not ready after {timeout}s: {md}")
        time.sleep(0.1)


# -- hypothesis: the differential tests' profile (tests/test_differential.py) -----------------
def _register_hypothesis_profiles() -> None:
    from hypothesis import HealthCheck, settings

    # Derandomized and without an example database, so CI is reproducible; every example
    # builds its own orders, so slow data generation is expected.
    settings.register_profile(
        "revline-differential",
        derandomize=True,
        database=None,
        deadline=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.filter_too_much],
    )


_register_hypothesis_profiles()
