"""The exception lifecycle as a pure state machine over JSON-able values.

    open ──ack──▶ acknowledged ──resolve | waive──▶ resolved | waived
      │                 │
      ├─resolve | waive─┘   (an owner may close without acknowledging first)
      └──────expire─────┴──▶ expired   (neither resolved nor waived in time)

The SLA is the time to *acknowledge* (P1 15 min, P2 2 h, P3 48 h): someone
must own the problem by then; fixing it is measured separately (MTTR). An
exception still open at its deadline is escalated once to its backup owner
and counts as a breach; escalation is a flag, not a status, so the exception
stays open for its owner and the backup alike.

The state value (one per exception id, on the compacted state topic) is read
by other tools; its field names are a contract (see ``open_exception``).
Lifecycle events are JSON too: ``ack``, ``resolve``, ``waive`` from people
(the CLI), ``escalated`` and ``expired`` from the manager. ``apply_event``
returns the new state or, as data, why the event does not apply.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from revline.processors.ownership import Assignment

OPEN = "open"
ACKNOWLEDGED = "acknowledged"
RESOLVED = "resolved"
WAIVED = "waived"
EXPIRED = "expired"
STATUSES = (OPEN, ACKNOWLEDGED, RESOLVED, WAIVED, EXPIRED)
ACTIVE = (OPEN, ACKNOWLEDGED)
CLOSED = (RESOLVED, WAIVED, EXPIRED)

# Lifecycle event types -> the status they lead to ("escalated" is a flag, not a status).
ACK, RESOLVE, WAIVE, ESCALATED = "ack", "resolve", "waive", "escalated"
EVENT_STATUS = {ACK: ACKNOWLEDGED, RESOLVE: RESOLVED, WAIVE: WAIVED, EXPIRED: EXPIRED}
EVENT_TYPES = (ACK, RESOLVE, WAIVE, ESCALATED, EXPIRED)
NEEDS_REASON = (RESOLVE, WAIVE)

LEGAL: dict[str, frozenset[str]] = {
    OPEN: frozenset({ACKNOWLEDGED, RESOLVED, WAIVED, EXPIRED}),
    ACKNOWLEDGED: frozenset({RESOLVED, WAIVED, EXPIRED}),
}

MANAGER = "exception-manager"  # the actor of system events


@dataclass(frozen=True)
class Change:
    """An applied lifecycle event: the new state and what happened."""

    state: dict[str, Any]
    transition: str  # a status, or "escalated"
    at_ms: int
    actor: str


def open_exception(record: Mapping[str, Any], assignment: Assignment, *,
                   amount_minor: int | None, currency: str | None) -> dict[str, Any]:
    """The first state of an exception from its ``ExceptionRecord`` and its assignment."""
    opened = int(record["opened_at_ms"])
    return {
        "exception_id": record["exception_id"],
        "check_id": record["check_id"],
        "severity": assignment.severity,
        "owner": assignment.owner,
        "backup_owner": assignment.backup_owner,
        "status": OPEN,
        "opened_at_ms": opened,
        "sla_deadline_ms": opened + assignment.sla_ms,
        "expires_at_ms": opened + assignment.expire_after_ms,
        "escalated": False,
        "escalated_at_ms": None,
        "acknowledged_by": None,
        "acknowledged_at_ms": None,
        "closed_at_ms": None,
        "closed_by": None,
        "reason_code": None,
        "note": None,
        "order_id": record.get("order_id"),
        "idempotency_key": record.get("idempotency_key"),
        "event_type": record.get("event_type"),
        "source_system": record.get("source_system"),
        "source_record_id": record.get("source_record_id"),
        "amount_minor": amount_minor,
        "currency": currency,
        "reason": record["reason"],
        "findings": [dict(f) for f in record.get("all_findings", ())],
        "blocking": bool(record.get("blocking", True)),
        "input": {"topic": record["input_topic"], "partition": record["input_partition"],
                  "offset": record["input_offset"]},
        "corrected_event_id": None,
        "rules_version": record["rules_version"],
        "ownership_version": assignment.version,
        "ownership_rule": assignment.rule,
        "qa_owner": record["owner"],  # what the QA rules said, before the ownership rules
        "qa_severity": record["severity"],
        "history": [{"at_ms": opened, "status": OPEN, "actor": "pipeline", "reason_code": None}],
    }


def lifecycle_event(kind: str, exception_id: str, *, actor: str, at_ms: int,
                    reason_code: str | None = None, note: str | None = None,
                    corrected_event_id: str | None = None, to: str | None = None,
                    event_id: str | None = None) -> dict[str, Any]:
    """A lifecycle event for the exception-events topic."""
    return {
        "event_id": event_id or str(uuid.uuid4()),
        "type": kind,
        "exception_id": exception_id,
        "actor": actor,
        "at_ms": at_ms,
        "reason_code": reason_code,
        "note": note,
        "corrected_event_id": corrected_event_id,
        "to": to,
    }


def transition_error(state: Mapping[str, Any], kind: str) -> str | None:
    """Why an event of this kind cannot apply to this state now, or None."""
    status = state["status"]
    exception_id = state["exception_id"]
    if kind == ESCALATED:
        if status != OPEN:
            return f"{exception_id} is {status}; only open exceptions escalate"
        if state["escalated"]:
            return f"{exception_id} was already escalated"
        return None
    target = EVENT_STATUS.get(kind)
    if target is None:
        return f"unknown lifecycle event {kind!r} (one of {EVENT_TYPES})"
    if target not in LEGAL.get(status, frozenset()):
        if status in CLOSED:
            return f"{exception_id} is already {status}; closed exceptions stay closed"
        return f"{exception_id} is {status}; it cannot become {target}"
    return None


def event_error(event: Mapping[str, Any]) -> str | None:
    """What a lifecycle event lacks, independent of any state."""
    kind = event.get("type")
    if kind not in EVENT_TYPES:
        return f"unknown lifecycle event {kind!r} (one of {EVENT_TYPES})"
    if not event.get("exception_id"):
        return "lifecycle event without exception_id"
    if not str(event.get("actor") or "").strip():
        return f"{kind} needs an actor"
    if kind in NEEDS_REASON and not str(event.get("reason_code") or "").strip():
        return f"{kind} needs a reason code"
    if not isinstance(event.get("at_ms"), int):
        return f"{kind} needs at_ms (epoch milliseconds)"
    return None


def apply_event(state: Mapping[str, Any], event: Mapping[str, Any]) -> Change | str:
    """The state after ``event``, or why it does not apply (errors as data)."""
    problem = event_error(event) or transition_error(state, str(event["type"]))
    if problem is not None:
        return problem
    kind = str(event["type"])
    at_ms = int(event["at_ms"])
    actor = str(event["actor"])
    new = copy.deepcopy(dict(state))
    reason_code = event.get("reason_code") or None
    if kind == ESCALATED:
        new["escalated"] = True
        new["escalated_at_ms"] = at_ms
        transition = ESCALATED
    else:
        transition = EVENT_STATUS[kind]
        new["status"] = transition
        if kind == ACK:
            new["acknowledged_by"] = actor
            new["acknowledged_at_ms"] = at_ms
        else:
            new["closed_at_ms"] = at_ms
            new["closed_by"] = actor
            new["reason_code"] = reason_code
        if event.get("note"):
            new["note"] = event["note"]
        if event.get("corrected_event_id"):
            new["corrected_event_id"] = event["corrected_event_id"]
    new["history"] = [*state["history"], {"at_ms": at_ms, "status": transition, "actor": actor,
                                          "reason_code": reason_code}]
    return Change(state=new, transition=transition, at_ms=at_ms, actor=actor)


# -- the clock -----------------------------------------------------------------------------
def breached(state: Mapping[str, Any], now_ms: int) -> bool:
    """Still open (nobody acknowledged) at the SLA deadline, and not yet escalated."""
    return (state["status"] == OPEN and not state["escalated"]
            and now_ms >= state["sla_deadline_ms"])


def overdue(state: Mapping[str, Any], now_ms: int) -> bool:
    """Neither resolved nor waived by its expiry age."""
    return state["status"] in ACTIVE and now_ms >= state["expires_at_ms"]


def due_events(states: Iterable[Mapping[str, Any]], now_ms: int) -> list[dict[str, Any]]:
    """What the clock raises now: expiries, and escalations of breached SLAs.

    Event ids are deterministic, so a repeated tick (a restart) is recognisable.
    """
    out = []
    for s in states:
        exception_id = s["exception_id"]
        if overdue(s, now_ms):
            out.append(lifecycle_event(
                EXPIRED, exception_id, actor=MANAGER, at_ms=now_ms,
                reason_code="EXPIRED", event_id=f"{exception_id}:expired",
                note=f"neither resolved nor waived within "
                     f"{(s['expires_at_ms'] - s['opened_at_ms']) / 3_600_000:.1f} h",
            ))
        elif breached(s, now_ms):
            out.append(lifecycle_event(
                ESCALATED, exception_id, actor=MANAGER, at_ms=now_ms, to=s["backup_owner"],
                event_id=f"{exception_id}:escalated",
                note=f"{s['severity']} SLA breached: not acknowledged by {s['owner']} within "
                     f"{(s['sla_deadline_ms'] - s['opened_at_ms']) / 60_000:g} min",
            ))
    return out


# -- queries ---------------------------------------------------------------------------------
def current_owner(state: Mapping[str, Any]) -> str:
    """Who should act now: the backup owner once escalated."""
    return str(state["backup_owner"] if state["escalated"] else state["owner"])


def select(states: Iterable[Mapping[str, Any]], *, now_ms: int, owner: str | None = None,
           severity: str | None = None, statuses: Iterable[str] = ACTIVE,
           check: str | None = None, min_age_ms: int | None = None,
           order_id: str | None = None) -> list[Mapping[str, Any]]:
    """Filter for ``revline exceptions list``: most severe, then oldest, first.

    ``owner`` matches the owner and, once escalated, the backup owner too;
    ``check`` is a glob (``policy.*``); age counts from opening.
    """
    wanted = set(statuses)
    out = [
        s for s in states
        if s["status"] in wanted
        and (owner is None or s["owner"] == owner
             or (s["escalated"] and s["backup_owner"] == owner))
        and (severity is None or s["severity"] == severity)
        and (check is None or fnmatchcase(s["check_id"], check))
        and (min_age_ms is None or now_ms - s["opened_at_ms"] >= min_age_ms)
        and (order_id is None or s["order_id"] == order_id)
    ]
    return sorted(out, key=lambda s: (s["severity"], s["opened_at_ms"], s["exception_id"]))


def audit_kind(transition: str) -> str:
    """The audit-fact kind of a transition (see ``revline.core.auditlog.LIFECYCLE``)."""
    return f"exception_{transition}"
