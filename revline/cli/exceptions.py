"""CLI commands: exceptions run|list|show|ack|resolve|waive, override."""

from __future__ import annotations

import argparse
import json
import re
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from rich.markup import escape

from revline.core.errors import RevlineError
from revline.core.money import format_money
from revline.core.settings import Settings

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d|w)$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}

# Findings an override cannot drop: they are not QA verdicts on the event's content,
# so the fix is elsewhere (fix and re-drive the dependency, wait for it, resend).
NOT_OVERRIDABLE = {
    "dependency.blocked": "fix the event it depends on (override or correct it), then re-drive "
                          "this one",
    "hold.timeout": "publish what it waits for, or correct the event's references",
    "dedup.conflict": "a different body under an existing idempotency key is never applied; "
                      "send the change under a new key",
    "qa.internal_error": "a check crashed; fix the check and re-drive",
    "reconciliation.drift": "the ledger or ERP holds other money than the stream implies; fix "
                            "the record there, then run `revline reconcile` again",
}

_STATUS_CHOICES = ("active", "open", "acknowledged", "resolved", "waived", "expired", "closed",
                   "all")


class CommandRefusedError(RevlineError):
    """An operator command that cannot be carried out as given; the message says why."""


# A span beyond this is a typo, not a plan (and overflows datetime arithmetic).
MAX_DURATION_MS = 100 * 366 * 86_400_000


def parse_duration_ms(text: str, *, flag: str = "duration") -> int:
    match = _DURATION.match(text.strip().lower())
    if not match:
        raise CommandRefusedError(
            f"cannot read the {flag} {text!r}: give a positive number and a unit, e.g. 90s, "
            "30m, 2h, 7d, 1w"
        )
    ms = float(match.group(1)) * _UNIT_S[match.group(2)] * 1000
    if ms > MAX_DURATION_MS:
        raise CommandRefusedError(f"the {flag} {text!r} is longer than 100 years")
    return int(ms)


