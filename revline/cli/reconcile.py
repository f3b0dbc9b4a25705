"""CLI commands: ``reconcile``, ``shadow run``, ``shadow parity``.

``revline reconcile`` reads the validated topic (what the stream concluded) and
compares it with the ledger (``REVLINE_LEDGER_DSN``) and, when Tryton is configured,
the ERP, per order, event type and currency and per record; it opens one
``reconciliation.drift`` exception per drifted order (once: re-runs skip those already
open), records a ``reconcile`` audit fact and exits 1 when it found drift.

``revline shadow run`` is a second sink with its own ledger, ERP, consumer group and
exceptions topic; ``revline shadow parity`` compares its ledger with the primary's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from revline.core.kafka_config import producer_config
from revline.core.settings import Settings


def register(sub: Any) -> None:
    """Add this module's commands to the ``revline`` parser (``sub``: its subparsers)."""
    from revline.cli import COUNT, PORT, POSITIVE, _bounded_float, _instance_name

    p = sub.add_parser(
        "reconcile",
        help="compare the validated stream with the ledger and the ERP per order, event "
        "type and currency: drift %% of the money, the orders that differ, one exception "
        "per drifted order; exit 1 on drift",
    )
    _window_args(p)
    p.add_argument("--json", metavar="FILE", help="also write the full report as JSON")
    p.add_argument("--no-exceptions", action="store_true",
                   help="report only: open no reconciliation.drift exceptions (the audit "
                   "fact is still recorded; the exit code still says whether there is drift)")
    p.add_argument("--ledger-only", action="store_true", help="do not read the ERP")
    p.add_argument("--limit", type=COUNT, default=50,
                   help="drifted orders and records listed on screen (default 50)")
    p.set_defaults(func=cmd_reconcile)

    p = sub.add_parser("shadow", help="a shadow sink beside the primary, and its parity %%")
    shadow = p.add_subparsers(dest="shadow_command", required=True, metavar="run|parity")
    r = shadow.add_parser("run", help="apply the validated topic to a shadow ledger and ERP")
    r.add_argument("--ledger", metavar="DSN", help="default: REVLINE_SHADOW_LEDGER_DSN")
    r.add_argument("--erp", choices=["memory", "tryton"], help="default: REVLINE_SHADOW_ERP")
    r.add_argument("--tryton-url", help="default: REVLINE_SHADOW_TRYTON_URL")
    r.add_argument("--group", help="consumer group (default: <app id>-shadow-sink)")
    r.add_argument("--exceptions-topic", help="default: REVLINE_SHADOW_EXCEPTIONS_TOPIC")
    r.add_argument("--batch-size", type=POSITIVE, default=500)
    r.add_argument("--instance", type=_instance_name,
                   help="this shadow sink's stable name (static group "
                        "membership; default REVLINE_INSTANCE_ID or the host)")
    r.add_argument("--metrics-port", type=PORT, default=9104,
                   help="/metrics with its heartbeat (0 = any free port, -1 = none; "
                        "default 9104)")
    r.set_defaults(func=cmd_shadow_run)
    q = shadow.add_parser("parity", help="compare the shadow ledger with the primary ledger")
    q.add_argument("--ledger", metavar="DSN", help="the shadow ledger (REVLINE_SHADOW_LEDGER_DSN)")
    _window_args(q)
    q.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    q.add_argument("--min-parity", type=_bounded_float(0.0, 100.0),
                   help="exit 1 below this %% (default REVLINE_SHADOW_MIN_PARITY_PCT, 99.5)")
    q.add_argument("--limit", type=COUNT, default=50, help="differences listed (default 50)")
    q.set_defaults(func=cmd_shadow_parity)


def _window_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--period", help="2026-11 (month), 2026-W47 (ISO week) or 2026-11-24 (day)")
    p.add_argument("--since", metavar="YYYY-MM-DD", help="from this day (UTC), inclusive")
    p.add_argument("--until", metavar="YYYY-MM-DD", help="up to this day (UTC), exclusive")


