"""CLI commands: index rebuild|status (the operators' read model, ``revline.sinks.read_model``)."""

from __future__ import annotations

import argparse
import time
from typing import Any

from revline.core.settings import Settings


def register(sub: Any) -> None:
    """Add this module's commands to the ``revline`` parser (``sub``: its subparsers)."""
    p = sub.add_parser(
        "index", help="the read model the operator commands query: rebuild it from the topics",
        description="The auditor and the exception manager keep indexed tables (audit records, "
        "exception states, outcomes per hour) in the ledger's database; `audit ORDER_ID`, "
        "`exceptions list|show` and `report` query them. The topics stay the source of truth: "
        "`rebuild` empties the tables and fills them again from the audit, heads, outcomes and "
        "exception-state topics.")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = actions.add_parser("rebuild", help="empty the read-model tables and refill them from "
                           "the topics (stop the auditor and the exception manager first)")
    a.add_argument("--force", action="store_true",
                   help="rebuild even though an auditor or exception manager is running "
                        "(what they write meanwhile may be lost until their next restart)")
    a.set_defaults(func=cmd_rebuild)
    a = actions.add_parser("status", help="row counts of the read-model tables")
    a.set_defaults(func=cmd_status)


def _running(settings: Settings, bootstrap: str) -> list[str]:
    from confluent_kafka.admin import AdminClient

    from revline.core.admin import live_members
    from revline.core.kafka_config import client_config

    admin = AdminClient(client_config("admin", bootstrap, {"log_level": 3}, settings=settings))
    out: list[str] = []
    for group in (f"{settings.app_id}-auditor", f"{settings.app_id}-exceptions"):
        out.extend(f"{group}: {m}" for m in live_members(admin, group))
    return out


def cmd_rebuild(args: argparse.Namespace, settings: Settings) -> int:
    from revline.cli import _progress, bootstrap_for, console
    from revline.core.errors import ConfigurationError
    from revline.sinks.read_model import ReadModel, rebuild

    bootstrap = bootstrap_for(settings, start_if_missing=False)
    running = _running(settings, bootstrap)
    if running and not args.force:
        raise ConfigurationError(
            "stop the auditor and the exception manager before rebuilding the read model "
            f"(they write to it): {'; '.join(running)} (or pass --force)")
    started = time.monotonic()
    model = ReadModel.for_settings(settings)  # migrates: an old database gets the tables
    try:
        with _progress() as progress:
            def track(label: str, total: int | None) -> Any:
                task = progress.add_task(f"reading {label}", total=total)
                return lambda n: progress.update(task, completed=n)

            counts = rebuild(model, bootstrap, settings, progress=track)
    finally:
        model.close()
    console.print(
        f"Read model rebuilt from the topics in {time.monotonic() - started:.1f} s: "
        f"{counts.audit_records:,} audit records, {counts.chain_heads:,} chain heads, "
        f"{counts.outcomes_counted:,} final outcomes counted, "
        f"{counts.exception_states:,} exception states"
        + (f" ({counts.unreadable:,} unreadable records skipped)" if counts.unreadable else "")
        + ".", markup=False)
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    import sqlalchemy as sa

    from revline.cli import console
    from revline.sinks.ledger._schema import READ_MODEL_ALL
    from revline.sinks.read_model import ReadModel, ReadModelUnavailable

    try:
        model = ReadModel.for_query(settings)
    except ReadModelUnavailable as exc:
        console.print(f"No read model: {exc}. Start the components with this version, or run "
                      "`revline index rebuild`.", markup=False)
        return 1
    try:
        with model.read() as conn:
            for table in READ_MODEL_ALL:  # every table of every revision, counts too
                n = conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
                console.print(f"{table.name:<20} {n:>12,}", markup=False)
    finally:
        model.close()
    return 0
