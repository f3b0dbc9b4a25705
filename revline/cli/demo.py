"""The demo: broker → reference data → worker + sink (+ operations) → workload → money.

Runs on embedded defaults: a local broker when none is configured, a SQLite
ledger in the run directory, and Tryton as the ERP when it is installed (a
local ``trytond`` on a copy of the prepared template), else the in-memory ERP.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from confluent_kafka import Consumer, TopicPartition
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from rich.text import Text

from revline.cli._tables import counts_table
from revline.core.kafka_config import client_config
from revline.core.money import format_money
from revline.core.settings import Settings
from revline.operations.publisher import Publisher, publish_records
from revline.operations.verify import compare_with_manifest, finals_by_input
from revline.tools.isolated import IsolatedPipeline
from revline.tools.workload import WorkloadGenerator, WorkloadOptions

# The operations processes the demo also runs: the audit chainer, the exception manager.
_OPERATIONS = (("auditor", "--metrics-port", "0"), ("exceptions", "run"))


@dataclass
class DemoOptions:
    orders: int = 120
    seed: int = 7
    hold_timeout: float = 5.0
    erp: str = "auto"  # auto: Tryton when installed, else in-memory


@contextlib.contextmanager
def demo_erp(kind: str, run_dir: Path, settings: Settings,
             say: Callable[[str], None]) -> Iterator[dict[str, str]]:
    """Environment for the sink's ERP; starts (and stops) a local trytond when asked."""
    from revline.sinks.erp import prepare_database, start_server, tryton_available

    use_tryton = kind == "tryton" or (kind == "auto" and tryton_available())
    if not use_tryton:  # its documents in a file, so `revline reconcile` can read them
        yield {"REVLINE_ERP": "memory",
               "REVLINE_MEMORY_ERP_FILE": str((run_dir / "erp.jsonl").absolute())}
        return
    say("Preparing a local Tryton ERP (the first run on a machine builds a template, "
        "about a minute)…")
    database = prepare_database(run_dir / "tryton", state_dir=settings.state_dir.absolute())
    server = start_server(database)
    try:
        yield {
            "REVLINE_ERP": "tryton",
            "REVLINE_TRYTON_URL": server.url,
            "REVLINE_TRYTON_DATABASE": database.name,
            "REVLINE_TRYTON_USER": database.user,
            "REVLINE_TRYTON_PASSWORD": database.password,
        }
    finally:
        server.stop()


def committed_offsets(bootstrap: str, group: str, topic: str) -> tuple[int, int]:
    """(committed, end) summed over the topic's partitions, for a consumer group."""
    consumer = Consumer(client_config("consumer", bootstrap, {"group.id": group}))
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        tps = [TopicPartition(topic, p) for p in parts]
        done = sum(max(tp.offset, 0) for tp in consumer.committed(tps, timeout=10))
        end = sum(consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in tps)
        return done, end
    finally:
        consumer.close()


