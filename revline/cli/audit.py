"""CLI commands: auditor, audit ORDER_ID, audit verify."""

from __future__ import annotations

import argparse
import csv
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from revline.core.redact import csv_safe_row
from revline.core.settings import Settings

if TYPE_CHECKING:
    from revline.processors.audit_chain import VerifyReport

# Detail keys shown in their own column (or folded into "what happened").
_SHOWN = frozenset({"event_type", "order_id", "rules_version", "check_id", "reason", "note",
                    "exception_id", "severity", "owner", "waiting_for", "released_by", "warnings",
                    "stage", "adapter", "external_refs", "event_id", "occurred_at_ms",
                    "source_line", "idempotency_key", "input", "detail", "reason_code"})


def register(sub: Any) -> None:
    """Add this module's commands to the ``revline`` parser (``sub``: its subparsers)."""
    from revline.cli import COUNT, PORT, POSITIVE, _instance_name

    p = sub.add_parser("auditor",
                       help="chain outcomes and audit facts into the hash-chained audit trail")
    p.add_argument("--instance", default="0", type=_instance_name,
                   help="stable id of this chainer (its Kafka transactional id); give every "
                        "auditor running at the same time its own, and keep it across restarts")
    p.add_argument("--batch-size", type=POSITIVE, default=500,
                   help="source records per transaction (default 500)")
    p.add_argument("--metrics-port", type=PORT, default=9102,
                   help="/metrics port (0 = any free port, -1 = none; default 9102)")
    # Tests only: SIGKILL itself inside batch N's transaction, after its records are sent.
    p.add_argument("--failpoint-kill-before-commit", type=COUNT, metavar="N",
                   help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_auditor)

    p = sub.add_parser("audit",
                       help="an order's audit timeline (audit ORDER_ID) or check every chain "
                            "(audit verify)")
    p.add_argument("target", metavar="ORDER_ID|verify",
                   help="an order id (its chain; _operations for operator runs), or verify")
    p.add_argument("--json", metavar="FILE", help="timeline: also export the records as JSON")
    p.add_argument("--csv", metavar="FILE", help="timeline: also export the records as CSV")
    p.add_argument("--order", metavar="ORDER_ID", help="verify: only this order's chain")
    p.add_argument("--from-topic", action="store_true",
                   help="timeline: read the audit topic in full instead of the read model "
                        "(the forensic path; `audit verify` always reads the topic)")
    p.set_defaults(func=cmd_audit)


# -- auditor ---------------------------------------------------------------------------
def cmd_auditor(args: argparse.Namespace, settings: Settings) -> int:
    """Chain until SIGTERM/SIGINT; a batch in flight is finished or aborted, never half-written."""

    from revline.cli import bootstrap_for, mark_running, stop_on_signals
    from revline.streams.audit import run_auditor

    stop = stop_on_signals()
    bootstrap = bootstrap_for(settings, start_if_missing=True)
    mark_running()  # its start-up and batches watch the stop event from here
    run_auditor(settings, bootstrap, stop, instance=args.instance, batch_size=args.batch_size,
                metrics_port=None if args.metrics_port < 0 else args.metrics_port,
                kill_before_commit=args.failpoint_kill_before_commit)
    return 0


# -- audit ORDER_ID / audit verify -----------------------------------------------------
def cmd_audit(args: argparse.Namespace, settings: Settings) -> int:
    if args.target == "verify":
        return _verify(args.order, settings)
    if args.order:
        from revline.core.errors import ConfigurationError

        raise ConfigurationError("--order goes with `revline audit verify`; for one order's "
                                 "timeline give its id: revline audit ORDER_ID")
    from revline.cli import writable_file

    # Checked before the (long) read of the audit topic.
    for flag, given in (("--json", args.json), ("--csv", args.csv)):
        if given:
            writable_file(Path(given), flag)
    return _timeline(args.target, settings, json_path=args.json, csv_path=args.csv,
                     from_topic=args.from_topic)


