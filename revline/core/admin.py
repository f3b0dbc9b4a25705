"""Topic administration through the Kafka admin API."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Mapping

from confluent_kafka import (
    KafkaException,
)
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from revline.core.errors import InfrastructureError
from revline.core.kafka_config import client_config
from revline.core.settings import Settings
from revline.core.startup import NotReadyError, retry_startup


def ensure_topics(
    bootstrap: str,
    topics: Mapping[str, int],
    *,
    config: Mapping[str, Mapping[str, str]] | None = None,
    timeout: float = 30.0,
    startup_timeout_s: float | None = None,
) -> list[str]:
    """Create the missing ones of ``topics`` (name -> partitions); returns those created.

    Transient broker errors (a cold cluster, a controller or leader not elected yet,
    a client-side timeout) are retried until ``startup_timeout_s`` (default
    REVLINE_STARTUP_TIMEOUT_S); then one InfrastructureError says what was awaited.
    """
    created: list[str] = []

    def attempt() -> list[str]:
        created.extend(_ensure_topics_once(bootstrap, topics, config or {}, timeout))
        return created

    names = ", ".join(sorted(topics)[:3]) + (" …" if len(topics) > 3 else "")
    return retry_startup(attempt, f"Kafka at {bootstrap} to create or list topics ({names})",
                         timeout_s=startup_timeout_s)


def _ensure_topics_once(bootstrap: str, topics: Mapping[str, int],
                        config: Mapping[str, Mapping[str, str]], timeout: float) -> list[str]:
    admin = AdminClient(client_config("admin", bootstrap, {"log_level": 3}))
    try:
        existing = set(admin.list_topics(timeout=timeout).topics)
    except KafkaException as exc:
        raise InfrastructureError(f"cannot reach Kafka at {bootstrap}: {exc}") from exc
    missing = [name for name in topics if name not in existing]
    if not missing:
        return []
    futures = admin.create_topics(
        [
            NewTopic(name, num_partitions=topics[name], config=dict(config.get(name, {})))
            for name in missing
        ],
        operation_timeout=timeout,
        request_timeout=timeout,
    )
    for name, future in futures.items():
        try:
            future.result(timeout=timeout + 15)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise InfrastructureError(f"cannot create topic {name}: {exc}") from exc
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # metadata propagates asynchronously
        metadata = admin.list_topics(timeout=timeout).topics
        if all(name in metadata and metadata[name].partitions
               and all(p.leader >= 0 for p in metadata[name].partitions.values())
               for name in missing):
            return missing
        time.sleep(0.1)
    raise InfrastructureError(f"topics {missing} were created but never became visible") \
        from NotReadyError(f"no leader yet for {missing}")


def ensure_operations_topics(bootstrap: str, settings: Settings) -> None:
    """Audit and exception-lifecycle topics, created alongside the worker's.

    The audit topics are partitioned like the outcomes topic (the same key, the
    order id, lands on the same partition number), so one chainer instance owns
    all of an order's records.
    """
    n = settings.input_partitions
    compact = {"cleanup.policy": "compact"}
    ensure_topics(
        bootstrap,
        {
            settings.audit_facts_topic: n,
            settings.audit_topic: n,
            settings.audit_heads_topic: n,
            settings.exception_events_topic: n,
            settings.exception_state_topic: n,
            settings.quarantine_topic: n,
            settings.redrive_log_topic: n,
        },
        config={
            settings.audit_topic: {"retention.ms": "-1"},  # the audit trail is never deleted
            settings.audit_heads_topic: compact,
            settings.exception_state_topic: compact,
            settings.redrive_log_topic: compact,
        },
    )


def check_partition_counts(bootstrap: str, topics: Mapping[str, int],
                           timeout: float = 30.0) -> None:
    """Refuse to run against existing topics whose partition count is not the expected one.

    The worker reads input partition p alongside ticks partition p; an input topic
    with more partitions (say auto-created by the broker's default before the worker
    first ran) would leave the extra ones unread, silently.
    """
    from revline.core.errors import ConfigurationError

    admin = AdminClient(client_config("admin", bootstrap, {"log_level": 3}))
    try:
        metadata = retry_startup(lambda: admin.list_topics(timeout=timeout).topics,
                                 f"Kafka at {bootstrap} to list topics")
    except KafkaException as exc:
        raise InfrastructureError(f"cannot reach Kafka at {bootstrap}: {exc}") from exc
    wrong = {name: len(metadata[name].partitions) for name, want in topics.items()
             if name in metadata and len(metadata[name].partitions) != want}
    if wrong:
        listing = ", ".join(f"{name} has {n}" for name, n in sorted(wrong.items()))
        raise ConfigurationError(
            f"partition counts differ from REVLINE_INPUT_PARTITIONS={next(iter(topics.values()))}"
            f": {listing}. Set REVLINE_INPUT_PARTITIONS to the input topic's count, or "
            "recreate the topics (create the input topic before publishing: `revline publish` "
            "does; a broker's auto-create uses its own default)"
        )


_TIMEOUT_S = 30.0


def live_members(admin: AdminClient, group: str, *,
                 except_instance: str | None = None) -> list[str]:
    """The group's live members as "client-id (host, member-id)"; empty when none.

    ``except_instance``: leave out the static member of that ``group.instance.id`` (a
    restarted process's own predecessor, whose session it takes over). Any failure is
    an InfrastructureError raised from its cause, so start-up can tell a transient one
    (``revline.core.startup.retry_startup``) from the rest.
    """
    try:
        future = admin.describe_consumer_groups([group], request_timeout=_TIMEOUT_S)[group]
        description = future.result(timeout=_TIMEOUT_S + 5)
    except KafkaException as exc:
        raise InfrastructureError(f"cannot describe consumer group {group!r}: {exc}") from exc
    except concurrent.futures.TimeoutError as exc:
        raise InfrastructureError(
            f"cannot describe consumer group {group!r}: no answer from Kafka within "
            f"{_TIMEOUT_S + 5:.0f} s") from exc
    return [f"{m.client_id} ({m.host.lstrip('/')}, member {m.member_id}"
            + (f", instance {m.group_instance_id}" if m.group_instance_id else "") + ")"
            for m in description.members
            if except_instance is None or m.group_instance_id != except_instance]
