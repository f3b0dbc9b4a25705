"""The exception state machine: legal transitions, SLA breach, escalation once, expiry."""

from __future__ import annotations

from typing import Any

import pytest

from revline.core.auditlog import LIFECYCLE
from revline.processors.exception_lifecycle import (
    ACK,
    ESCALATED,
    EXPIRED,
    RESOLVE,
    WAIVE,
    Change,
    apply_event,
    audit_kind,
    breached,
    current_owner,
    due_events,
    lifecycle_event,
    open_exception,
    select,
    transition_error,
)
from revline.processors.ownership import ExceptionFacts, Ownership

OWNERSHIP = Ownership.from_mapping({
    "version": "test-1",
    "sla_minutes": {"P1": 1, "P2": 10, "P3": 100},
    "expire_after_minutes": {"P1": 60, "P2": 60, "P3": 60},
    "backup_owners": {"revenue_ops": "finance", "finance": "revenue_ops",
                      "integrations": "revenue_ops"},
})
T0 = 1_790_000_000_000
MIN = 60_000

# The state value is read by other tools: these names are a contract.
CONTRACT = {
    "exception_id", "check_id", "severity", "owner", "backup_owner", "status", "opened_at_ms",
    "sla_deadline_ms", "escalated", "escalated_at_ms", "acknowledged_by", "acknowledged_at_ms",
    "closed_at_ms", "closed_by", "reason_code", "note", "order_id", "idempotency_key",
    "event_type", "source_system", "amount_minor", "currency", "reason", "input",
    "corrected_event_id", "rules_version", "ownership_version", "history",
}


def record(exception_id: str = "EX-1", check_id: str = "policy.discount", severity: str = "P2",
           owner: str = "revenue_ops", opened: int = T0) -> dict[str, Any]:
    return {
        "exception_id": exception_id, "check_id": check_id, "severity": severity,
        "owner": owner, "reason": "discount too high",
        "all_findings": [{"check_id": check_id, "reason": "discount too high"}],
        "blocking": True, "opened_at_ms": opened, "sla_deadline_ms": opened + 1,
        "rules_version": "r1", "event_type": "order_booked", "idempotency_key": "SO-1:booked",
        "order_id": "SO-1", "source_system": "salesforce", "source_record_id": "006",
        "input_topic": "in", "input_partition": 2, "input_offset": 41, "event": b"",
    }


def opened(**kw: Any) -> dict[str, Any]:
    rec = record(**kw)
    assignment = OWNERSHIP.assign(ExceptionFacts(rec["check_id"], rec["severity"], rec["owner"]))
    return open_exception(rec, assignment, amount_minor=1000, currency="EUR")


def ok(result: Change | str) -> dict[str, Any]:
    assert isinstance(result, Change), result
    return result.state


def test_open_state_has_the_contract_fields_and_the_assignment() -> None:
    s = opened()
    assert set(s) >= CONTRACT
    assert s["status"] == "open" and s["escalated"] is False
    assert s["sla_deadline_ms"] == T0 + 10 * MIN  # P2 from the ownership rules, not the record
    assert s["backup_owner"] == "finance" and s["ownership_version"] == "test-1"
    assert s["input"] == {"topic": "in", "partition": 2, "offset": 41}
    assert s["history"] == [{"at_ms": T0, "status": "open", "actor": "pipeline",
                             "reason_code": None}]


def test_ack_then_resolve_records_who_when_and_why() -> None:
    s = ok(apply_event(opened(), lifecycle_event(ACK, "EX-1", actor="ana", at_ms=T0 + 5)))
    assert (s["status"], s["acknowledged_by"], s["acknowledged_at_ms"]) == (
        "acknowledged", "ana", T0 + 5)
    change = apply_event(s, lifecycle_event(RESOLVE, "EX-1", actor="bo", at_ms=T0 + 9,
                                            reason_code="SOURCE_FIXED", note="fixed in CRM",
                                            corrected_event_id="evt-2"))
    s = ok(change)
    assert isinstance(change, Change) and change.transition == "resolved"
    assert (s["status"], s["closed_by"], s["closed_at_ms"], s["reason_code"], s["note"],
            s["corrected_event_id"]) == ("resolved", "bo", T0 + 9, "SOURCE_FIXED",
                                         "fixed in CRM", "evt-2")
    assert [h["status"] for h in s["history"]] == ["open", "acknowledged", "resolved"]
    assert s["history"][-1] == {"at_ms": T0 + 9, "status": "resolved", "actor": "bo",
                                "reason_code": "SOURCE_FIXED"}


def test_waive_straight_from_open() -> None:
    s = ok(apply_event(opened(), lifecycle_event(WAIVE, "EX-1", actor="cy", at_ms=T0 + 1,
                                                 reason_code="ACCEPTED")))
    assert s["status"] == "waived" and s["reason_code"] == "ACCEPTED"


