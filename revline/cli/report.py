"""CLI commands: report (the Monday-morning operations report)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

    from revline.core.settings import Settings
    from revline.operations.report import OperationsReport


def register(sub: Any) -> None:
    """Add this module's commands to the ``revline`` parser (``sub``: its subparsers)."""
    p = sub.add_parser(
        "report",
        help="operations report: open exceptions, SLA, QA failures, overrides, latency, drift",
    )
    p.add_argument("--since", default="7d",
                   help="start of the period: 7d, 36h, 2w, 90m, or a date/time such as "
                        "2026-11-17 or 2026-11-17T08:00Z (UTC) (default: 7d)")
    p.add_argument("--html", metavar="FILE", help="also write a self-contained HTML page here")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace, settings: Settings) -> int:
    from revline.cli import (
        _progress,
        bootstrap_for,
        console,
        writable_file,
    )
    from revline.core.errors import ConfigurationError
    from revline.operations.report import ReportTopics, collect, parse_since

    now_ms = int(time.time() * 1000)
    try:
        since_ms = parse_since(args.since, now_ms)
    except (OverflowError, ValueError, OSError):  # a date datetime cannot hold
        since_ms = -1
    if since_ms < 0:
        raise ConfigurationError(f"--since {args.since!r} reaches back before 1970: give a "
                                 "shorter duration or a later date")
    if since_ms > now_ms:
        raise ConfigurationError(f"--since {args.since!r} is in the future")
    html = Path(args.html) if args.html else None
    if html is not None:
        if "\x00" in str(html):
            raise ConfigurationError(f"--html {str(html)!r}: a path cannot hold a NUL "
                                     "character")
        if html.parent and not html.parent.exists():
            try:
                html.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigurationError(f"--html {html}: cannot create {html.parent} "
                                         f"({exc.strerror or exc})") from exc
        writable_file(html, "--html")
    report = _from_read_model(settings, since_ms=since_ms, now_ms=now_ms)
    if report is not None:
        print_report(report, console)
        _write_html(report, html)
        return 0
    bootstrap = bootstrap_for(settings, start_if_missing=False)
    with _progress() as progress:
        tasks: dict[str, Any] = {}

        def track(label: str) -> Any:
            tasks[label] = progress.add_task(f"reading {label}", total=None)
            return lambda n: progress.update(tasks[label], completed=n)

        report = collect(bootstrap, ReportTopics.from_settings(settings), since_ms=since_ms,
                         now_ms=now_ms, deserializer=_deserializer(settings),
                         check_specs=_check_specs(settings), progress=track)
    print_report(report, console)
    _write_html(report, html)
    return 0


def _write_html(report: OperationsReport, html: Path | None) -> None:
    from revline.cli import err_console, write_output

    if html is not None:
        from revline.operations.report_html import render_html

        page = render_html(report)
        write_output(html, "--html", lambda p: p.write_text(page, encoding="utf-8"))
        err_console.print(f"HTML report written to {html} (open it in any browser)",
                          markup=False)


def _from_read_model(settings: Settings, *, since_ms: int, now_ms: int,
                     ) -> OperationsReport | None:
    """The report from the read model, or None (said in one line) to read the topics."""
    from revline.cli import err_console
    from revline.operations.report import collect_from_read_model
    from revline.sinks.ledger._schema import outcomes_counted
    from revline.sinks.read_model import ReadModel, ReadModelUnavailable

    try:
        model = ReadModel.for_query(settings)
    except ReadModelUnavailable as exc:
        err_console.print(f"read model unavailable ({exc}); reading the topics in full (run "
                          "`revline index rebuild`).", markup=False)
        return None
    try:
        if not model.has_rows(outcomes_counted):
            err_console.print("the read model holds no outcomes yet; reading the topics in "
                              "full (run `revline index rebuild` once).", markup=False)
            return None
        return collect_from_read_model(model, since_ms=since_ms, now_ms=now_ms,
                                       check_specs=_check_specs(settings))
    finally:
        model.close()


def _deserializer(settings: Settings) -> Any:
    from revline.cli import deserializer_for

    return deserializer_for(settings)


def _check_specs(settings: Settings) -> dict[str, tuple[str, str]]:
    """Severity and owner per check from the QA rules (for checks seen only as warnings)."""
    from revline.cli import file_errors
    from revline.processors import load_yaml
    from revline.processors.reference import Rules

    with file_errors(settings.rules_file, "REVLINE_RULES_FILE"):
        rules = Rules.from_mapping(load_yaml(settings.rules_file))
    return {c: (s.severity, s.owner) for c, s in rules.checks.items()}


def _row(t: Any, *cells: Any) -> None:
    """A table row of data: text cells are shown literally, never read as markup."""
    from rich.text import Text

    t.add_row(*(Text(c) if isinstance(c, str) else c for c in cells))