def parse_time(text: str) -> datetime:
    """ISO 8601; no zone means UTC."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise CommandRefusedError(
            f"cannot read the time {text!r}: give ISO 8601, e.g. 2026-12-01T00:00:00Z "
            "(no zone means UTC)"
        ) from None
    moment = moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    try:
        moment.astimezone(UTC).timestamp()
    except (OverflowError, ValueError, OSError):
        raise CommandRefusedError(f"the time {text!r} is out of range") from None
    return moment


def _utc(ms: int | None) -> str:
    if ms is None:
        return "—"
    try:
        return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    except (OverflowError, ValueError, OSError):  # a value from data, out of datetime's range
        return f"{ms} ms"


def _age(ms: int, now_ms: int) -> str:
    seconds = max(0, (now_ms - ms) // 1000)
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86_400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86_400}d{seconds % 86_400 // 3600:02d}h"


def _now_ms() -> int:
    return int(time.time() * 1000)


# -- parsers -----------------------------------------------------------------------------
def register(sub: Any) -> None:
    """Add this module's commands to the ``revline`` parser (``sub``: its subparsers)."""
    from revline.cli import COUNT, SECONDS, _instance_name

    p = sub.add_parser(
        "exceptions", help="owned exceptions with SLAs: run the manager, list, show, ack, "
        "resolve, waive",
        description="Every failed check is an exception with an owner, a severity and an SLA "
        "(time to acknowledge). `run` is the manager (one per pipeline); the other commands "
        "read the exception-state topic and send lifecycle events to it.",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    a = actions.add_parser("run", help="the exception manager: ownership, state, SLA timers, "
                           "escalation, expiry (one instance per pipeline)")
    a.add_argument("--instance", type=_instance_name,
                   help="this manager's stable name (static group membership; "
                        "default REVLINE_INSTANCE_ID or the host)")
    a.set_defaults(func=cmd_run)

    a = actions.add_parser("list", help="exceptions, most severe and oldest first")
    a.add_argument("--owner", choices=["revenue_ops", "finance", "integrations"],
                   help="owned by, or escalated to, this owner")
    a.add_argument("--severity", choices=["P1", "P2", "P3"])
    a.add_argument("--status", action="append", choices=_STATUS_CHOICES,
                   help="repeatable; default active (open and acknowledged)")
    a.add_argument("--check", metavar="CHECK_ID", help="check id or glob, e.g. 'policy.*'")
    a.add_argument("--older-than", metavar="AGE", help="opened at least this long ago (2h, 3d)")
    a.add_argument("--order", metavar="ORDER_ID")
    a.add_argument("--limit", type=COUNT, default=200)
    a.add_argument("--json", action="store_true", help="one JSON state per line")
    a.set_defaults(func=cmd_list)

    a = actions.add_parser("show", help="one exception: state and history")
    a.add_argument("exception_id", metavar="EXCEPTION_ID")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_show)

    for name, help_text in (("ack", "acknowledge: you own it now (stops the SLA clock)"),
                            ("resolve", "fixed; optionally with a corrected event"),
                            ("waive", "accepted as is; nothing to fix")):
        a = actions.add_parser(name, help=help_text)
        a.add_argument("exception_id", metavar="EXCEPTION_ID")
        a.add_argument("--actor", required=True, help="who (e.g. ana@example.com)")
        if name != "ack":
            a.add_argument("--reason-code", required=True, help="why, e.g. SOURCE_FIXED")
        a.add_argument("--note", help="free text for the audit trail")
        if name == "resolve":
            a.add_argument("--corrected-event", metavar="FILE.json",
                           help="a corrected canonical event (JSON, as for `revline publish`): "
                           "it re-enters the pipeline linked to this exception")
        a.add_argument("--wait", type=SECONDS, default=10.0,
                       help="seconds to wait for the manager to apply it (default 10; 0 = don't)")
        a.set_defaults(func=cmd_transition, kind=name)

    p = sub.add_parser(
        "override",
        help="let one held or failed event pass one check (reason code, actor, expiry)",
        description="Publish a manual_override event to the input topic. While it is active, "
        "the named check's findings on the event with --target-key are dropped when that event "
        "is judged: a held event on release; a failed one when re-driven (revline redrive). "
        "Audited; expires.",
    )
    p.add_argument("--exception", metavar="EXCEPTION_ID",
                   help="take order, target key and check from this exception")
    p.add_argument("--order", metavar="ORDER_ID")
    p.add_argument("--target-key", metavar="IDEMPOTENCY_KEY",
                   help="idempotency key of the event to let pass")
    p.add_argument("--check", metavar="CHECK_ID", help="the check it may pass")
    p.add_argument("--reason-code", required=True)
    p.add_argument("--actor", required=True)
    expiry = p.add_mutually_exclusive_group(required=True)
    expiry.add_argument("--expires", metavar="ISO8601", help="e.g. 2026-12-01T00:00:00Z")
    expiry.add_argument("--expires-in", metavar="DURATION", help="e.g. 24h, 7d")
    p.add_argument("--note")
    p.add_argument("--override-id", help="default: a new OVR-… id")
    p.set_defaults(func=cmd_override)


# -- run ---------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    """The manager, until SIGTERM/SIGINT."""

    from revline.cli import bootstrap_for, mark_running, stop_on_signals
    from revline.cli.rules import _load_ownership
    from revline.streams.exceptions import run_manager

    # Its ownership rules first: a bad file is one line naming it, before any broker wait.
    _load_ownership(settings.ownership_file, "REVLINE_OWNERSHIP_FILE")
    stop = stop_on_signals()
    bootstrap = bootstrap_for(settings, start_if_missing=True)
    mark_running()  # its start-up and batches watch the stop event from here
    run_manager(settings, bootstrap, stop, instance=args.instance)
    return 0


# -- list / show -------------------------------------------------------------------------
def _states(settings: Settings) -> tuple[str, dict[str, dict[str, Any]]]:
    from revline.cli import bootstrap_for
    from revline.streams.exceptions import read_states

    bootstrap = bootstrap_for(settings, start_if_missing=False)
    return bootstrap, read_states(bootstrap, settings.exception_state_topic)


