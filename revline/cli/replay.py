"""CLI commands: replay, redrive."""

from __future__ import annotations

import argparse
import os
from typing import Any

from revline.core.settings import Settings


def register(sub: Any) -> None:
    """Add this module's commands to the ``revline`` parser (``sub``: its subparsers)."""
    from revline.cli import COUNT, SECONDS

    p = sub.add_parser(
        "replay",
        help="reset a consumer group's offsets to a time or offset, so it reads again",
        description="Reset a stopped consumer group's committed offsets (the sink's group, "
        "<app id>-sink, or a downstream consumer). The sink recognises everything it already "
        "applied, so a replay changes neither ledger nor ERP. Refused while the group has "
        "live members, and for the stream worker's own group.",
    )
    p.add_argument("--group", required=True, help="consumer group to reset")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--to-datetime", metavar="T",
                        help="first record at or after T: ISO 8601 (no zone = UTC) or a "
                        "duration ago (30m, 2h, 7d)")
    target.add_argument("--to-offset", metavar="earliest|latest|N",
                        help="earliest, latest, or offset N in every selected partition")
    p.add_argument("--topic", action="append", default=[],
                   help="only this topic (repeatable; default: the group's committed topics)")
    p.add_argument("--partition", type=COUNT, action="append", default=[],
                   help="only this partition (repeatable)")
    p.add_argument("--dry-run", action="store_true",
                   help="print current → new offsets per partition; change nothing")
    p.add_argument("--actor", help="who replays, for the audit trail (default: $USER)")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser(
        "redrive",
        help="send dead-lettered or excepted records back to the input topic",
        description="Send dead letters or exceptions back to the input topic, key and headers "
        "preserved, to be judged again (after a reference-data or schema fix, say). Each "
        "record is re-driven once per source record; a record re-driven more than "
        "REVLINE_REDRIVE_MAX times goes to the quarantine topic instead. Audited.",
    )
    p.add_argument("--source", required=True, choices=["deadletter", "exceptions"])
    p.add_argument("--reason", action="append", default=[],
                   help="check id, dead-letter stage, error class or reason containing this "
                   "(case-insensitive; repeatable)")
    p.add_argument("--order", action="append", default=[], help="order id (repeatable)")
    p.add_argument("--exception-id", action="append", default=[],
                   help="exception id, or dlq:<topic>/<partition>/<offset> (repeatable)")
    p.add_argument("--since", metavar="T",
                   help="dead-lettered / opened at or after T (ISO 8601 or 2h, 7d ago)")
    p.add_argument("--until", metavar="T", help="... and before T")
    p.add_argument("--limit", type=COUNT, help="at most this many records")
    p.add_argument("--all", action="store_true",
                   help="no filter needed: every eligible record of the source")
    p.add_argument("--rate", type=SECONDS, default=50.0,
                   help="records per second (default 50; 0 = no limit)")
    p.add_argument("--dry-run", action="store_true", help="show what would be sent; send nothing")
    p.add_argument("--actor", help="who re-drives, for the audit trail (default: $USER)")
    p.set_defaults(func=cmd_redrive)


def _actor(args: argparse.Namespace) -> str:
    if args.actor:
        return str(args.actor)
    try:
        import getpass

        return os.environ.get("USER") or getpass.getuser()
    except (OSError, KeyError):  # no passwd entry in some containers
        return "unknown"


def cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    from rich.table import Table
    from rich.text import Text

    from revline.cli import bootstrap_for, console
    from revline.operations.replay import ReplayTarget, refuse_worker_group, replay

    refuse_worker_group(settings, args.group)  # before touching Kafka: the answer is fixed
    target = ReplayTarget.parse(args.to_offset, args.to_datetime)
    bootstrap = bootstrap_for(settings, start_if_missing=False)
    result = replay(settings, bootstrap, args.group, target, topics=args.topic,
                    partitions=args.partition, dry_run=args.dry_run, actor=_actor(args))
    title = f"{'Dry run — ' if result.dry_run else ''}group {result.group} → {target.describe()}"
    table = Table(title=Text(title))
    for column in ("topic", "partition", "current", "new", "change", "note"):
        table.add_column(column, justify="right" if column in ("partition", "current", "new")
                         else "left")
    for m in result.moves:
        change = (f"re-read {m.rereads:,}" if m.rereads else
                  f"skip {m.skips:,}" if m.skips else "unchanged")
        table.add_row(*(Text(str(v)) for v in (
            m.topic, m.partition, "—" if m.current is None else m.current, m.new, change,
            m.note)))
    console.print(table)
    if result.dry_run:
        console.print(f"Dry run: nothing changed; {result.rereads:,} records would be read again. "
                      f"Audited as {result.fact_id}.", markup=False)
    else:
        console.print(f"Reset {len(result.moves)} partitions of group {result.group}: "
                      f"{result.rereads:,} records will be read again when it resumes. "
                      f"Audited as {result.fact_id}.", markup=False)
    return 0