@pytest.mark.parametrize("kind, actor, reason, why", [
    (RESOLVE, "ana", None, "needs a reason code"),
    (WAIVE, "ana", "  ", "needs a reason code"),
    (ACK, "", None, "needs an actor"),
    ("reopen", "ana", "X", "unknown lifecycle event"),
])
def test_incomplete_commands_are_refused_as_data(kind: str, actor: str, reason: str | None,
                                                 why: str) -> None:
    result = apply_event(opened(), lifecycle_event(kind, "EX-1", actor=actor, at_ms=T0,
                                                   reason_code=reason))
    assert isinstance(result, str) and why in result


def test_illegal_transitions_say_why() -> None:
    acked = ok(apply_event(opened(), lifecycle_event(ACK, "EX-1", actor="a", at_ms=T0)))
    assert "cannot become acknowledged" in (transition_error(acked, ACK) or "")
    closed = ok(apply_event(acked, lifecycle_event(WAIVE, "EX-1", actor="a", at_ms=T0,
                                                   reason_code="OK")))
    for kind in (ACK, RESOLVE, WAIVE, EXPIRED, ESCALATED):
        assert transition_error(closed, kind) is not None
    assert "already waived" in (transition_error(closed, RESOLVE) or "")


def test_sla_breach_escalates_once_to_the_backup_owner() -> None:
    s = opened(check_id="reconciliation.invoice_total", severity="P1", owner="finance")
    deadline = s["sla_deadline_ms"]
    assert deadline == T0 + MIN
    assert due_events([s], deadline - 1) == []
    [event] = due_events([s], deadline)
    assert (event["type"], event["to"], event["event_id"]) == (
        ESCALATED, "revenue_ops", "EX-1:escalated")
    change = apply_event(s, event)
    assert isinstance(change, Change) and change.transition == ESCALATED
    s = change.state
    assert s["escalated"] and s["escalated_at_ms"] == deadline and s["status"] == "open"
    assert current_owner(s) == "revenue_ops"
    assert due_events([s], deadline + 5 * MIN) == []  # once
    assert "already escalated" in str(apply_event(s, event))  # the echo is a no-op
    assert audit_kind(change.transition) in LIFECYCLE


def test_acknowledged_in_time_never_breaches() -> None:
    s = ok(apply_event(opened(), lifecycle_event(ACK, "EX-1", actor="a", at_ms=T0 + MIN)))
    assert not breached(s, T0 + 11 * MIN) and due_events([s], T0 + 11 * MIN) == []


def test_expiry_closes_what_is_left_open_or_acknowledged() -> None:
    s = opened()
    acked = ok(apply_event(opened(exception_id="EX-2"),
                           lifecycle_event(ACK, "EX-2", actor="a", at_ms=T0)))
    done = ok(apply_event(opened(exception_id="EX-3"),
                          lifecycle_event(RESOLVE, "EX-3", actor="a", at_ms=T0,
                                          reason_code="FIXED")))
    events = due_events([s, acked, done], T0 + 60 * MIN)
    assert sorted((e["exception_id"], e["type"]) for e in events) == [
        ("EX-1", EXPIRED), ("EX-2", EXPIRED)]
    expired = ok(apply_event(s, events[0] if events[0]["exception_id"] == "EX-1" else events[1]))
    assert expired["status"] == "expired" and expired["closed_by"] == "exception-manager"
    assert all(audit_kind(t) in LIFECYCLE
               for t in ("acknowledged", "escalated", "resolved", "waived", "expired"))


def test_select_filters_by_owner_severity_check_age_and_status() -> None:
    a = opened(exception_id="EX-a", check_id="policy.discount", severity="P2",
               owner="revenue_ops", opened=T0)
    b = opened(exception_id="EX-b", check_id="reconciliation.currency", severity="P1",
               owner="finance", opened=T0 + 30 * MIN)
    c = ok(apply_event(opened(exception_id="EX-c", opened=T0),
                       lifecycle_event(WAIVE, "EX-c", actor="x", at_ms=T0, reason_code="OK")))
    escalated = ok(apply_event(b, due_events([b], T0 + 40 * MIN)[0]))
    states = [a, escalated, c]
    now = T0 + 45 * MIN

    def ids(**kw: Any) -> list[str]:
        return [s["exception_id"] for s in select(states, now_ms=now, **kw)]

    assert ids() == ["EX-b", "EX-a"]  # active only; most severe first
    assert ids(owner="finance") == ["EX-b"]
    assert ids(owner="revenue_ops") == ["EX-b", "EX-a"]  # b is escalated to revenue_ops
    assert ids(severity="P2") == ["EX-a"]
    assert ids(check="policy.*") == ["EX-a"]
    assert ids(min_age_ms=40 * MIN) == ["EX-a"]
    assert ids(statuses=["waived"]) == ["EX-c"]
    assert ids(order_id="SO-1", statuses=["open", "waived"]) == ["EX-b", "EX-a", "EX-c"]