def _read_model(settings: Settings) -> Any:
    """The read model, or None (said in one line) when it cannot answer: the caller
    reads the exception-state topic instead."""
    from revline.cli import err_console
    from revline.sinks.ledger._schema import exception_states
    from revline.sinks.read_model import ReadModel, ReadModelUnavailable

    try:
        model = ReadModel.for_query(settings)
    except ReadModelUnavailable as exc:
        err_console.print(f"[yellow]read model unavailable[/yellow] ({escape(str(exc))}); reading "
                          f"{escape(settings.exception_state_topic)} (run `revline index "
                          "rebuild`).", highlight=False)
        return None
    if not model.has_rows(exception_states):
        model.close()
        err_console.print("[yellow]the read model holds no exception states yet[/yellow]; "
                          f"reading {escape(settings.exception_state_topic)}.", highlight=False)
        return None
    return model


def _one_state(settings: Settings, exception_id: str) -> tuple[str | None, dict[str, Any]]:
    """(bootstrap if the topic was read, the state) of one exception; refused if unknown."""
    model = _read_model(settings)
    if model is not None:
        try:
            state = model.state(exception_id)
        finally:
            model.close()
        if state is not None:
            return None, state
    bootstrap, states = _states(settings)
    return bootstrap, _lookup(states, exception_id, settings)


def _statuses(chosen: list[str] | None) -> tuple[str, ...]:
    from revline.processors.exception_lifecycle import ACTIVE, CLOSED, STATUSES

    out: list[str] = []
    for name in chosen or ["active"]:
        out.extend({"active": ACTIVE, "closed": CLOSED, "all": STATUSES}.get(name, (name,)))
    return tuple(out)


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    from revline.cli import console, err_console
    from revline.processors.exception_lifecycle import current_owner, select

    min_age_ms = (parse_duration_ms(args.older_than, flag="--older-than")
                  if args.older_than else None)  # before reading: a typo costs no wait
    now = _now_ms()
    model = _read_model(settings)
    rows: list[Any]
    if model is not None:  # indexed: the cost is the page shown, not the history
        try:
            rows, matched, total = model.select_states(
                now_ms=now, owner=args.owner, severity=args.severity,
                statuses=_statuses(args.status), check=args.check, order_id=args.order,
                min_age_ms=min_age_ms, limit=args.limit)
        finally:
            model.close()
    else:
        _, states = _states(settings)
        rows = select(
            states.values(), now_ms=now, owner=args.owner, severity=args.severity,
            statuses=_statuses(args.status), check=args.check, order_id=args.order,
            min_age_ms=min_age_ms,
        )
        matched, total = len(rows), len(states)
    if not total:
        err_console.print(f"No exceptions in {escape(settings.exception_state_topic)} yet (is "
                          "`revline exceptions run` running?).")
    if args.json:
        for state in rows[: args.limit]:
            print(json.dumps(state))
        return 0
    # Plain aligned columns, never cropped: ids must survive a narrow terminal intact.
    lines = [("ID", "SEV", "OWNER", "STATUS", "AGE", "SLA", "CHECK", "ORDER", "REASON")]
    for s in rows[: args.limit]:
        sla = (f"breached→{s['backup_owner']}" if s["escalated"]
               else f"due {_utc(s['sla_deadline_ms'])}" if s["status"] == "open"
               else "met" if s["status"] == "acknowledged" else "—")
        lines.append((s["exception_id"], s["severity"], current_owner(s), s["status"],
                      _age(s["opened_at_ms"], now), sla, s["check_id"], s["order_id"] or "—",
                      s["reason"]))
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]) - 1)]
    console.print(f"Exceptions: {matched} of {total} match", style="bold")
    for line in lines:
        console.print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=False))
                      + "  " + line[-1], soft_wrap=True, markup=False, highlight=False)
    if matched > args.limit:
        err_console.print(f"[dim]{matched - args.limit} more; raise --limit or filter[/dim]")
    return 0