def _redrive_table(result: Any, width: int) -> Any:
    """What a re-drive selected (and where it went): every cell is data, never markup."""
    from rich.table import Table
    from rich.text import Text

    from revline.operations.redrive import QUARANTINE
    from revline.operations.replay import format_ms

    table = Table(title=Text(f"{'Dry run — ' if result.dry_run else ''}re-drive from "
                             f"{result.topic} ({result.matched} matching, "
                             f"{len(result.selected)} selected)"))
    wide = width >= 120  # reason and time only where they fit
    table.add_column("source", overflow="fold")  # copied into --exception-id
    table.add_column("order", overflow="fold")
    table.add_column("check / stage", overflow="fold")
    if wide:
        table.add_column("reason", max_width=40, overflow="ellipsis", no_wrap=True)
        table.add_column("at (UTC)", no_wrap=True)
    table.add_column("re-drives")
    table.add_column("would go to" if result.dry_run else "sent to")
    for c in result.selected:
        where = Text("quarantine", style="yellow") if c.action == QUARANTINE else Text("input")
        if c.target:
            where.append(" " + "/".join(c.target.rsplit("/", 2)[1:]))
        count = f"{c.count}→{c.new_count}" if c.action != QUARANTINE else f"{c.count} (max)"
        if not c.headers_preserved:
            count += " (no headers)"  # the original input is gone: nothing to copy
        extra = [str(c.reason), format_ms(c.at_ms)[:16].replace("T", " ")] if wide else []
        table.add_row(*(Text(str(v)) for v in (c.source_id, c.order_id or "—", c.check, *extra,
                                               count)), where)
    return table


def _render_check(table: Any) -> None:
    """Render once into nothing: whatever cannot be shown fails here, before sending."""
    import io

    from rich.console import Console

    from revline.cli import console

    Console(file=io.StringIO(), width=console.width).print(table)


def cmd_redrive(args: argparse.Namespace, settings: Settings) -> int:
    from rich.progress import TaskID
    from rich.text import Text

    from revline.cli import _progress, bootstrap_for, console, err_console
    from revline.operations.redrive import RedriveFilter, redrive
    from revline.operations.replay import OperationRefusedError, parse_when

    filters = RedriveFilter(
        reasons=tuple(args.reason), orders=tuple(args.order),
        exception_ids=tuple(args.exception_id),
        since_ms=parse_when(args.since) if args.since else None,
        until_ms=parse_when(args.until) if args.until else None,
        limit=args.limit,
    )
    if filters.selects_all and not args.all:
        raise OperationRefusedError(
            "no filter given: name --reason, --order, --exception-id or --since/--until, or "
            "pass --all to re-drive every eligible record of the source (try --dry-run first)"
        )
    if args.limit is not None and args.limit < 0:
        raise OperationRefusedError("--limit must be 0 or more")
    bootstrap = bootstrap_for(settings, start_if_missing=False)
    with _progress() as progress:
        tasks: dict[str, TaskID] = {}

        def report(phase: str, done: int, total: int | None) -> None:
            if phase not in tasks:
                tasks[phase] = progress.add_task(phase, total=total)
            progress.update(tasks[phase], completed=done, total=total)

        result = redrive(settings, bootstrap, args.source, filters, actor=_actor(args),
                         dry_run=args.dry_run, rate=args.rate, progress=report,
                         prepare=lambda r: _render_check(_redrive_table(r, console.width)))
    console.print(_redrive_table(result, console.width))
    for why, n in sorted(result.skipped.items()):
        err_console.print(Text(f"skipped {n}: {why}", style="dim"), soft_wrap=True)
    redriven, quarantined = len(result.redriven), len(result.quarantined)
    if result.dry_run:
        console.print(f"Dry run: nothing sent. {redriven} would be re-driven to "
                      f"{settings.input_topic}, {quarantined} quarantined "
                      f"(REVLINE_REDRIVE_MAX={settings.redrive_max}).", markup=False)
    else:
        console.print(f"Re-drove {redriven} records to {settings.input_topic}; quarantined "
                      f"{quarantined} in {settings.quarantine_topic}. Run {result.run_id}, "
                      f"audited ({len(result.fact_ids)} facts).", markup=False)
    return 0
