"""The audit chain without Kafka: entries, chaining, and every kind of tampering detected."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson
import pytest

from revline.processors.audit_chain import (
    GENESIS_HASH,
    RECENT_FACT_IDS,
    ChainHead,
    Entry,
    canonical,
    chain_for,
    entries_from_outcome,
    entry_from_fact,
    record_hash,
    verify_records,
)
from revline.schemas import outcome_codec

Row = tuple[bytes | None, bytes | None, int, str]


def outcome(offset: int, kind: str, *, final: bool = True, held: bool = False,
            **fields: Any) -> dict[str, Any]:
    record = {
        "input_topic": "revline.events.v1", "input_partition": 2, "input_offset": offset,
        "kind": kind, "final": final, "held": held, "released_by": None, "waiting_for": [],
        "check_id": None, "severity": None, "owner": None, "reason": "", "warnings": [],
        "exception_id": None, "stage": None, "event_type": "order_booked",
        "event_id": f"ev-{offset}", "idempotency_key": f"SO-1:booked:{offset}",
        "order_id": "SO-1", "source_line": str(offset), "occurred_at_ms": 1_000,
        "decided_at_ms": 2_000 + offset, "rules_version": "2026.11.1",
    }
    record.update(fields)
    # Through the real codec, so the field names are the wire contract's.
    decoded: dict[str, Any] = outcome_codec().decode(outcome_codec().encode(record))
    return decoded


def chain_of(n: int, chain: str = "SO-1", partition: int = 0) -> list[Row]:
    head = ChainHead(chain)
    rows: list[Row] = []
    for i in range(n):
        record = head.append(Entry(fact_id=f"f{i}", kind="applied", actor="sink", at_ms=i,
                                   detail={"amount_minor": 100 * i}))
        rows.append((canonical(record), chain.encode(), partition, f"audit/{partition}/{i}"))
    return rows


def rehash(value: bytes | None, **changes: Any) -> bytes:
    record = orjson.loads(value or b"") | changes
    record["hash"] = record_hash(record)
    return canonical(record)


# -- chaining ---------------------------------------------------------------------------
def test_records_are_canonical_and_each_carries_the_previous_hash() -> None:
    rows = chain_of(3)
    records = [orjson.loads(value or b"") for value, *_ in rows]
    assert [r["seq"] for r in records] == [1, 2, 3]
    assert records[0]["prev_hash"] == GENESIS_HASH
    assert [r["prev_hash"] for r in records[1:]] == [r["hash"] for r in records[:-1]]
    for value, *_ in rows:
        record = orjson.loads(value or b"")
        body = {k: v for k, v in record.items() if k != "hash"}
        expected = hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()
        assert record["hash"] == expected
        assert value == canonical(record)  # sorted keys, no whitespace
        assert b" " not in value and value.index(b'"actor"') < value.index(b'"chain"')


def test_head_round_trips_and_remembers_a_bounded_window_of_fact_ids() -> None:
    head = ChainHead("SO-9")
    for i in range(RECENT_FACT_IDS + 10):
        head.append(Entry(fact_id=f"id-{i}", kind="applied", actor="sink", at_ms=i))
    again = ChainHead.decode(head.encode())
    assert (again.chain, again.seq, again.hash) == ("SO-9", RECENT_FACT_IDS + 10, head.hash)
    assert again.has(f"id-{RECENT_FACT_IDS + 9}") and again.has("id-10")
    assert not again.has("id-9")  # beyond the window
    assert len(again.recent) == RECENT_FACT_IDS


def test_chain_is_the_key_and_keyless_records_chain_per_partition() -> None:
    assert chain_for(b"SO-1", 4) == "SO-1"
    assert chain_for(None, 4) == "_unkeyed-p4"
    assert chain_for(b"\xff", 0) == "\\xff"


# -- entries ----------------------------------------------------------------------------
def test_held_then_released_input_gives_received_held_released_decision() -> None:
    held = entries_from_outcome(outcome(7, "held", final=False, held=True,
                                        waiting_for=["order_booked"]))
    final = entries_from_outcome(outcome(7, "validated", held=True,
                                         released_by="revline.events.v1/2/9",
                                         warnings=["attribution.campaign"]))
    assert [e.kind for e in held + final] == ["received", "held", "released", "validated"]
    assert held[1].detail["waiting_for"] == ["order_booked"]
    assert final[0].detail["released_by"] == "revline.events.v1/2/9"
    assert final[1].detail["rules_version"] == "2026.11.1"
    assert final[1].detail["warnings"] == ["attribution.campaign"]
    entries = held + final
    assert len({e.fact_id for e in entries}) == 4
    assert all(e.input == "revline.events.v1/2/7" and e.actor == "revline-worker"
               for e in entries)
    assert all(e.idempotency_key == "SO-1:booked:7" for e in entries)
    # Deterministic: the worker's re-emitted outcome gives the same ids.
    again = entries_from_outcome(outcome(7, "validated", held=True,
                                         released_by="revline.events.v1/2/9"))
    assert [e.fact_id for e in again] == [e.fact_id for e in final]


@pytest.mark.parametrize(("kind", "fields", "audit_kind", "expected"), [
    ("exception", {"exception_id": "EX-1", "check_id": "policy.discount", "severity": "P2",
                   "owner": "revenue_ops", "reason": "discount 40% > 25%"},
     "exception_opened", {"exception_id": "EX-1", "check_id": "policy.discount",
                          "severity": "P2", "owner": "revenue_ops"}),
    ("duplicate", {"reason": "same as revline.events.v1/2/3"}, "duplicate",
     {"reason": "same as revline.events.v1/2/3"}),
    ("dead_letter", {"stage": "decode", "reason": "truncated", "event_type": None},
     "dead_letter", {"stage": "decode", "reason": "truncated"}),
])
def test_each_decision_is_an_entry_with_its_rules_version(
    kind: str, fields: dict[str, Any], audit_kind: str, expected: dict[str, Any]
) -> None:
    received, decision = entries_from_outcome(outcome(3, kind, **fields))
    assert received.kind == "received"
    assert decision.kind == audit_kind
    assert decision.detail["rules_version"] == "2026.11.1"
    assert expected.items() <= decision.detail.items()


def test_a_fact_lifts_its_idempotency_key_and_input() -> None:
    entry = entry_from_fact(fact_id="k:ledger:effect", kind="applied", actor="sink", at_ms=5,
                            detail={"idempotency_key": "SO-1:invoice:1", "input": "t/1/2",
                                    "external_refs": {"journal": "J-7"}})
    assert (entry.idempotency_key, entry.input) == ("SO-1:invoice:1", "t/1/2")
    assert entry.detail["external_refs"] == {"journal": "J-7"}


# -- verification -----------------------------------------------------------------------
def test_intact_interleaved_chains_verify() -> None:
    a, b = chain_of(5, "SO-A", 0), chain_of(4, "SO-B", 1)
    rows = [row for pair in zip(a, b, strict=False) for row in pair] + a[4:]
    report = verify_records(rows, heads={"SO-A": (5, orjson.loads(a[-1][0] or b"")["hash"])})
    assert report.ok and (report.chains, report.records) == (2, 9)


def _only_break(rows: list[Row], **heads: tuple[int, str]) -> tuple[str, int | None, str, str]:
    report = verify_records(rows, heads=heads)
    assert not report.ok and len(report.broken) == 1, report
    link = report.broken[0]
    return link.chain, link.seq, link.where, link.problem


def test_an_altered_record_is_a_bad_hash() -> None:
    rows = chain_of(5)
    record = orjson.loads(rows[2][0] or b"")
    record["detail"]["amount_minor"] = 1  # hash left as it was
    rows[2] = (canonical(record), *rows[2][1:])
    chain, seq, where, problem = _only_break(rows)
    assert (chain, seq, where) == ("SO-1", 3, "audit/0/2")
    assert problem.startswith("bad hash")


def test_an_altered_and_rehashed_record_breaks_the_next_link() -> None:
    rows = chain_of(5)
    rows[2] = (rehash(rows[2][0], detail={"amount_minor": 1}), *rows[2][1:])
    _, seq, where, problem = _only_break(rows)
    assert (seq, where) == (4, "audit/0/3")
    assert problem.startswith("broken prev link")


def test_a_removed_record_is_a_seq_gap() -> None:
    rows = chain_of(5)
    del rows[1]
    _, seq, _, problem = _only_break(rows)
    assert seq == 3 and problem.startswith("seq gap: expected seq 2, found seq 3")


def test_a_missing_first_record_is_named() -> None:
    _, seq, _, problem = _only_break(chain_of(3)[1:])
    assert seq == 2 and "starts at seq 2" in problem


def test_a_replayed_or_forged_copy_is_a_duplicate_seq() -> None:
    rows = chain_of(5)
    forged = rehash(rows[1][0], detail={"amount_minor": 99})
    rows.append((forged, b"SO-1", 0, "audit/0/5"))
    chain, seq, where, problem = _only_break(rows)
    assert (chain, seq, where) == ("SO-1", 2, "audit/0/5")
    assert problem.startswith("duplicate seq: seq 2 again after seq 5")


def test_a_forged_record_with_an_invented_seq_breaks_the_link() -> None:
    rows = chain_of(3)
    forged = rehash(rows[2][0], seq=4, detail={"amount_minor": 5})  # prev_hash of seq 2
    rows.append((forged, b"SO-1", 0, "audit/0/3"))
    _, seq, _, problem = _only_break(rows)
    assert seq == 4 and problem.startswith("broken prev link")


def test_swapped_records_are_detected() -> None:
    rows = chain_of(4)
    rows[1], rows[2] = rows[2], rows[1]
    _, seq, _, problem = _only_break(rows)
    assert seq == 3 and problem.startswith("seq gap")


def test_misplaced_and_unreadable_records_are_named() -> None:
    rows = chain_of(3)
    rows.append((rows[0][0], b"SO-2", 0, "audit/0/3"))
    assert "Kafka key" in _only_break(rows)[3]

    rows = chain_of(3)
    rows[2] = (rows[2][0], rows[2][1], 1, "audit/1/0")
    assert "partition" in _only_break(rows)[3]

    rows = [*chain_of(2), (b"{not json", b"SO-1", 0, "audit/0/2")]
    chain, seq, _, problem = _only_break(rows)
    assert (chain, seq) == ("SO-1", None) and problem.startswith("not an audit record")


def test_records_missing_at_the_end_are_caught_by_the_head() -> None:
    rows = chain_of(5)
    head = orjson.loads(rows[-1][0] or b"")
    chain, seq, where, problem = _only_break(rows[:3], **{"SO-1": (5, head["hash"])})
    assert (chain, seq, where) == ("SO-1", 4, "the heads topic")
    assert "head is at seq 5" in problem
    assert "head mismatch" in _only_break(rows, **{"SO-1": (5, "f" * 64)})[3]


def test_only_the_first_broken_link_of_a_chain_is_reported_and_others_still_verify() -> None:
    a = chain_of(6, "SO-A", 0)
    a[1] = (rehash(a[1][0], detail={}), *a[1][1:])  # breaks at seq 3
    del a[4]  # would be a second break
    report = verify_records(a + chain_of(3, "SO-B", 1))
    assert [(link.chain, link.seq) for link in report.broken] == [("SO-A", 3)]
    assert (report.chains, report.records) == (2, 8)


def test_a_huge_detail_is_cut_so_the_record_fits_its_topic() -> None:
    from revline.processors.audit_chain import MAX_DETAIL_BYTES, ChainHead, Entry, canonical

    head = ChainHead("SO-1")
    entry = Entry(fact_id="f-1", kind="exception_opened", actor="worker", at_ms=1,
                  detail={"reason": "r" * 2_000_000, "check_id": "completeness.sku"})
    record = head.append(entry)
    assert len(canonical(record)) < 2 * MAX_DETAIL_BYTES
    assert record["detail"]["check_id"] == "completeness.sku"
    assert record["detail"]["reason"].endswith("(cut: 2,000,000 characters)")
    small = head.append(Entry(fact_id="f-2", kind="k", actor="a", at_ms=2, detail={"x": "y"}))
    assert small["detail"] == {"x": "y"}