# -- reconcile ---------------------------------------------------------------------------
def cmd_reconcile(args: argparse.Namespace, settings: Settings) -> int:
    import yaml

    from revline.cli import bootstrap_for, console, err_console, file_errors
    from revline.core.admin import ensure_topics
    from revline.core.auditlog import AuditLog
    from revline.sinks.ledger import load_posting_rules
    from revline.sinks.reconcile import audit_fact, open_exceptions, parse_window, reconcile

    window = parse_window(args.period, args.since, args.until)
    bootstrap = bootstrap_for(settings, start_if_missing=False)
    rules = load_posting_rules()
    stream = _read_stream(bootstrap, settings, rules)
    erp, erp_note = _erp_for_reconcile(settings, ledger_only=args.ledger_only)
    try:
        with _open_ledger(settings.ledger_url) as ledger:
            report = reconcile(stream, window, ledger, erp, erp_note=erp_note)
    finally:
        if erp is not None:
            erp.close()
    n = settings.input_partitions
    if not args.no_exceptions and report.drifted:
        ensure_topics(bootstrap, {settings.exceptions_topic: n})
        from confluent_kafka import Producer

        with file_errors(settings.rules_file, "REVLINE_RULES_FILE"):
            qa_rules = yaml.safe_load(settings.rules_file.read_text())
            sla_minutes = qa_rules.get("sla_minutes", {})
        producer = Producer(producer_config(settings, bootstrap))
        open_exceptions(report, bootstrap, producer, settings.exceptions_topic,
                        sla_minutes=sla_minutes,
                        rules_version=f"postings {rules.version}")  # fmt: skip
    ensure_topics(bootstrap, {settings.audit_facts_topic: n})
    audit = AuditLog.from_settings(settings, bootstrap)
    audit.record(audit_fact(report, actor="revline reconcile"))
    audit.flush()

    _print_report(report, args.limit, console)
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=1, default=str))
        err_console.print(f"[dim]Full report: {args.json}[/dim]")
    return 1 if report.drifted else 0


def _read_stream(bootstrap: str, settings: Settings, rules: Any) -> Any:
    from revline.cli import _progress, deserializer_for, err_console
    from revline.sinks.reconcile import committed_offsets, read_stream

    upto = committed_offsets(bootstrap, settings.sink_group_id, settings.validated_topic)
    if upto is None:
        err_console.print(f"[yellow]the sink group {settings.sink_group_id} has committed "
                          "nothing yet: every validated event is expected in the ledger[/yellow]")
    with _progress() as progress:
        task = progress.add_task(f"reading {settings.validated_topic}", total=None)
        view = read_stream(
            bootstrap, settings.validated_topic, deserializer_for(settings), rules,
            progress=lambda n: progress.update(task, completed=n), applied_upto=upto,
        )  # fmt: skip
    if view.in_flight:
        err_console.print(f"{view.in_flight:,} validated events are past what the sink "
                          f"({settings.sink_group_id}) has committed: in flight, not judged.")
    return view


def _open_ledger(url: str) -> Any:
    import sqlalchemy as sa

    from revline.core.errors import ConfigurationError
    from revline.sinks.ledger import SqlLedger

    # No migration: a reconciliation reads; a mistyped DSN must not create an empty ledger.
    ledger = SqlLedger(url, migrate=False)
    inspector = sa.inspect(ledger.engine)
    if not inspector.has_table("journals"):
        ledger.close()
        raise ConfigurationError(
            f"no ledger at {ledger!r} (no journals table): set REVLINE_LEDGER_DSN to the "
            "ledger the sink writes"
        )
    if "order_id" not in {c["name"] for c in inspector.get_columns("side_effects")}:
        ledger.close()
        raise ConfigurationError(
            f"the ledger at {ledger!r} predates per-order effect identity: start `revline "
            "sink` (or `revline run`) once to upgrade it in place, then reconcile"
        )
    return ledger


