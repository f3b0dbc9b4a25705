"""Replay: reset a consumer group's committed offsets through the Kafka admin API.

Replay is for consumers that resume from their committed group offsets: the sink
(``revline sink``, group ``<app_id>-sink``), which recognises every effect it
already applied through its side-effect ledger, and downstream consumer groups.
It is refused for the stream worker's own group: the worker keeps its input
positions in its changelog and recognises a re-read input by its coordinates, so
moving that group's offsets could not change any decision (``revline redrive``
is how a record is judged again).

A reset is refused while the group has live members (the broker would refuse
too: offsets of an active group belong to its members). Every run, dry runs
included, is an audit fact on the operations chain.
"""

from __future__ import annotations

import concurrent.futures
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from confluent_kafka import (
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from revline.core.admin import _TIMEOUT_S, live_members
from revline.core.auditlog import AuditFact, AuditLog
from revline.core.errors import InfrastructureError, RevlineError
from revline.core.kafka_config import client_config
from revline.core.settings import Settings

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class OperationRefusedError(RevlineError):
    """An operation that would be unsafe or meaningless; the message says what to do."""


class GroupActiveError(OperationRefusedError):
    """The consumer group still has live members."""


def parse_when(text: str, *, now: datetime | None = None) -> int:
    """Epoch milliseconds of an ISO 8601 time ("2026-11-24T09:00:00Z"; no zone means UTC)
    or of a duration ago ("90s", "30m", "2h", "7d", "1w")."""
    value = text.strip()
    match = _DURATION.match(value.lower())
    if match:
        try:
            ago = timedelta(seconds=float(match.group(1)) * _UNIT_S[match.group(2)])
            ms = int(((now or datetime.now(UTC)) - ago).timestamp() * 1000)
        except (OverflowError, ValueError, OSError):
            ms = -1
        if ms < 0:
            raise OperationRefusedError(f"the duration {text!r} reaches back before 1970")
        return ms
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise OperationRefusedError(
            f"cannot read the time {text!r}: give ISO 8601 (2026-11-24T09:00:00Z, "
            "no zone means UTC) or a duration ago (90s, 30m, 2h, 7d)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    try:
        ms = int(moment.timestamp() * 1000)
    except (OverflowError, ValueError, OSError):
        ms = -1
    if ms < 0:
        raise OperationRefusedError(f"the time {text!r} is out of range (1970 to 9999)")
    return ms


def format_ms(ms: int) -> str:
    try:
        return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    except (OverflowError, ValueError, OSError, TypeError):  # from data: show it as it is
        return f"{ms} ms"


@dataclass(frozen=True)
class ReplayTarget:
    """Where to move each partition: earliest, latest, an absolute offset, or a time."""

    kind: str  # earliest | latest | offset | datetime
    offset: int | None = None
    at_ms: int | None = None

    @classmethod
    def parse(cls, to_offset: str | None, to_datetime: str | None) -> ReplayTarget:
        if (to_offset is None) == (to_datetime is None):
            raise OperationRefusedError("give exactly one of --to-offset or --to-datetime")
        if to_datetime is not None:
            return cls("datetime", at_ms=parse_when(to_datetime))
        assert to_offset is not None
        word = to_offset.strip().lower()
        if word in ("earliest", "latest"):
            return cls(word)
        try:
            offset = int(word)
        except ValueError:
            offset = -1
        if offset < 0:
            raise OperationRefusedError(
                f"--to-offset {to_offset!r}: give earliest, latest or a non-negative offset"
            )
        return cls("offset", offset=offset)

    def describe(self) -> str:
        if self.kind == "offset":
            return f"offset {self.offset}"
        if self.kind == "datetime":
            assert self.at_ms is not None
            return f"the first record at or after {format_ms(self.at_ms)}"
        return self.kind


@dataclass(frozen=True)
class PartitionMove:
    topic: str
    partition: int
    current: int | None  # committed offset; None when the group has none for it
    new: int
    low: int
    high: int
    note: str = ""

    @property
    def rereads(self) -> int:
        """Records the group will read again (0 when moving forward)."""
        start = self.high if self.current is None else self.current
        return max(0, start - self.new)

    @property
    def skips(self) -> int:
        """Records the group will skip (0 when moving back)."""
        start = self.low if self.current is None else self.current
        return max(0, self.new - start)

    def as_detail(self) -> dict[str, Any]:
        return {"topic": self.topic, "partition": self.partition, "from": self.current,
                "to": self.new}


@dataclass(frozen=True)
class ReplayResult:
    group: str
    target: ReplayTarget
    moves: tuple[PartitionMove, ...]
    dry_run: bool
    actor: str
    fact_id: str

    @property
    def rereads(self) -> int:
        return sum(m.rereads for m in self.moves)


def sink_group(settings: Settings) -> str:
    return settings.sink_group or f"{settings.app_id}-sink"


def worker_groups(settings: Settings) -> tuple[str, ...]:
    """The worker's Faust group and the groups its own consumers use (see revline.streams.app)."""
    return settings.app_id, f"{settings.app_id}-input", f"{settings.app_id}-reference"


def refuse_worker_group(settings: Settings, group: str) -> None:
    if group == f"{settings.app_id}-auditor":
        raise OperationRefusedError(
            f"{group!r} is the audit chainer's group. Its offsets move in the same Kafka "
            "transactions as the chains; re-reading sources would only be skipped as already "
            "chained, within a bounded window per chain, so it is not replayed. Check the "
            "chains with `revline audit verify`."
        )
    if group not in worker_groups(settings):
        return
    raise OperationRefusedError(
        f"{group!r} is a group of the stream worker (REVLINE_APP_ID={settings.app_id}). The "
        "worker does not resume "
        "from committed group offsets: it keeps its input positions in its own changelog, and "
        "an input it reads again is recognised by its coordinates and changes nothing, so "
        "resetting this group cannot change any decision. To have dead-lettered or excepted "
        "records judged again use `revline redrive`; to re-apply validated events to the "
        f"ledger and ERP replay the sink's group (`revline replay --group {sink_group(settings)}"
        " ...`)."
    )


def _refuse_if_active(members: Sequence[str], group: str) -> None:
    if members:
        raise GroupActiveError(
            f"consumer group {group!r} has {len(members)} live member(s): "
            + "; ".join(members)
            + ". Stop them first (their offsets belong to them while they run), then replay."
        )


def committed_offsets(admin: AdminClient, group: str) -> dict[tuple[str, int], int]:
    request = [ConsumerGroupTopicPartitions(group)]
    future = admin.list_consumer_group_offsets(request, request_timeout=_TIMEOUT_S)[group]
    try:
        result = future.result(timeout=_TIMEOUT_S + 5)
    except KafkaException as exc:
        raise InfrastructureError(f"cannot list offsets of group {group!r}: {exc}") from exc
    except concurrent.futures.TimeoutError as exc:
        raise InfrastructureError(f"cannot list offsets of group {group!r}: no answer from "
                                  f"Kafka within {_TIMEOUT_S + 5:.0f} s") from exc
    return {(tp.topic, tp.partition): tp.offset for tp in result.topic_partitions or []
            if tp.offset >= 0}


def plan_replay(
    bootstrap: str,
    group: str,
    target: ReplayTarget,
    *,
    topics: Sequence[str] = (),
    partitions: Sequence[int] = (),
) -> list[PartitionMove]:
    """Per partition: the committed offset now and the one the target means.

    Raises ``GroupActiveError`` when the group has live members.
    """
    admin = AdminClient(client_config("admin", bootstrap))
    _refuse_if_active(live_members(admin, group), group)
    committed = committed_offsets(admin, group)
    consumer = Consumer(client_config("consumer", bootstrap, {
        # Never the target group: a probe must not join it or commit for it.
        "group.id": f"revline-replay-probe-{uuid.uuid4().hex[:8]}",
        "enable.auto.commit": False,
    }))
    try:
        chosen = list(dict.fromkeys(topics)) or sorted({t for t, _ in committed})
        if not chosen:
            raise OperationRefusedError(
                f"consumer group {group!r} has no committed offsets; name the topic(s) to "
                "position it on with --topic"
            )
        metadata = consumer.list_topics(timeout=_TIMEOUT_S).topics
        tps: list[tuple[str, int]] = []
        for topic in chosen:
            md = metadata.get(topic)
            if md is None or md.error is not None:
                raise OperationRefusedError(f"topic {topic!r} does not exist on {bootstrap}")
            tps += [(topic, p) for p in sorted(md.partitions) if not partitions or p in partitions]
        if not tps:
            raise OperationRefusedError(
                f"none of partitions {sorted(set(partitions))} exist in {', '.join(chosen)}"
            )
        times: dict[tuple[str, int], int] = {}
        if target.kind == "datetime":
            assert target.at_ms is not None
            found = consumer.offsets_for_times(
                [TopicPartition(t, p, target.at_ms) for t, p in tps], timeout=_TIMEOUT_S)
            for tp in found:
                if tp.error is not None:
                    raise InfrastructureError(f"offsets_for_times {tp.topic}/{tp.partition}: "
                                              f"{tp.error}")
                times[(tp.topic, tp.partition)] = tp.offset
        moves = []
        for topic, p in tps:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p),
                                                       timeout=_TIMEOUT_S)
            new, note = _new_offset(target, low, high, times.get((topic, p), -1))
            moves.append(PartitionMove(topic, p, committed.get((topic, p)), new, low, high, note))
        return moves
    finally:
        consumer.close()