def _lookup(states: Mapping[str, dict[str, Any]], exception_id: str,
            settings: Settings) -> dict[str, Any]:
    state = states.get(exception_id)
    if state is None:
        raise CommandRefusedError(
            f"no exception {exception_id} in {settings.exception_state_topic}: find its id with "
            "`revline exceptions list --status all`; a new one appears once "
            "`revline exceptions run` has read it"
        )
    return state


def cmd_show(args: argparse.Namespace, settings: Settings) -> int:
    from rich.table import Table
    from rich.text import Text

    from revline.cli import console

    _, s = _one_state(settings, args.exception_id)
    if args.json:
        print(json.dumps(s, indent=2, sort_keys=True))
        return 0
    now = _now_ms()
    table = Table(title=Text(f"Exception {s['exception_id']}"), show_header=False)
    table.add_column("field")
    table.add_column("value", overflow="fold")
    rows = [
        ("status", s["status"] + (f" (escalated to {s['backup_owner']} at "
                                  f"{_utc(s['escalated_at_ms'])})" if s["escalated"] else "")),
        ("check", f"{s['check_id']} ({s['severity']})"),
        ("owner / backup", f"{s['owner']} / {s['backup_owner']}"),
        ("opened", f"{_utc(s['opened_at_ms'])} ({_age(s['opened_at_ms'], now)} ago)"),
        ("SLA deadline", _utc(s["sla_deadline_ms"])),
        ("expires", _utc(s.get("expires_at_ms"))),
        ("order / key", f"{s['order_id']} / {s['idempotency_key']}"),
        ("event", f"{s['event_type']} from {s['source_system']}"
                  + (f", {format_money(s['amount_minor'], s['currency'])}"
                     if s["amount_minor"] is not None else "")),
        ("input", "{topic}/{partition}/{offset}".format(**s["input"])),
        ("reason", s["reason"]),
        ("rules / ownership", f"{s['rules_version']} / {s['ownership_version']}"
                              + (f" (rule {s['ownership_rule']})" if s.get("ownership_rule")
                                 else "")),
    ]
    if s["status"] in ("resolved", "waived", "expired"):
        rows.append(("closed", f"{_utc(s['closed_at_ms'])} by {s['closed_by']}, reason code "
                               f"{s['reason_code']}"))
    if s.get("note"):
        rows.append(("note", s["note"]))
    if s.get("corrected_event_id"):
        rows.append(("corrected event", s["corrected_event_id"]))
    for field, value in rows:
        table.add_row(field, Text(str(value)))  # values are data: never markup
    console.print(table)
    history = Table(title="History")
    for column in ("time (UTC)", "status", "actor", "reason code"):
        history.add_column(column)
    for h in s["history"]:
        history.add_row(*(Text(str(v)) for v in (_utc(h["at_ms"]), h["status"], h["actor"],
                                                 h.get("reason_code") or "")))
    console.print(history)
    return 0


# -- ack / resolve / waive ---------------------------------------------------------------
def cmd_transition(args: argparse.Namespace, settings: Settings) -> int:
    from revline.cli import bootstrap_for, console, err_console, readable_file
    from revline.processors.exception_lifecycle import (
        EVENT_STATUS,
        event_error,
        lifecycle_event,
        transition_error,
    )
    from revline.streams.exceptions import end_offsets, send_lifecycle_events, wait_for_state

    kind = args.kind
    corrected = getattr(args, "corrected_event", None)
    if corrected:  # before anything is read: a typo costs no wait
        readable_file(Path(corrected), "one canonical event as a JSON file",
                      "--corrected-event")
    read, state = _one_state(settings, args.exception_id)
    bootstrap = read or bootstrap_for(settings, start_if_missing=False)
    problem = transition_error(state, kind)
    if problem is not None:
        raise CommandRefusedError(f"{problem}; nothing sent (see `revline exceptions show "
                                  f"{args.exception_id}`)")
    event = lifecycle_event(kind, args.exception_id, actor=args.actor, at_ms=_now_ms(),
                            reason_code=getattr(args, "reason_code", None), note=args.note)
    problem = event_error(event)
    if problem is not None:
        raise CommandRefusedError(f"{problem}; nothing sent")
    correction = _checked_correction(Path(corrected), state) if corrected else None
    if correction is not None:
        event["corrected_event_id"] = str(correction["envelope"]["event_id"])
    start = end_offsets(bootstrap, settings.exception_state_topic)
    # The resolution goes first: once the correction passes, the worker resolves the
    # exception itself, and that must not overtake the person's resolution.
    send_lifecycle_events(settings, bootstrap, [event])
    if correction is not None:
        _publish_correction(correction, state, settings, bootstrap)
        console.print(f"Corrected event {event['corrected_event_id']} published to "
                      f"{settings.input_topic}, linked to {args.exception_id}.", markup=False)
    target = EVENT_STATUS[kind]
    applied = wait_for_state(bootstrap, settings.exception_state_topic, args.exception_id, start,
                             lambda s: s["status"] == target, args.wait)
    if applied is None:
        err_console.print(
            f"[yellow]{kind} sent for {escape(args.exception_id)}, but the manager has not "
            f"applied it within {args.wait:g}s[/yellow]: it will when `revline exceptions run` "
            "is running (check with `revline exceptions show`)."
        )
        return 0
    console.print(f"{args.exception_id} is now {applied['status']} (by {args.actor}"
                  + (f", reason code {applied['reason_code']}" if kind != "ack" else "") + ").",
                  markup=False)
    return 0