def _erp_for_reconcile(settings: Settings, *, ledger_only: bool) -> tuple[Any, str]:
    """(ERP adapter or None, why not)."""
    if ledger_only:
        return None, "not read (--ledger-only)"
    kind = settings.erp
    if kind == "auto":
        kind = "tryton" if settings.tryton_url else "memory"
    if kind == "memory" and settings.memory_erp_file is not None:
        from revline.sinks.erp import InMemoryErp, MemoryErpStore

        # Read as the sink's file stands (it may be appending): documents, no lock.
        return InMemoryErp(MemoryErpStore(journal=settings.memory_erp_file,
                                          read_only=True)), ""
    if kind == "memory":
        return None, (
            "not reconciled: the sink's ERP is the in-memory one, which lived inside the "
            "`revline sink` process and ended with it, so there is nothing left to read. "
            "Set REVLINE_MEMORY_ERP_FILE (the sink's file) or REVLINE_TRYTON_URL to "
            "reconcile the ERP."
        )
    from revline.sinks.erp import erp_from_settings

    return erp_from_settings(settings), ""


def _money(minor: int | None, currency: str) -> str:
    from revline.sinks.reconcile import fmt_minor

    return fmt_minor(minor, currency).removesuffix(f" {currency}") if currency else "—"


def _money_with(minor: int | None, currency: str) -> str:
    return "—" if minor is None else f"{_money(minor, currency)} {currency}".rstrip()


def _styled(text: str, style: str) -> str:
    return f"[{style}]{text}[/{style}]" if style else text


def _pct(value: float, differs: bool) -> str:
    """3 decimals; drift too small to show is never printed as 0.000."""
    text = f"{value:.3f}"
    return "<0.001" if differs and text == "0.000" else text


def _long_table(table: Any, columns: list[str], rows: list[list[str]],
                amounts: tuple[int, ...]) -> None:
    """Fill ``table``: amount columns never wrap nor cut (as wide as their widest cell);
    the label columns fold when the console is narrow."""
    from rich.text import Text

    for i, col in enumerate(columns):
        widest = max([len(Text.from_markup(r[i]).plain) for r in rows] + [len(col)])
        if i in amounts or col.endswith("%"):
            table.add_column(col, justify="right", no_wrap=True, min_width=widest)
        elif widest <= 8:  # a currency, a system: short, never folded
            table.add_column(col, no_wrap=True, min_width=widest)
        else:
            table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*row)