def _from_read_model(order: str, settings: Settings,
                     ) -> tuple[VerifyReport, list[dict[str, Any]]] | None:
    """The chain's records from the read model, verified from the rows; None when the
    read model cannot answer (missing or empty tables: the caller reads the topic)."""
    from revline.cli import err_console
    from revline.processors.audit_chain import ChainVerifier, parse_record
    from revline.sinks.ledger._schema import audit_records
    from revline.sinks.read_model import ReadModel, ReadModelUnavailable

    try:
        model = ReadModel.for_query(settings)
    except ReadModelUnavailable as exc:
        err_console.print(f"[yellow]read model unavailable[/yellow] ({exc}); reading "
                          f"{settings.audit_topic} in full (run `revline index rebuild`).",
                          markup=True, highlight=False)
        return None
    try:
        rows = model.chain_records(order)
        if not rows and not model.has_rows(audit_records):
            err_console.print(f"[yellow]the read model holds no audit records yet[/yellow]; "
                              f"reading {settings.audit_topic} in full (run `revline index "
                              "rebuild` once).", highlight=False)
            return None
        heads = {chain: (head.seq, head.hash)
                 for chain, (_, head) in model.heads_for([order]).items()}
    finally:
        model.close()
    verifier = ChainVerifier(heads, only_chain=order)
    kept: list[dict[str, Any]] = []
    for raw, where in rows:
        value = raw.encode()
        record, _ = parse_record(value)
        partition = int(where.rsplit("/", 2)[-2]) if where.count("/") >= 2 else 0
        verifier.add(value, order.encode(), partition, where)
        if record is not None:
            kept.append({**record, "_where": where})
    return verifier.report(), kept


def _read(settings: Settings, only_chain: str | None, description: str,
          keep: bool, chained: dict[str, set[str]] | None = None,
          ) -> tuple[VerifyReport, list[dict[str, Any]]]:
    """Verify the audit topic (or one chain of it), keeping that chain's records if asked.

    Reads the whole topic per query: fine at today's volumes; a per-order index
    (or reading only the chain's partition) is the next step when it is not.
    """
    from revline.cli import _progress, bootstrap_for
    from revline.core.readback import CommittedReader
    from revline.processors.audit_chain import ChainVerifier, parse_record
    from revline.streams.audit import head_summaries

    bootstrap = bootstrap_for(settings, start_if_missing=False)
    # Heads first: records are only ever added after them, so none can be missing.
    heads = head_summaries(bootstrap, settings.audit_heads_topic)
    if only_chain is not None:
        heads = {k: v for k, v in heads.items() if k == only_chain}
    verifier = ChainVerifier(heads, only_chain=only_chain)
    kept: list[dict[str, Any]] = []
    with CommittedReader(bootstrap, settings.audit_topic) as reader, _progress() as progress:
        task = progress.add_task(description, total=reader.total or None)
        for count, msg in enumerate(reader, start=1):
            where = f"{msg.topic()}/{msg.partition()}/{msg.offset()}"
            verifier.add(msg.value(), msg.key(), msg.partition() or 0, where)
            if keep or chained is not None:
                record, _ = parse_record(msg.value())
                if record is not None and chained is not None:
                    chained.setdefault(record["chain"], set()).add(record["fact_id"])
                if keep and record is not None and record["chain"] == only_chain:
                    kept.append({**record, "_where": where})
            if count % 500 == 0:
                progress.update(task, completed=count)
    return verifier.report(), kept