def run_demo(options: DemoOptions, settings: Settings, bootstrap: str, console: Console,
             progress_factory: Callable[[], Progress]) -> int:
    run_id = time.strftime("d%H%M%S")
    run_dir = (settings.state_dir / "demo" / run_id).absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    # Revline's own log lines, librdkafka's included ("coordinator load in progress" while
    # a fresh broker warms up), go to the run's log, not between the demo's tables.
    revline_log = logging.getLogger("revline")
    revline_log.addHandler(logging.FileHandler(run_dir / "demo.log"))
    revline_log.setLevel(logging.INFO)
    revline_log.propagate = False
    rules = yaml.safe_load(settings.rules_file.read_text())
    rules["hold_timeout_seconds"] = options.hold_timeout
    (run_dir / "rules.yaml").write_text(yaml.safe_dump(rules))
    workload = WorkloadGenerator(
        WorkloadOptions(orders=options.orders, seed=options.seed, run_id=run_id, orphans=1,
                        # Events occur in the 30 s before publishing (an order's ~8 events
                        # about 1.5 s apart), so trigger-to-outcome latency is real.
                        start=datetime.now(UTC) - timedelta(seconds=30), time_scale=1 / 12_000)
    ).generate()
    _, manifest_path = workload.write(run_dir)
    total = len(workload.records)

    with demo_erp(options.erp, run_dir, settings, console.print) as erp_env:
        pipeline = IsolatedPipeline(bootstrap, run_dir, partitions=settings.input_partitions,
                                    rules_file=run_dir / "rules.yaml", name=run_id,
                                    prefix="demo", extra_env=erp_env, restart_crashed=True)
        erp_label = (f"Tryton {erp_env['REVLINE_TRYTON_URL']}"
                     if erp_env["REVLINE_ERP"] == "tryton" else "in-memory ERP")
        console.print(
            f"[bold]Revline demo[/bold] — {options.orders} orders → {total:,} inputs on "
            f"{pipeline.topic('events')}; ledger {run_dir / 'ledger.db'}; {erp_label} "
            f"(manifest: {manifest_path})"
        )
        console.print(counts_table("What a correct pipeline must conclude", workload.counts()))
        group = f"{pipeline.env['REVLINE_APP_ID']}-sink"
        try:
            pipeline.cli("reference", "load")
            pipeline.create_input_topic()
            pipeline.start_worker()
            pipeline.start("sink")
            for command in _OPERATIONS:
                pipeline.start(*command)
            started = time.perf_counter()
            with progress_factory() as progress:
                task = progress.add_task("publishing", total=total)
                publisher = Publisher(bootstrap, pipeline.topic("events"), settings=settings)
                publish_records(publisher, workload.records,
                                progress=lambda n: progress.update(task, completed=n))
                publisher.flush()
                progress.update(task, completed=total)
                decided = progress.add_task("worker deciding (holds time out after "
                                            f"{options.hold_timeout:.0f}s)", total=total)

                def all_decided(outcomes: list[dict[str, Any]]) -> bool:
                    done = len(finals_by_input(outcomes))
                    progress.update(decided, completed=done)
                    return done >= total

                outcomes = pipeline.wait_for(
                    all_decided, timeout=options.hold_timeout + 120 + total / 200,
                    what="a final outcome for every input",
                )
                decided_s = time.perf_counter() - started
                applied = progress.add_task(f"sink applying to ledger and {erp_label}",
                                            total=None)
                deadline = time.monotonic() + 600 + total / 5
                while True:
                    done, end = committed_offsets(bootstrap, group, pipeline.topic("validated"))
                    progress.update(applied, completed=done, total=end)
                    if end and done >= end:
                        break
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"the sink applied {done} of {end} validated events; "
                                           f"see {run_dir}/sink-*.log")
                    time.sleep(1)
            applied_s = time.perf_counter() - started
            # Reconcile while the ERP still runs (a Tryton demo's server ends with the
            # demo): stream vs ledger vs ERP, per order, event type and currency.
            reconciled = subprocess.run(
                [sys.executable, "-m", "revline.cli", "reconcile", "--no-exceptions"],
                env={**pipeline.env, "COLUMNS": str(console.width)}, capture_output=True,
                text=True, check=False)
        finally:
            pipeline.stop_all()

    env_file = run_dir / "env"
    env_file.write_text("".join(
        f"{name}={value}\n" for name, value in sorted(pipeline.env.items())
        if name.startswith(("REVLINE_", "KAFKA_")) and not name.startswith(("REVLINE_ERP",
                                                                       "REVLINE_TRYTON_"))
    ))
    problems = compare_with_manifest(workload.manifest(), outcomes)
    events = {(r.key, r.idempotency_key): r.event for r in workload.records if r.event}
    outcome_report(console, outcomes, decided_s, routed=routing(settings, events))
    money_report(console, settings_for(run_dir), erp_label, applied_s)
    console.print(Text(reconciled.stdout.rstrip() or reconciled.stderr.rstrip()))
    if problems:
        for problem in problems[:20]:
            console.print(f"[red]mismatch[/red]: {problem}")
        console.print(f"[red]{len(problems)} inputs do NOT match the manifest.[/red]")
        return 1
    console.print(
        f"[green]All {total:,} inputs reached exactly the outcome the manifest expects.[/green] "
        f"Logs: {run_dir}/*.log"
    )
    console.print(
        f"To look at this run: [bold]set -a; . {env_file}; set +a[/bold], then e.g. "
        "`revline report`, `revline exceptions list`, `revline audit verify`, "
        "`revline reconcile`."
    )
    return 0


def settings_for(run_dir: Path) -> str:
    return f"sqlite:///{run_dir / 'ledger.db'}"


def routing(settings: Settings, events: dict[tuple[str, str | None], dict[str, Any]]
            ) -> Callable[[dict[str, Any]], tuple[str, str]]:
    """(severity, owner) of an exception outcome as the exception manager routes it: the
    same ownership rules over the same facts, so the demo, `revline exceptions` and the
    report show one owner and one severity for one exception."""
    from revline.processors.ownership import ExceptionFacts, event_amount, load_ownership

    ownership = load_ownership(settings.ownership_file)

    def routed(outcome: dict[str, Any]) -> tuple[str, str]:
        event = events.get((outcome.get("order_id") or "", outcome.get("idempotency_key")))
        amount, currency = event_amount(event)
        assignment = ownership.assign(ExceptionFacts(
            check_id=outcome["check_id"] or "", severity=outcome["severity"] or "P1",
            owner=outcome["owner"] or "integrations", event_type=outcome.get("event_type"),
            source_system=(event or {}).get("envelope", {}).get("source_system"),
            amount_minor=amount, currency=currency))
        return assignment.severity, assignment.owner

    return routed