def _new_offset(target: ReplayTarget, low: int, high: int, at_time: int) -> tuple[int, str]:
    if target.kind == "earliest":
        return low, ""
    if target.kind == "latest":
        return high, ""
    if target.kind == "datetime":
        if at_time < 0:  # no record at or after that time: the end
            return high, "no record at or after that time: end"
        return at_time, ""
    assert target.offset is not None
    if target.offset < low:  # like kafka-consumer-groups: clamp, and say so
        return low, f"clamped to the earliest retained offset ({target.offset} is gone)"
    if target.offset > high:
        return high, f"clamped to the end ({target.offset} is beyond it)"
    return target.offset, ""


def apply_replay(bootstrap: str, group: str, moves: Sequence[PartitionMove]) -> None:
    admin = AdminClient(client_config("admin", bootstrap))
    # Checked again right before: a member may have joined since the plan was made.
    _refuse_if_active(live_members(admin, group), group)
    request = [ConsumerGroupTopicPartitions(
        group, [TopicPartition(m.topic, m.partition, m.new) for m in moves])]
    future = admin.alter_consumer_group_offsets(request, request_timeout=_TIMEOUT_S)[group]
    try:
        result = future.result(timeout=_TIMEOUT_S + 5)
    except concurrent.futures.TimeoutError as exc:
        raise InfrastructureError(
            f"no answer from Kafka within {_TIMEOUT_S + 5:.0f} s to resetting group {group!r}; "
            "it may or may not have moved: see where it is with `revline replay --dry-run` "
            "before replaying again") from exc
    except KafkaException as exc:
        text = str(exc)
        if "UNKNOWN_MEMBER_ID" in text or "not empty" in text.lower():
            raise GroupActiveError(
                f"Kafka refused to reset group {group!r}: it has live members ({text}). Stop "
                "them first, then replay."
            ) from exc
        raise InfrastructureError(f"cannot reset offsets of group {group!r}: {text}") from exc
    failed = [f"{tp.topic}/{tp.partition}: {tp.error}" for tp in result.topic_partitions or []
              if tp.error is not None]
    if failed:
        raise InfrastructureError(f"Kafka refused some offsets of group {group!r}: {failed}")