def _verify(order: str | None, settings: Settings) -> int:
    from rich.markup import escape

    from revline.cli import bootstrap_for, console, err_console
    from revline.streams.audit import expected_fact_ids

    chained: dict[str, set[str]] = {}
    report, _ = _read(settings, order, f"verifying {settings.audit_topic}", keep=False,
                      chained=chained)
    # Completeness beside integrity: every committed outcome and fact must be chained.
    # Intact chains that stopped growing (a stalled auditor) are not a complete trail.
    expected = expected_fact_ids(bootstrap_for(settings, start_if_missing=False), settings,
                                 only_chain=order)
    missing = {chain: ids - chained.get(chain, set()) for chain, ids in expected.items()}
    missing = {chain: ids for chain, ids in missing.items() if ids}
    total = sum(len(ids) for ids in expected.values())
    absent = sum(len(ids) for ids in missing.values())
    scope = escape(f"chain {order}" if order else settings.audit_topic)
    if absent:
        for chain in sorted(missing)[:20]:
            ids = sorted(missing[chain])
            err_console.print(f"[yellow]not chained[/yellow] {escape(chain)}: {len(ids):,} "
                              f"(first: {escape(ids[0])})")
        console.print(f"[red]NOT complete[/red]: {absent:,} of {total:,} source entries are "
                      f"not chained yet in {scope} (the auditor is behind or stopped; "
                      f"revline_audit_lag_records shows how far).")
    completeness = (f"complete: all {total:,} source entries chained" if not absent else
                    f"{total - absent:,} of {total:,} source entries chained")
    if report.ok:
        if order and not report.records:
            err_console.print(f"No audit records for order {escape(order)} in "
                              f"{settings.audit_topic}.")
            return 1
        console.print(f"[green]verified[/green]: {_count(report.chains, 'chain')}, "
                      f"{_count(report.records, 'record')} in {scope}; every hash and link is "
                      f"intact; {completeness}.")
        return 1 if absent else 0
    for link in report.broken[:50]:
        err_console.print(f"[red]broken[/red] {escape(str(link))}")
    if len(report.broken) > 50:
        err_console.print(f"… and {len(report.broken) - 50} more broken chains")
    console.print(f"[red]NOT verified[/red]: {len(report.broken)} of {report.chains:,} chains "
                  f"broken ({report.records:,} records read in {scope}); each line above names "
                  "the chain's first broken link.")
    return 1


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def _timeline(order: str, settings: Settings, *, json_path: str | None,
              csv_path: str | None, from_topic: bool = False) -> int:
    from rich.markup import escape
    from rich.table import Table

    from revline.cli import console, err_console, write_output

    found = None if from_topic else _from_read_model(order, settings)
    source = f"{settings.audit_topic} (read in full)"
    if found is None:
        report, records = _read(settings, order, f"reading {escape(settings.audit_topic)}",
                                keep=True)
    else:
        report, records = found
        source = "the read model"
    if not records:
        hint = ("" if found is None else "; if it was chained just now or the read model "
                "lags, `--from-topic` reads the topic")
        err_console.print(f"No audit records for order {escape(order)} in {escape(source)}"
                          f"{escape(hint)}.")
        return 1
    records.sort(key=lambda r: r["seq"])
    broken_at = {link.where for link in report.broken}
    table = Table(title=escape(f"Audit trail of order {order} ({len(records)} records)"))
    for column in ("#", "time (UTC)", "what happened", "by", "rules / check", "references"):
        table.add_column(column, overflow="fold")
    for record in sorted(records, key=lambda r: (r["at_ms"], r["seq"])):
        what, rules, refs = describe(record)
        seq = str(record["seq"])
        if record["_where"] in broken_at:  # the record verify names: show which row it is
            seq = f"[red]{seq} ✗[/red]"
        table.add_row(seq, escape(utc(record["at_ms"])),
                      *(escape(text) for text in (what, str(record["actor"]), rules, refs)))
    console.print(table)
    if report.ok:
        console.print(f"[green]chain verified[/green]: seq 1–{escape(str(records[-1]['seq']))}, "
                      f"head hash {escape(str(records[-1]['hash']))}")
    else:
        for link in report.broken:
            err_console.print(f"[red]chain NOT verified[/red]: {escape(str(link))}")
        if found is not None:
            err_console.print("(verified from the read model's rows; `revline audit verify "
                              f"--order {escape(order)}` checks the topic itself, and "
                              "`revline index rebuild` re-reads it into the read model)")
    if json_path:
        write_output(Path(json_path), "--json",
                     lambda path: _export_json(path, order, records, report))
        console.print(f"Wrote {json_path}", markup=False)
    if csv_path:
        write_output(Path(csv_path), "--csv", lambda path: _export_csv(path, records))
        console.print(f"Wrote {csv_path}", markup=False)
    return 0 if report.ok else 1


def utc(at_ms: int) -> str:
    try:
        return (time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(at_ms / 1000))
                + f".{at_ms % 1000:03d}Z")
    except (OverflowError, ValueError, OSError, TypeError):  # out of range: show the number
        return f"{at_ms} ms"