def outcome_report(console: Console, outcomes: list[dict[str, Any]], elapsed: float,
                   routed: Callable[[dict[str, Any]], tuple[str, str]] | None = None) -> None:
    finals = [o for verdicts in finals_by_input(outcomes).values() for o in verdicts]
    kinds = Counter(o["kind"] for o in finals)
    table = Table(title=f"Outcomes ({len(finals):,} inputs decided in {elapsed:.1f}s)")
    table.add_column("outcome")
    table.add_column("inputs", justify="right")
    for kind in ("validated", "duplicate", "exception", "dead_letter"):
        label = "duplicate (recognised, never applied)" if kind == "duplicate" else kind
        table.add_row(label, f"{kinds.get(kind, 0):,}")
    table.add_row("of which held first (out of order), then released",
                  f"{sum(o['held'] for o in finals):,}")
    console.print(table)
    checks = Counter(
        (o["check_id"], *(routed(o) if routed else (o["severity"], o["owner"])))
        for o in finals if o["kind"] == "exception"
    )
    table = Table(title="Exceptions by check (each has an owner and an SLA)")
    for column in ("check", "severity", "owner", "count"):
        table.add_column(column)
    for (check, severity, owner), count in checks.most_common():
        table.add_row(check, severity or "", owner or "", str(count))
    warnings = Counter(w for o in finals if o["kind"] == "validated" for w in o["warnings"])
    for check, count in warnings.most_common():
        table.add_row(check, "P3", "revenue_ops", f"{count} (passed with warning)")
    console.print(table)
    stages = Counter(o["stage"] for o in finals if o["kind"] == "dead_letter")
    if stages:
        console.print("Dead-lettered: " + ", ".join(f"{k} {v}" for k, v in stages.items()))


def money_report(console: Console, ledger_url: str, erp_label: str, elapsed: float) -> None:
    """What landed in the systems of record: ledger balances and ERP documents."""
    from revline.sinks.ledger import SqlLedger

    with SqlLedger(ledger_url) as ledger:
        balances = ledger.balances()
        trial = ledger.trial_balance()
        effects = ledger.all_effects("erp")
        journals = ledger.journal_summaries()
    currencies = sorted({c for _, c in balances})
    # One row per account and currency, amounts in major units: a column per currency
    # made rich cut amounts ("-38,130,3…") at 80 columns; an amount is never cut.
    shown = {(a, c): format_money(v, c) for (a, c), v in balances.items()}
    table = Table(title=f"Ledger balances ({len(journals):,} journals; debits positive)")
    table.add_column("currency", no_wrap=True)
    table.add_column("account", overflow="fold")
    table.add_column("balance", justify="right", no_wrap=True,
                     min_width=max((len(v) for v in shown.values()), default=7))
    table.add_column("debits = credits", no_wrap=True)
    for currency in currencies:
        accounts = sorted(a for a, c in balances if c == currency)
        for n, account in enumerate(accounts):
            table.add_row(currency if n == 0 else "", account, shown[(account, currency)],
                          ("yes" if trial[currency].balanced else "[red]NO[/red]")
                          if n == 0 else "")
    console.print(table)
    # An effect's refs also name the documents it built on (an invoice names its sale):
    # count distinct ERP ids per kind.
    documents: dict[str, dict[str, str]] = {}
    for effect in effects:
        if effect.status not in ("applied", "already_applied"):
            continue
        for step, ref in effect.external_ref.items():
            documents.setdefault(step, {}).setdefault(ref, effect.idempotency_key)
    steps = Counter({step: len(ids) for step, ids in documents.items()})
    examples = {step: ", ".join(sorted(ids, key=lambda r: (len(r), r))[:4])
                + (", …" if len(ids) > 4 else "")
                for step, ids in documents.items()}
    refused = sum(1 for e in effects if e.status == "refused")
    table = Table(title=f"ERP documents created in {erp_label} (applied within {elapsed:.0f}s "
                        "of publishing)")
    for column in ("document", "count", "ERP ids"):
        table.add_column(column)
    for step, count in steps.most_common():
        table.add_row(step, f"{count:,}", examples[step])
    if refused:
        table.add_row("[red]refused by the ERP[/red]", str(refused),
                      "owned exceptions (owner integrations)")
    console.print(table)