def print_report(r: OperationsReport, console: Console) -> None:
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    from revline.operations.report import (
        AGE_BUCKETS,
        DRIFT_TARGET_PCT,
        SEVERITIES,
        SEVERITY_LABELS,
        fmt_duration,
        fmt_money,
        fmt_pct,
        fmt_time,
        owner_label,
        period_label,
    )

    def table(title: str, *columns: str, right: int = 1) -> Table:
        t = Table(title=title, title_justify="left", title_style="bold")
        for i, col in enumerate(columns):
            t.add_column(col, justify="right" if i >= right else "left")
        return t

    def show(t: Table, *lines: str) -> None:
        """The table, or one line saying there is nothing; then its footnotes."""
        if t.row_count:
            console.print(t)
        else:
            console.print(Text.assemble((str(t.title), "bold"), ": none"))
        for line in lines:
            console.print(Text(f"  {line}", style="dim"))

    f, oe, d, lat, ov = r.flow, r.open_exceptions, r.duplicates, r.latency, r.overrides
    console.print(f"[bold]Revline operations report[/bold] — "
                  f"{period_label(r.since_ms, r.generated_at_ms)}")

    t = table("Summary", "figure", "value")
    _row(t, "events processed", f"{f.inputs:,}")
    _row(t, "  validated / exceptions / duplicates / dead letters",
              f"{f.validated:,} / {f.exceptions:,} / {f.duplicates:,} / {f.dead_letters:,}")
    _row(t, "delivery success (not dead-lettered)", fmt_pct(f.delivery_success_pct, 2))
    _row(t, "open exceptions (past SLA)", f"{oe.total:,} ({oe.overdue:,})")
    _row(t, "SLA compliance (opened this period)", fmt_pct(r.sla_compliance_pct))
    _row(t, "duplicates prevented", f"{d.prevented:,}")
    _row(t, "trigger → outcome p50 / p95", f"{fmt_duration(lat.p50_ms)} / "
              f"{fmt_duration(lat.p95_ms)}")
    rec = r.reconciliation
    _row(t, "reconciliation drift",
              "not run" if rec is None or rec.drift_pct is None
              else f"{rec.drift_pct:.3g} % (target ≤ {DRIFT_TARGET_PCT} %)")
    console.print(t)

    t = table("Open exceptions by owner and age", "owner",
              *[label for _, label in AGE_BUCKETS], *SEVERITIES, "total", "past SLA", "oldest")
    for row in oe.by_owner:
        if row.total:
            _row(t, owner_label(row.owner), *[f"{v:,}" for v in row.by_age],
                      *[f"{v:,}" for v in row.by_severity], f"{row.total:,}",
                      f"{row.overdue:,}", fmt_duration(row.oldest_age_ms))
    held = ", ".join(fmt_money(v, c) for c, v in oe.amounts)
    show(t, f"source: {r.exceptions_source}", *([f"money held up: {held}"] if held else []))

    t = table("SLA compliance (exceptions opened this period)", "severity", "SLA", "opened",
              "in time", "breached", "pending", "compliance", "median close", "p95 close")
    for s in r.sla:
        if s.opened:
            _row(t, SEVERITY_LABELS.get(s.severity, s.severity), fmt_duration(s.target_ms),
                      f"{s.opened:,}", f"{s.met:,}", f"{s.breached:,}", f"{s.pending:,}",
                      fmt_pct(s.compliance_pct), fmt_duration(s.p50_close_ms),
                      fmt_duration(s.p95_close_ms))
    show(t)

    t = table(f"QA failure rates by check ({r.judged:,} events judged)", "check", "severity",
              "owner", "failures", "rate", "warnings", right=3)
    for q in r.qa:
        _row(t, q.check_id, q.severity, owner_label(q.owner), f"{q.failures:,}",
                  f"{q.rate_pct:.2f} %", f"{q.warnings:,}")
    show(t)

    t = table("Manual overrides (made this period or still in force)", "override", "order",
              "check", "reason code", "by", "expires", "flags", right=99)
    for o in ov.items:
        flags = [x for x, on in (("expired", o.expired(r.generated_at_ms)),
                                 ("NO REASON", o.reasonless)) if on]
        _row(t, o.override_id, o.order_id, o.check_id, o.reason_code or "—", o.actor,
                  fmt_time(o.expires_at_ms), ", ".join(flags))
    reasons = ", ".join(f"{c}: {n}" for c, n in ov.by_reason) or "none"
    raised = ", ".join(f"{c}: {n}" for c, n in ov.exceptions_by_check) or "none"
    show(t, f"by reason code: {reasons}",
         f"refused by the pipeline (no reason code, actor, check or target): {ov.refused}",
         f"exceptions about overrides: {raised}")

    t = table("Duplicates prevented", "event type", "duplicates")
    for event_type, n in d.by_event_type:
        _row(t, event_type, f"{n:,}")
    show(t, f"total {d.prevented:,}; conflicting re-sends held as exceptions: "
            f"{d.conflicts:,}; invoices validated: {d.invoices:,}")

    t = table("Trigger-to-outcome latency", "percentile", "latency")
    for label, value in (("p50", lat.p50_ms), ("p90", lat.p90_ms), ("p95", lat.p95_ms),
                         ("p99", lat.p99_ms), ("max", lat.max_ms)):
        _row(t, label, fmt_duration(value))
    if lat.count:
        show(t, f"{lat.count:,} events; validated ones decided within 24 h: "
                f"{fmt_pct(lat.within_target_pct)}")
    else:
        console.print(f"[bold]{t.title}[/bold]: none")

    if rec is None:
        console.print("[bold]Reconciliation drift[/bold]: not run (no reconcile fact yet)")
    else:
        t = table("Reconciliation drift (latest run)", "figure", "value")
        _row(t, "run at", fmt_time(rec.at_ms))
        _row(t, "period", rec.period or "—")
        _row(t, "drift", "—" if rec.drift_pct is None else f"{rec.drift_pct:.3g} %")
        for label, value in (("checked", rec.checked), ("missing", rec.missing),
                             ("extra", rec.extra), ("mismatched", rec.mismatched)):
            _row(t, label, "—" if value is None else f"{value:,}")
        console.print(t)
    for note in r.notes:
        console.print(f"[yellow]note:[/yellow] {escape(str(note))}")


__all__ = ["argparse", "print_report", "register"]