def describe(record: Mapping[str, Any]) -> tuple[str, str, str]:
    """(what happened, rules version / check, references) in words a finance lead reads."""
    d: Mapping[str, Any] = record.get("detail") or {}
    kind = str(record["kind"])
    event = d.get("event_type") or "event"
    reason = d.get("reason") or d.get("note") or ""
    what = {
        "received": f"received {event}",
        "held": f"held {event}: waiting for {', '.join(d.get('waiting_for') or []) or '?'}",
        "released": ("hold timed out" if d.get("released_by") == "timeout"
                     else f"released {event}: what it waited for arrived"),
        "validated": f"{event} passed QA" + (
            f" with warnings ({', '.join(d['warnings'])})" if d.get("warnings") else ""),
        "duplicate": f"duplicate {event} recognised, not applied again",
        "exception_opened": (f"exception opened: {d.get('check_id')} {d.get('severity') or ''}"
                             f" → {d.get('owner') or '?'}"),
        "dead_letter": f"dead-lettered ({d.get('stage') or '?'}): cannot be read as an event",
        "applied": f"applied to {d.get('adapter') or 'a sink'}",
        "refused": f"refused by {d.get('adapter') or 'a sink'}",
        "partial": f"partially applied to {d.get('adapter') or 'a sink'}",
    }.get(kind, kind.replace("_", " "))
    if reason and kind not in ("received", "validated"):
        what += f": {reason}"
    elif isinstance(d.get("detail"), str) and d["detail"] and d["detail"] != kind:
        what += f" ({d['detail']})"
    if d.get("reason_code"):
        what += f" [reason code {d['reason_code']}]"
    rules = " / ".join(str(x) for x in (d.get("rules_version"), d.get("check_id")) if x)
    refs: list[str] = []
    if d.get("exception_id"):
        refs.append(f"exception {d['exception_id']}")
    external = d.get("external_refs")
    if isinstance(external, Mapping):
        refs.extend(f"{k} {v}" for k, v in sorted(external.items()))
    if d.get("released_by") and d["released_by"] != "timeout":
        refs.append(f"released by input {d['released_by']}")
    refs.extend(f"{k}={_short(v)}" for k, v in sorted(d.items()) if k not in _SHOWN)
    if record.get("idempotency_key"):
        refs.append(f"key {record['idempotency_key']}")
    if record.get("input"):
        refs.append(f"input {record['input']}")
    return what, rules, "\n".join(refs)


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "…"


def _export_json(path: Path, order: str, records: list[dict[str, Any]],
                 report: VerifyReport) -> None:
    """The records as chained (hashes included) so an auditor can re-verify them."""
    document = {
        "order_id": order,
        "exported_at": utc(int(time.time() * 1000)),
        "verified": report.ok,
        "problems": [str(link) for link in report.broken],
        "hash": "sha256 over the canonical JSON (sorted keys, no whitespace) of every field "
                "of a record except hash; prev_hash is the previous record's hash, 64 zeros "
                "for seq 1",
        "records": [{k: v for k, v in r.items() if k != "_where"} | {"location": r["_where"]}
                    for r in records],
    }
    path.write_text(json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


CSV_COLUMNS = ("seq", "time_utc", "what_happened", "kind", "actor", "rules_version", "check_id",
               "exception_id", "references", "idempotency_key", "input", "fact_id", "detail",
               "prev_hash", "hash", "location")


def _export_csv(path: Path, records: list[dict[str, Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(CSV_COLUMNS)
        for r in records:
            what, _, refs = describe(r)
            d = r.get("detail") or {}
            # Every cell through csv_safe: finance opens this in a spreadsheet, and a
            # value from an event must never run there as a formula.
            writer.writerow(csv_safe_row([
                r["seq"], utc(r["at_ms"]), what, r["kind"], r["actor"],
                d.get("rules_version", ""), d.get("check_id", ""), d.get("exception_id", ""),
                refs.replace("\n", "; "), r.get("idempotency_key") or "", r.get("input") or "",
                r["fact_id"], json.dumps(d, sort_keys=True, ensure_ascii=False), r["prev_hash"],
                r["hash"], r["_where"],
            ]))


__all__ = ["describe", "register"]