def _checked_correction(path: Path, state: Mapping[str, Any]) -> dict[str, Any]:
    """The corrected event, validated like `revline publish` and checked against the exception."""
    from revline.schemas import EventValidationError, validate_event

    try:
        raw = json.loads(path.read_text())
    except OSError as exc:
        raise CommandRefusedError(f"cannot read {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise CommandRefusedError(f"{path} is not JSON: {exc.msg} at line {exc.lineno}, column "
                                  f"{exc.colno} (give one canonical event as a JSON object)"
                                  ) from exc
    except (UnicodeDecodeError, RecursionError) as exc:  # binary, or nested beyond reason
        raise CommandRefusedError(f"{path} is not JSON text a person wrote "
                                  f"({type(exc).__name__}): give one canonical event as a "
                                  "JSON object") from exc
    try:
        event = validate_event(raw)
    except EventValidationError as exc:
        raise CommandRefusedError(f"{path}: " + "; ".join(exc.problems) + "; nothing sent") \
            from exc
    env = event["envelope"]
    if env["order_id"] != state["order_id"]:
        raise CommandRefusedError(
            f"{path} is for order {env['order_id']!r} but {state['exception_id']} is about "
            f"order {state['order_id']!r}; a correction must be for the same order"
        )
    if str(state["check_id"]).startswith("sink.") and \
            env["idempotency_key"] == state["idempotency_key"]:
        raise CommandRefusedError(
            f"{state['exception_id']} was raised by the sink after the pipeline validated "
            f"{env['idempotency_key']!r}, so a correction under the same key would be a "
            "duplicate: give the corrected event a new idempotency key"
        )
    return event


def _publish_correction(event: Mapping[str, Any], state: Mapping[str, Any], settings: Settings,
                        bootstrap: str) -> None:
    """Into the input topic with the re-entry header naming the exception."""
    from revline.cli import serializer_for
    from revline.core.admin import ensure_topics
    from revline.operations.publisher import Publisher
    from revline.processors.engine import REENTRY_HEADER

    ensure_topics(bootstrap, {settings.input_topic: settings.input_partitions})
    with Publisher(bootstrap, settings.input_topic, settings=settings,
                   serializer=serializer_for(settings)) as publisher:
        publisher.publish(event, headers=[(REENTRY_HEADER, str(state["exception_id"]).encode())],
                          validate=False)