def _print_report(report: Any, limit: int, console: Any) -> None:
    from rich.table import Table

    w = report.window
    span = "all time" if w.start is None and w.end is None else (
        f"{w.start.date() if w.start else '…'} up to {w.end.date() if w.end else '…'}")
    console.print(
        f"[bold]Reconciliation[/bold] — period {w.label} ({span}): "
        f"{len(report.stream.in_window(w)):,} validated events in the period "
        f"({len(report.stream.records):,} on the topic), {len(report.orders):,} orders with money"
    )

    table = Table(title="Records by system of record")
    for col in ("system", "expected", "matched", "missing", "extra", "mismatched",
                "records drift %", "refused (owned)"):
        table.add_column(col, justify="left" if col == "system" else "right")
    for s in report.systems:
        if not s.reconciled:
            table.add_row(s.system, "—", "—", "—", "—", "—", "—", "—")
            continue
        style = "red" if s.drift_count else "green"
        table.add_row(s.system, f"{s.checked:,}", f"{s.matched:,}", f"{len(s.missing):,}",
                      f"{len(s.extra):,}", f"{len(s.mismatched):,}",
                      f"[{style}]{_pct(s.drift_pct, bool(s.drift_count))}[/{style}]",
                      f"{len(s.refused):,}")
    console.print(table)

    names = [sys.system for sys in report.reconciled]
    money = report.money()
    if money:
        # One row per currency and system (not a column group per system): a wide table
        # made rich cut amounts at 80 columns, and an amount is never shown cut.
        table = Table(title="Money by currency (major units; drift % = sum of |differences| "
                            "per order and event type / expected)")
        per_system = {name: report.money([name]) for name in names}
        table_rows: list[list[str]] = []
        for cur, total in money.items():
            for n, name in enumerate(names):
                m = per_system[name][cur]
                style = "red" if m.diff_minor else ""
                table_rows.append([
                    cur if n == 0 else "", "ERP" if name == "erp" else name,
                    _money(m.expected_minor, cur), _money(m.actual_minor, cur),
                    _styled(_money(m.diff_minor, cur), style),
                    _styled(_pct(m.drift_pct, bool(m.diff_minor)), style),
                    _styled(_pct(total.drift_pct, bool(total.diff_minor)),
                            "red" if total.diff_minor else "green") if n == 0 else "",
                ])
        _long_table(table, ["currency", "system", "expected", "holds", "|diff|", "drift %",
                            "all %"], table_rows, amounts=(2, 3, 4))
        console.print(table)

    cells = _merged_cells(report)
    if cells:
        table = Table(title="Money by event type, currency and period (major units)")
        table_rows = []
        for (etype, cur, period), row in sorted(cells.items()):
            stream_n, stream_minor = row["stream"]
            table_rows.append([etype, cur, period, "stream", f"{stream_n:,}",
                         _money(stream_minor, cur)])
            for name in names:
                n, minor = row.get(name, (0, 0))
                style = "" if (n, minor) == (stream_n, stream_minor) else "red"
                table_rows.append(["", "", "", "ERP" if name == "erp" else name,
                             _styled(f"{n:,}", style), _styled(_money(minor, cur), style)])
        _long_table(table, ["event type", "currency", "period", "system", "#", "amount"],
                    table_rows, amounts=(4, 5))
        console.print(table)

    drifted = report.drifted
    if drifted:
        shown = drifted[:limit]
        table = Table(title=f"Orders that differ ({len(drifted):,}; first {len(shown)}; "
                            "major units)")
        erp = "erp" in names
        for col in ("order", "event type", "currency", "expected", "ledger",
                    *(("ERP",) if erp else ()), "records"):
            table.add_column(col, overflow="fold",
                             justify="right" if col in ("expected", "ledger", "ERP") else "left")
        for o in shown:
            rows = list(o.differing.items()) or [(("", ""), None)]
            records = "; ".join(f"{i.system} {i.kind} {i.key}" for i in o.issues) or "—"
            for n, ((etype, cur), c) in enumerate(rows):
                if c is None:
                    cells_ = ["—", "—", "—", "—", *(("—",) if erp else ())]
                else:
                    ledger = _styled(_money(c.ledger_minor, cur), "red" if c.ledger_differs
                                     else "")
                    cells_ = [etype, cur, _money(c.expected_minor, cur), ledger]
                    if erp:
                        text = _money(c.erp_minor, cur)
                        if (c.erp_expected_minor, c.erp_expected_count) != (
                                c.expected_minor, c.expected_count):
                            text += f" (of {_money(c.erp_expected_minor, cur)})"
                        cells_.append(_styled(text, "red" if c.erp_differs else ""))
                table.add_row(o.order_id if n == 0 else "", *cells_,
                              records if n == 0 else "")
        console.print(table)

    issues = report.issues
    if issues:
        shown_n = min(limit, len(issues))
        table = Table(title=f"Records to look at ({len(issues):,}; first {shown_n})")
        for col in ("system", "kind", "order", "event", "idempotency key", "stream", "found",
                    "what is wrong"):
            table.add_column(col, overflow="fold")
        for i in issues[:limit]:
            table.add_row(i.system, i.kind, i.order_id or "—", i.event_type, i.key,
                          _money_with(i.expected_minor, i.currency),
                          _money_with(i.actual_minor, i.currency), i.detail)
        console.print(table)
    refused = [i for s in report.reconciled for i in s.refused]
    if refused:
        console.print(
            f"[dim]{len(refused):,} event(s) the sink refused are already owned exceptions "
            f"(not drift), e.g. {refused[0].system} {refused[0].key}: {refused[0].detail}[/dim]"
        )
    for s in report.systems:
        if not s.reconciled:
            console.print(f"[yellow]ERP {s.note}[/yellow]" if s.system == "erp"
                          else f"[yellow]{s.system}: {s.note}[/yellow]")
    for note in report.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    verdict = (f"[red]{len(drifted):,} order(s) differ, {len(issues):,} drift records[/red]"
               if drifted else "[green]no drift[/green]")
    opened = (f"; exceptions opened: {report.exceptions_opened} "
              f"({report.exceptions_known} already open)") if drifted else ""
    per_currency = ", ".join(f"{cur} {_pct(m.drift_pct, bool(m.diff_minor))} %"
                             for cur, m in money.items())
    console.print(
        f"Drift {_pct(report.drift_pct, any(m.diff_minor for m in money.values()))} % "
        "of the money"
        f"{f' ({per_currency})' if len(money) > 1 else ''} over {len(report.orders):,} "
        f"orders with money, {report.checked:,} expected records — {verdict} "
        f"(target ≤ 0.1 % per week){opened}."
    )


