"""The audit trail's pure logic: audit entries, hash chaining and chain verification.

There is one chain per order (chain name = the Kafka key of the source records,
which is the order id), plus ``_operations`` for facts that belong to no order.
An audit record is canonical JSON (sorted keys, no whitespace) with the fields

    chain, seq (1..n), at_ms, kind, actor, idempotency_key, input, detail,
    fact_id, prev_hash ("0" * 64 for seq 1), hash

where ``hash`` is the SHA-256 of the canonical JSON of all the other fields. So
altering any field of a record breaks its hash, and removing, inserting or
reordering records breaks the ``prev_hash`` link or the ``seq`` run of the next.

Entries come from two sources: the worker's outcome records (``entries_from_outcome``)
and the audit facts other components send (``entry_from_fact``). Both carry a
deterministic ``fact_id``; the chainer skips an id already in the chain's recent
ids, so a redelivered source record is chained once.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

GENESIS_HASH = "0" * 64
WORKER_ACTOR = "revline-worker"
RECENT_FACT_IDS = 512  # per chain; far more than any redelivery window of one order
UNKEYED_CHAIN_PREFIX = "_unkeyed-p"  # source records without a key (chained per partition)
UNREADABLE = "unreadable_source"  # an entry for a source record that could not be decoded

# Fields of a chained record, "hash" excluded (it covers all of these).
CHAINED_FIELDS = frozenset({"chain", "seq", "at_ms", "kind", "actor", "idempotency_key", "input",
                            "detail", "fact_id", "prev_hash"})


def canonical(value: Mapping[str, Any]) -> bytes:
    """Sorted keys, no whitespace: the same record always gives the same bytes."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def record_hash(record: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of every field except ``hash`` itself."""
    return hashlib.sha256(canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


def chain_for(key: bytes | None, partition: int) -> str:
    """The chain of a source record: its key (the order id). One partition feeds each chain."""
    if key is None:  # keyless records land on any partition: keep one chain per partition
        return f"{UNKEYED_CHAIN_PREFIX}{partition}"
    return key.decode("utf-8", "backslashreplace")


# An audit record must fit its topic (1 MB by default) whatever its source carried: a
# detail larger than this keeps its keys, with long texts cut (and saying so).
MAX_DETAIL_BYTES = 64 * 1024
_KEEP_CHARS = 2048


def bounded_detail(detail: Mapping[str, Any]) -> dict[str, Any]:
    """``detail`` itself when small; otherwise with every long string cut to 2 KiB."""
    if len(canonical(detail)) <= MAX_DETAIL_BYTES:
        return dict(detail)

    def cut(value: Any) -> Any:
        if isinstance(value, str) and len(value) > _KEEP_CHARS:
            return f"{value[:_KEEP_CHARS]}… (cut: {len(value):,} characters)"
        if isinstance(value, Mapping):
            return {k: cut(v) for k, v in value.items()}
        if isinstance(value, list):
            return [cut(v) for v in value[:100]]
        return value

    return {k: cut(v) for k, v in detail.items()}


def _compact(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None and v != "" and v != []}


@dataclass(frozen=True, slots=True)
class Entry:
    """An audit entry before chaining: what happened, who did it, to which input."""

    fact_id: str
    kind: str
    actor: str
    at_ms: int
    detail: Mapping[str, Any] = field(default_factory=dict)
    idempotency_key: str | None = None
    input: str | None = None  # "topic/partition/offset" of the input it is about


# -- entries from the sources ----------------------------------------------------------
def entries_from_outcome(outcome: Mapping[str, Any]) -> list[Entry]:
    """The audit entries one outcome record stands for, in the order they happened.

    First outcome of an input (held, or decided straight away): ``received``.
    Interim held outcome: ``held``. Final outcome of a held input: ``released``
    (by the input that arrived, or by the hold timeout). Then the decision:
    ``validated``, ``duplicate``, ``exception_opened`` or ``dead_letter``, with
    the rules version it was judged under.
    """
    coords = f"{outcome['input_topic']}/{outcome['input_partition']}/{outcome['input_offset']}"
    kind = str(outcome["kind"])
    at_ms = int(outcome["decided_at_ms"])
    key = outcome.get("idempotency_key")

    def entry(entry_kind: str, detail: Mapping[str, Any]) -> Entry:
        # Outcome identity is input coordinates + kind (+ final, implied by the kind):
        # the worker re-emits identical outcomes after a crash, under new offsets.
        return Entry(fact_id=f"outcome:{coords}:{entry_kind}", kind=entry_kind,
                     actor=WORKER_ACTOR, at_ms=at_ms, detail=_compact(detail),
                     idempotency_key=key, input=coords)

    event = {"event_type": outcome.get("event_type"), "order_id": outcome.get("order_id")}
    entries: list[Entry] = []
    final = bool(outcome["final"])
    if not final or not outcome["held"]:
        entries.append(entry("received", {
            **event, "event_id": outcome.get("event_id"),
            "occurred_at_ms": outcome.get("occurred_at_ms"),
            "source_line": outcome.get("source_line"),
        }))
    if not final:
        waiting_for = list(outcome.get("waiting_for") or [])
        entries.append(entry("held", {**event, "waiting_for": waiting_for,
                                      "rules_version": outcome.get("rules_version")}))
        return entries
    if outcome["held"]:
        entries.append(entry("released", {**event, "released_by": outcome.get("released_by")}))
    decision = {**event, "rules_version": outcome.get("rules_version"),
                "reason": outcome.get("reason")}
    if kind == "validated":
        entries.append(entry("validated", {**decision,
                                           "warnings": list(outcome.get("warnings") or [])}))
    elif kind == "exception":
        entries.append(entry("exception_opened", {
            **decision, "exception_id": outcome.get("exception_id"),
            "check_id": outcome.get("check_id"), "severity": outcome.get("severity"),
            "owner": outcome.get("owner"),
        }))
    elif kind == "dead_letter":
        entries.append(entry("dead_letter", {**decision, "stage": outcome.get("stage")}))
    else:
        entries.append(entry(kind, decision))  # duplicate (and any kind added later)
    return entries


def entry_from_fact(*, fact_id: str, kind: str, actor: str, at_ms: int,
                    detail: Mapping[str, Any]) -> Entry:
    """An audit fact as an entry; ``detail.idempotency_key`` and ``detail.input`` are lifted."""
    key = detail.get("idempotency_key")
    coords = detail.get("input")
    return Entry(fact_id=fact_id, kind=kind, actor=actor, at_ms=at_ms, detail=dict(detail),
                 idempotency_key=key if isinstance(key, str) else None,
                 input=coords if isinstance(coords, str) else None)


def unreadable_entry(coords: str, at_ms: int, error: str) -> Entry:
    """A source record that could not be decoded is chained too: nothing is dropped silently."""
    return Entry(fact_id=f"unreadable:{coords}", kind=UNREADABLE, actor="revline-auditor",
                 at_ms=at_ms, detail={"error": error, "source": coords})


# -- chaining --------------------------------------------------------------------------
def _fact_digest(fact_id: str) -> str:
    # Short digests keep heads small; a collision within 512 ids of one chain is ~2^-52.
    return hashlib.blake2b(fact_id.encode(), digest_size=8).hexdigest()


@dataclass
class ChainHead:
    """The end of one chain: its last seq and hash, and the ids of its recent facts."""

    chain: str
    seq: int = 0
    hash: str = GENESIS_HASH
    recent: deque[str] = field(default_factory=lambda: deque(maxlen=RECENT_FACT_IDS))

    def has(self, fact_id: str) -> bool:
        return _fact_digest(fact_id) in self.recent

    def append(self, entry: Entry) -> dict[str, Any]:
        """The next record of the chain for ``entry``; the head moves to it."""
        record: dict[str, Any] = {
            "chain": self.chain, "seq": self.seq + 1, "at_ms": entry.at_ms, "kind": entry.kind,
            "actor": entry.actor, "idempotency_key": entry.idempotency_key, "input": entry.input,
            "detail": bounded_detail(entry.detail), "fact_id": entry.fact_id,
            "prev_hash": self.hash,
        }
        record["hash"] = record_hash(record)
        self.seq = record["seq"]
        self.hash = record["hash"]
        self.recent.append(_fact_digest(entry.fact_id))
        return record

    def encode(self) -> bytes:
        return canonical({"chain": self.chain, "seq": self.seq, "hash": self.hash,
                          "recent": list(self.recent)})

    @classmethod
    def decode(cls, raw: bytes) -> ChainHead:
        data = orjson.loads(raw)
        return cls(chain=str(data["chain"]), seq=int(data["seq"]), hash=str(data["hash"]),
                   recent=deque(data["recent"], maxlen=RECENT_FACT_IDS))


# -- verification ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class BrokenLink:
    """The first record of a chain that does not verify, and what is wrong with it."""

    chain: str
    seq: int | None
    where: str  # "topic/partition/offset", or where the evidence is
    problem: str

    def __str__(self) -> str:
        seq = f"seq {self.seq}" if self.seq is not None else "seq ?"
        return f"chain {self.chain} {seq} at {self.where}: {self.problem}"


@dataclass
class VerifyReport:
    chains: int
    records: int
    broken: list[BrokenLink]

    @property
    def ok(self) -> bool:
        return not self.broken


@dataclass(slots=True)
class _Tail:
    seq: int
    hash: str
    partition: int
    where: str


def parse_record(raw: bytes | None) -> tuple[dict[str, Any] | None, str]:
    """The record, or None and why it is not a well-formed audit record."""
    try:
        data = orjson.loads(raw or b"")
    except orjson.JSONDecodeError as exc:
        return None, f"not an audit record (not JSON: {exc})"
    if not isinstance(data, dict):
        return None, "not an audit record (not a JSON object)"
    missing = sorted((CHAINED_FIELDS | {"hash"}) - data.keys())
    if missing:
        return None, f"not an audit record (missing {', '.join(missing)})"
    if not isinstance(data["chain"], str) or type(data["seq"]) is not int:
        return None, "not an audit record (chain must be a string, seq an integer)"
    return data, ""


class ChainVerifier:
    """Checks audit records as they are read (each partition in offset order).

    Per chain it stops at the first broken link: everything after it is suspect,
    and naming the first one is what an auditor needs. ``heads`` (chain -> (seq,
    hash), read *before* the records) also catches records missing at the end.
    """

    def __init__(self, heads: Mapping[str, tuple[int, str]] | None = None,
                 only_chain: str | None = None) -> None:
        self._heads = dict(heads or {})
        self._only = only_chain
        self._tails: dict[str, _Tail] = {}
        self._broken: dict[str, BrokenLink] = {}
        self.records = 0

    def add(self, raw: bytes | None, key: bytes | None, partition: int, where: str) -> None:
        record, why = parse_record(raw)
        if record is None:
            chain = key.decode("utf-8", "backslashreplace") if key is not None else "?"
            if self._only is None or chain == self._only:
                self.records += 1
                self._break(BrokenLink(chain, None, where, why))
            return
        chain = record["chain"]
        if self._only is not None and chain != self._only:
            return
        self.records += 1
        if chain in self._broken:
            return
        problem = self._problem(record, key, partition)
        if problem:
            self._break(BrokenLink(chain, record["seq"], where, problem))
            return
        self._tails[chain] = _Tail(record["seq"], record["hash"], partition, where)

    def _problem(self, record: dict[str, Any], key: bytes | None, partition: int) -> str:
        chain, seq = record["chain"], record["seq"]
        if record_hash(record) != record["hash"]:
            return "bad hash: the record's content does not match its hash (altered after chaining)"
        if key is None or key.decode("utf-8", "backslashreplace") != chain:
            return f"misplaced: the Kafka key {key!r} does not name this chain"
        tail = self._tails.get(chain)
        if tail is not None and tail.partition != partition:
            return (f"misplaced: the chain lives in partition {tail.partition}, this record is in "
                    f"partition {partition}")
        last_seq, last_hash = (tail.seq, tail.hash) if tail else (0, GENESIS_HASH)
        if seq <= last_seq:
            return (f"duplicate seq: seq {seq} again after seq {last_seq} "
                    f"(seq {last_seq} is at {tail.where if tail else '?'})")
        if seq != last_seq + 1:
            if tail is None:
                return f"seq gap: the chain starts at seq {seq}, not 1 (earlier records missing)"
            return f"seq gap: expected seq {last_seq + 1}, found seq {seq} (records missing)"
        if record["prev_hash"] != last_hash:
            return (f"broken prev link: prev_hash {record['prev_hash'][:12]}… is not the hash of "
                    f"seq {last_seq} ({last_hash[:12]}…)")
        head = self._heads.get(chain)
        if head is not None and head[0] == seq and head[1] != record["hash"]:
            return f"head mismatch: the heads topic records hash {head[1][:12]}… for seq {seq}"
        return ""

    def _break(self, link: BrokenLink) -> None:
        self._broken.setdefault(link.chain, link)

    def report(self) -> VerifyReport:
        for chain, (head_seq, _) in self._heads.items():
            if chain in self._broken or (self._only is not None and chain != self._only):
                continue
            tail = self._tails.get(chain)
            last = tail.seq if tail else 0
            if head_seq > last:
                self._break(BrokenLink(
                    chain, last + 1, "the heads topic",
                    f"missing records: the head is at seq {head_seq}, the chain ends at seq {last}",
                ))
        chains = set(self._tails) | set(self._broken)
        broken = sorted(self._broken.values(), key=lambda link: link.chain)
        return VerifyReport(chains=len(chains), records=self.records, broken=broken)


def verify_records(records: list[tuple[bytes | None, bytes | None, int, str]],
                   heads: Mapping[str, tuple[int, str]] | None = None) -> VerifyReport:
    """Verify (value, key, partition, where) tuples in read order."""
    verifier = ChainVerifier(heads)
    for value, key, partition, where in records:
        verifier.add(value, key, partition, where)
    return verifier.report()