# -- override ----------------------------------------------------------------------------
def cmd_override(args: argparse.Namespace, settings: Settings) -> int:
    from revline.cli import bootstrap_for, console, file_errors, serializer_for
    from revline.core.admin import ensure_operations_topics, ensure_topics
    from revline.core.auditlog import AuditFact, AuditLog
    from revline.operations.publisher import Publisher
    from revline.processors.reference import Rules, load_yaml
    from revline.schemas import EventValidationError, validate_event

    # The expiry first: a typo in it is refused before anything is read or sent.
    now = datetime.now(UTC)
    expires = (parse_time(args.expires) if args.expires
               else now + timedelta(milliseconds=parse_duration_ms(args.expires_in,
                                                                   flag="--expires-in")))
    if expires.year > 9000:  # isoformat round trips and epoch ms must still work
        raise CommandRefusedError(f"--expires {expires.isoformat()} is too far in the future")
    if expires <= now:
        raise CommandRefusedError(f"--expires {expires.isoformat()} is in the past; an override "
                                  "must expire in the future")
    with file_errors(settings.rules_file, "REVLINE_RULES_FILE"):  # before any broker wait
        rules = Rules.from_mapping(load_yaml(settings.rules_file))
    bootstrap = bootstrap_for(settings, start_if_missing=False)
    order, target, check = args.order, args.target_key, args.check
    if args.exception:
        from revline.streams.exceptions import read_states

        state = _lookup(read_states(bootstrap, settings.exception_state_topic), args.exception,
                        settings)
        order = order or state["order_id"]
        target = target or state["idempotency_key"]
        check = check or state["check_id"]
    missing = [flag for flag, value in (("--order", order), ("--target-key", target),
                                        ("--check", check)) if not value]
    if missing:
        raise CommandRefusedError(f"give {', '.join(missing)} (or --exception EXCEPTION_ID to "
                                  "take them from an exception)")
    if check in NOT_OVERRIDABLE or str(check).startswith("override."):
        why = NOT_OVERRIDABLE.get(check, "overrides themselves cannot be overridden")
        raise CommandRefusedError(f"{check} cannot be overridden: {why}")
    if check not in rules.checks:
        known = ", ".join(c for c in sorted(rules.checks)
                          if c not in NOT_OVERRIDABLE and not c.startswith("override."))
        raise CommandRefusedError(f"unknown check {check!r} (rules {rules.version}); one of: "
                                  f"{known}")
    if not args.reason_code.strip():
        raise CommandRefusedError("--reason-code is empty; every override needs a reason code")
    override_id = args.override_id or f"OVR-{uuid.uuid4().hex[:12]}"
    raw = {
        "envelope": {
            "event_type": "manual_override",
            "idempotency_key": f"{order}:override:{override_id}",
            "order_id": order,
            "sequence": 0,
            "occurred_at": now.isoformat(),
            "source_system": "revline-cli",
            "source_record_id": override_id,
        },
        "override_id": override_id,
        "target_idempotency_key": target,
        "check_id": check,
        "reason_code": args.reason_code,
        "actor": args.actor,
        "expires_at": expires.isoformat(),
        "note": args.note,
    }
    try:
        event = validate_event(raw)
    except EventValidationError as exc:
        raise CommandRefusedError("; ".join(exc.problems) + "; nothing sent") from exc
    ensure_topics(bootstrap, {settings.input_topic: settings.input_partitions})
    ensure_operations_topics(bootstrap, settings)
    with Publisher(bootstrap, settings.input_topic, settings=settings,
                   serializer=serializer_for(settings)) as publisher:
        publisher.publish(event, validate=False)
    audit = AuditLog.from_settings(settings, bootstrap)
    audit.record(AuditFact(
        fact_id=f"{override_id}:override", kind="override", actor=args.actor, order_id=order,
        detail={"override_id": override_id, "target_idempotency_key": target, "check_id": check,
                "reason_code": args.reason_code, "expires_at": expires.isoformat(),
                "note": args.note, "event_id": event["envelope"]["event_id"],
                "exception_id": args.exception},
    ))
    audit.flush()
    console.print(
        f"Override {override_id} published to {settings.input_topic}: {target} may pass {check} "
        f"until {expires.strftime('%Y-%m-%d %H:%M:%SZ')}. It applies when that event is judged: "
        "a held one on release; one that already failed when re-driven "
        "(`revline redrive --source exceptions --exception-id EX-…`).", markup=False,
    )
    return 0


__all__ = ["CommandRefusedError", "parse_duration_ms", "register"]