def _merged_cells(report: Any) -> dict[tuple[str, str, str], dict[str, tuple[int, int]]]:
    out: dict[tuple[str, str, str], dict[str, tuple[int, int]]] = {}
    for s in report.reconciled:
        for key, cell in s.cells.items():
            row = out.setdefault(key, {})
            # The stream side is the same event set for both systems; the ledger's
            # cells carry every money event, the ERP's only those with a money document.
            if "stream" not in row or s.system == "ledger":
                row["stream"] = (cell.stream_count, cell.stream_minor)
            row[s.system] = (cell.count, cell.minor)
    return out


# -- shadow -----------------------------------------------------------------------------
def cmd_shadow_run(args: argparse.Namespace, settings: Settings) -> int:
    import logging

    from revline.cli import (
        bootstrap_for,
        deserializer_for,
        err_console,
        mark_running,
        stop_on_signals,
    )
    from revline.core.admin import ensure_topics
    from revline.core.errors import ConfigurationError
    from revline.core.metrics import SinkMetrics
    from revline.sinks.erp import InMemoryErp, TrytonErp
    from revline.sinks.ledger import SqlLedger
    from revline.sinks.shadow import shadow_processor

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    dsn = args.ledger or settings.shadow_ledger_dsn
    if not dsn:
        raise ConfigurationError("the shadow run needs its own ledger: --ledger DSN or "
                                 "REVLINE_SHADOW_LEDGER_DSN")
    kind = args.erp or settings.shadow_erp
    erp: Any
    if kind == "memory":
        erp = InMemoryErp()
    elif kind == "tryton":
        url = args.tryton_url or settings.shadow_tryton_url
        if not url:
            raise ConfigurationError("a Tryton shadow ERP needs --tryton-url or "
                                     "REVLINE_SHADOW_TRYTON_URL")
        if settings.tryton_url and url.rstrip("/") == settings.tryton_url.rstrip("/"):
            raise ConfigurationError(f"the shadow ERP {url} is the primary's ERP; give the "
                                     "shadow its own Tryton")
        erp = TrytonErp(url, settings.tryton_database, settings.tryton_user,
                        settings.tryton_password)
    else:
        raise ConfigurationError(f"shadow ERP {kind!r}: use memory or tryton")
    # A long-running sink: it waits out a cold cluster as the primary sink does.
    bootstrap = bootstrap_for(settings, start_if_missing=False, one_shot=False)
    group = args.group or settings.shadow_group or f"{settings.app_id}-shadow-sink"
    topic = args.exceptions_topic or settings.shadow_exceptions_topic
    ensure_topics(bootstrap, {topic: settings.input_partitions})
    stop = stop_on_signals(log_setup=False)
    metrics = SinkMetrics()
    where = ""
    if args.metrics_port >= 0:
        where = f"; metrics on :{metrics.serve(args.metrics_port, settings.metrics_host)}/metrics"
    with SqlLedger(dsn) as ledger:
        processor = shadow_processor(
            bootstrap, settings.validated_topic, ledger=ledger, erp=erp, group=group,
            exceptions_topic=topic, decoder=deserializer_for(settings),
            batch_size=args.batch_size, settings=settings, instance=args.instance,
            metrics=metrics,
            primary=[("ledger", settings.ledger_url),
                     ("consumer group", settings.sink_group_id),
                     ("exceptions topic", settings.exceptions_topic)],
        )  # fmt: skip
        err_console.print(
            f"shadow sink: {settings.validated_topic} → ledger {ledger!r}, ERP {kind}; group "
            f"{group}; refusals → {topic}{where}. Compare with `revline shadow parity`."
        )
        mark_running()
        processor.run(stop)
    return 0