def replay(
    settings: Settings,
    bootstrap: str,
    group: str,
    target: ReplayTarget,
    *,
    topics: Sequence[str] = (),
    partitions: Sequence[int] = (),
    dry_run: bool = False,
    actor: str,
) -> ReplayResult:
    """Plan, apply (unless ``dry_run``) and audit one replay."""
    from revline.core.admin import ensure_operations_topics

    refuse_worker_group(settings, group)
    moves = plan_replay(bootstrap, group, target, topics=topics, partitions=partitions)
    if not dry_run:
        apply_replay(bootstrap, group, moves)
    fact = AuditFact(
        fact_id=f"replay:{group}:{uuid.uuid4().hex}",  # one run, one fact
        kind="replay",
        actor=actor,
        order_id=None,
        detail={
            "group": group,
            "topic": sorted({m.topic for m in moves}),
            "target": target.describe(),
            "partitions": [m.as_detail() for m in moves],
            "rereads": sum(m.rereads for m in moves),
            "dry_run": dry_run,
        },
        at_ms=int(time.time() * 1000),
    )
    ensure_operations_topics(bootstrap, settings)
    audit = AuditLog.from_settings(settings, bootstrap)
    audit.record(fact)
    try:
        audit.flush()
    except InfrastructureError as exc:
        done = "nothing was changed (dry run)" if dry_run else "the offsets WERE reset"
        raise InfrastructureError(f"{exc}: {done}, but the audit fact {fact.fact_id} is "
                                  f"missing; record it by hand ({fact.encode().decode()})") from exc
    return ReplayResult(group, target, tuple(moves), dry_run, actor, fact.fact_id)