def cmd_shadow_parity(args: argparse.Namespace, settings: Settings) -> int:
    from rich.table import Table

    from revline.cli import bootstrap_for, console, err_console
    from revline.core.errors import ConfigurationError
    from revline.sinks.ledger import load_posting_rules
    from revline.sinks.reconcile import parse_window
    from revline.sinks.shadow import ledger_parity

    dsn = args.ledger or settings.shadow_ledger_dsn
    if not dsn:
        raise ConfigurationError("which shadow ledger? --ledger DSN or REVLINE_SHADOW_LEDGER_DSN")
    window = parse_window(args.period, args.since, args.until)
    threshold = args.min_parity if args.min_parity is not None else settings.shadow_min_parity_pct
    bootstrap = bootstrap_for(settings, start_if_missing=False)
    rules = load_posting_rules()
    stream = _read_stream(bootstrap, settings, rules)
    with _open_ledger(settings.ledger_url) as primary, _open_ledger(dsn) as shadow:
        report = ledger_parity(stream, primary, shadow, rules, window)

    table = Table(title=f"Shadow parity — period {window.label}: primary vs shadow ledger")
    for col in ("event type", "compared", "identical", "parity %"):
        table.add_column(col, justify="left" if col == "event type" else "right")
    for etype, p in sorted(report.by_type.items()):
        style = "green" if p.parity_pct >= threshold else "red"
        table.add_row(etype, f"{p.compared:,}", f"{p.equal:,}",
                      f"[{style}]{p.parity_pct:.3f}[/{style}]")
    table.add_row("[bold]all[/bold]", f"{report.compared:,}", f"{report.equal:,}",
                  f"[bold]{report.parity_pct:.3f}[/bold]")
    console.print(table)
    if report.differences:
        diff = Table(title=f"Differences ({len(report.differences):,}; first "
                           f"{min(args.limit, len(report.differences))})")
        for col in ("event", "idempotency key", "period", "primary", "shadow"):
            diff.add_column(col, overflow="fold")
        for d in report.differences[: args.limit]:
            diff.add_row(d.event_type, d.key, d.period, d.primary, d.shadow)
        console.print(diff)
    ok = report.parity_pct >= threshold
    verdict = "[green]meets[/green]" if ok else "[red]is below[/red]"
    console.print(f"Parity {report.parity_pct:.3f} % over {report.compared:,} events {verdict} "
                  f"the {threshold} % target.")
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=1))
        err_console.print(f"[dim]Full report: {args.json}[/dim]")
    return 0 if ok else 1


__all__ = ["register"]
