"""``revline chaos``: faults on a schedule on the 3-node cluster, checked and measured.

One generated workload (duplicates, out-of-order events, poison) runs twice through the
pipeline's components (worker, sink, auditor, exception manager; one process each, as
``revline run`` starts them), each run with its own topics, groups and ledger:

* a clean run: everything published at once, no faults: the reference, and the
  throughput of a clean run;
* a chaos run: published in chunks; before each chunk a fault is injected (kill -9 of a
  worker, the sink, the auditor, the exception manager; kill -9 of the broker that leads
  the busiest input partition, restarted after ``broker_down_s``; workers scaled 1 → N → 1;
  the ERP down for ``erp_down_s``; PostgreSQL restarted) and the next chunk flows while
  the pipeline recovers. Recovery is timed from the fault to the first new output of what
  was hit (an outcome, a side-effect row, an audit record, an exception-manager commit;
  for a broker or PostgreSQL, the last of those); for the ERP, from its return to the
  first ERP effect recorded after it.

The ERP is the sink's in-memory one, taken down from outside through
``REVLINE_MEMORY_ERP_OUTAGE_FILE``: while the file exists every ERP call fails as an
unreachable ERP does. PostgreSQL is restarted with ``pg_restart_command`` (a shell
command, e.g. ``pg_ctl restart``; ``.ci/run`` exports ``REVLINE_CHAOS_PG_RESTART``), only
when the chaos run's ledger is PostgreSQL (``ledger_dsn``).

After draining, the checks: every input has exactly one final outcome equal to the
manifest; the ledger per (order, account, currency) equals the clean run's and every
journal balances; no journal per (order, key) and no side-effect row per (order, key,
adapter) twice; the dead letter holds exactly the poison inputs, each once (a record sent
again by a killed worker is counted, not failed); ``audit verify`` is
intact and complete; ``reconcile`` (ledger and ERP) reports no drift; the ERP effects per
(order, key) are the clean run's (none lost, none refused, none left partial); no
component needed an operator's restart (a stall) or exited by itself (but a watchdog's
75). Exit 0 only if all hold.

The machinery (paced publisher, tails, supervisor) is the fault test's (tests/_faults.py),
so this runs from a source checkout.
"""

from __future__ import annotations

import importlib
import json
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import yaml
from confluent_kafka import Consumer, TopicPartition

from revline.core.admin import ensure_topics
from revline.core.errors import ConfigurationError
from revline.core.kafka_config import client_config
from revline.core.readback import read_topic
from revline.core.settings import DATA_DIR
from revline.core.watchdog import EXIT_STALLED
from revline.operations.verify import compare_with_manifest, finals_by_input, read_outcomes
from revline.sinks.ledger import SqlLedger
from revline.sinks.ledger._ledger import normalize_url
from revline.streams.audit import ensure_audit_topics
from revline.tools.broker import LocalCluster, cluster_home, default_home
from revline.tools.isolated import IsolatedPipeline
from revline.tools.workload import Workload, WorkloadOptions, generate

_REPO = Path(__file__).resolve().parents[2]
if not (_REPO / "tests" / "_faults.py").exists():  # pragma: no cover
    raise ImportError("revline chaos runs from a source checkout (it uses tests/_faults.py)")
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

# The fault test's machinery (paced publisher, tails, supervisor), not type-checked here.
_faults: Any = importlib.import_module("tests._faults")
COMMANDS: dict[str, tuple[str, ...]] = _faults.COMMANDS
ROLES = tuple(COMMANDS)  # worker, sink, auditor, exceptions
PacedPublisher, Supervisor, Tail = _faults.PacedPublisher, _faults.Supervisor, _faults.Tail
group_caught_up = _faults.group_caught_up
settings_of, wait_until = _faults.settings_of, _faults.wait_until

SOURCE_LINE = "revline-source-line"
KILLS = ("worker", "sink", "auditor", "exceptions")


@dataclass
class ChaosOptions:
    orders: int = 300
    seed: int = 18
    worker_kills: int = 5
    sink_kills: int = 3
    auditor_kills: int = 1
    exceptions_kills: int = 1
    broker_kills: int = 2
    scale_to: int = 3  # workers at the peak of 1 -> N -> 1 (1: no scaling)
    broker_down_s: float = 5.0
    rate: float = 2000.0  # chaos run publishing pace, lines/s (between held chunks)
    stall_s: float = 150.0  # no output this long after a fault: a stall (restarted)
    wait_s: float = 900.0  # the longest any drain condition is waited for
    erp_outages: int = 1
    erp_down_s: float = 60.0
    pg_restarts: int | None = None  # None: 1 if possible (a PostgreSQL ledger and a command)
    pg_restart_command: str | None = None  # a shell command restarting the ledger's server
    ledger_dsn: str | None = None  # the chaos run's ledger (default: SQLite in its dir)
    cluster_home: Path | None = None
    state_dir: Path = field(default_factory=lambda: Path(".revline") / "chaos")
    keep_cluster: bool = False
    json_out: Path | None = None


def _add_worker(supervisor: Any, role: str) -> None:
    """One more worker process (``worker2``…), restarted like the others if it dies."""
    COMMANDS.setdefault(role, COMMANDS["worker"])
    supervisor.start(role)


def _retire(supervisor: Any, role: str) -> None:
    """A worker scaled away: SIGTERM, wait, forget."""
    proc = supervisor.procs.pop(role)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@dataclass
class Run:
    name: str
    pipeline: IsolatedPipeline
    supervisor: Any  # tests._faults.Supervisor
    tail: Any  # tests._faults.Tail
    dsn: str
    started: float = 0.0  # first line published
    drained: float = 0.0  # last input's final outcome visible
    recoveries: list[dict[str, Any]] = field(default_factory=list)
    stalls: list[dict[str, Any]] = field(default_factory=list)
    notes: list[dict[str, Any]] = field(default_factory=list)


def _rules(state: Path) -> Path:
    rules = yaml.safe_load((DATA_DIR / "rules.yaml").read_text())
    rules["hold_timeout_seconds"] = 3600  # held chunks and outages never time a hold out
    path = state / "rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    return path


def erp_down_file(run_dir: Path) -> Path:
    """While this file exists, the run's in-memory ERP is down."""
    return (run_dir / "erp-down").absolute()


def _start(bootstrap: str, state: Path, name: str, rules: Path, dsn: str | None) -> Run:
    run_dir = state / name
    dsn = dsn or f"sqlite:///{(run_dir / 'ledger.db').absolute()}"
    pipeline = IsolatedPipeline(bootstrap, run_dir, rules_file=rules, prefix=name,
                                extra_env={"REVLINE_ERP": "memory", "REVLINE_LEDGER_DSN": dsn,
                                           # The ERP outlives a killed sink, as Tryton does.
                                           "REVLINE_MEMORY_ERP_FILE":
                                               str((run_dir / "erp.jsonl").absolute()),
                                           "REVLINE_MEMORY_ERP_OUTAGE_FILE":
                                               str(erp_down_file(run_dir))})
    run_dir.mkdir(parents=True)
    pipeline.cli("reference", "load")
    n = pipeline.partitions
    ensure_topics(bootstrap, {pipeline.topic(k): n for k in
                              ("events", "validated", "exceptions", "deadletter", "outcomes")})
    ensure_audit_topics(bootstrap, settings_of(pipeline))
    tail = Tail(bootstrap, [pipeline.topic("outcomes"), pipeline.topic("audit")])
    tail.start()
    supervisor = Supervisor(pipeline)
    for role in ROLES:
        supervisor.start(role)
    return Run(name, pipeline, supervisor, tail, dsn)


def audit_verify(pipeline: IsolatedPipeline) -> subprocess.CompletedProcess[str]:
    """`revline audit verify` (integrity and completeness), with room for a large trail."""
    return subprocess.run([sys.executable, "-m", "revline.cli", "audit", "verify"],
                          env={**pipeline.env, "COLUMNS": "200"}, capture_output=True,
                          text=True, timeout=1800)


def _effect_rows(dsn: str, adapter: str | None = None) -> int:
    """Side-effect rows (of one adapter); -1 while the database cannot be read."""
    query = "SELECT count(*) FROM side_effects" + (" WHERE adapter = :a" if adapter else "")
    try:
        engine = sa.create_engine(normalize_url(dsn))
        try:
            with engine.connect() as conn:
                return int(conn.execute(sa.text(query), {"a": adapter}).scalar() or 0)
        finally:
            engine.dispose()
    except sa.exc.SQLAlchemyError:
        return -1


def _committed(bootstrap: str, group: str, topic: str) -> int:
    consumer = Consumer(client_config("consumer", bootstrap, {
        "group.id": group, "enable.auto.commit": False, "log_level": 0}, component="chaos"))
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        got = consumer.committed([TopicPartition(topic, p) for p in parts], timeout=10)
        return sum(max(tp.offset, 0) for tp in got)
    except Exception:
        return -1
    finally:
        consumer.close()


def _finals(run: Run) -> int:
    return len({s.source_line for s in run.tail.records(run.pipeline.topic("outcomes"))
                if s.final})


def _drain(run: Run, total: int, wait_s: float, stall_s: float) -> None:
    """Every input decided, every consumer caught up, the audit complete; then stop.

    A consumer that is behind and commits nothing for ``stall_s`` is stalled: it is noted
    (a failed check) and kill -9ed and restarted, as an operator would, so the run ends."""
    p, sup = run.pipeline, run.supervisor
    app = p.env["REVLINE_APP_ID"]
    run.drained = wait_until(lambda: _finals(run) >= total, wait_s,
                             f"{run.name}: a final outcome for all {total} inputs",
                             every=0.5, check=sup.check)
    for role, group, topic in (("sink", f"{app}-sink", p.topic("validated")),
                               ("exceptions", f"{app}-exceptions", p.topic("exceptions"))):
        deadline = time.monotonic() + wait_s
        last, since = _committed(p.bootstrap, group, topic), time.monotonic()
        while not group_caught_up(p.bootstrap, group, [topic]):
            sup.check()
            now_at = _committed(p.bootstrap, group, topic)
            if now_at != last:
                last, since = now_at, time.monotonic()
            elif time.monotonic() - since > stall_s:
                log = sup.log_tail(role)
                run.stalls.append({"fault": "drain", "component": role,
                                   "no_commit_for_s": round(time.monotonic() - since, 1),
                                   "log": log})
                print(f"[chaos] {run.name}: {role} STALLED (no commit for {stall_s:.0f}s while "
                      "behind); kill -9 and restart. Log ends:\n  " + "\n  ".join(log),
                      file=sys.stderr, flush=True)
                sup.kill9_and_restart(role)
                since = time.monotonic()
            if time.monotonic() > deadline:
                raise AssertionError(f"{run.name}: {group} never committed all of {topic}")
            time.sleep(1.0)
    sup.stop([r for r in sup.procs if r != "auditor"])
    wait_until(lambda: audit_verify(p).returncode == 0, wait_s,
               f"{run.name}: `revline audit verify` to pass", every=3.0)
    sup.stop(["auditor"])
    run.tail.stop()


# -- faults ------------------------------------------------------------------------------------
def _schedule(o: ChaosOptions) -> list[str]:
    """Faults interleaved round-robin; the scale-up early, the scale-down late."""
    left = Counter({"worker": o.worker_kills, "sink": o.sink_kills, "broker": o.broker_kills,
                    "auditor": o.auditor_kills, "exceptions": o.exceptions_kills,
                    "erp": o.erp_outages, "postgres": o.pg_restarts or 0})
    order: list[str] = []
    while +left:
        for kind in ("worker", "sink", "broker", "worker", "erp", "auditor", "worker",
                     "postgres", "exceptions"):
            if left[kind] > 0:
                order.append(kind)
                left[kind] -= 1
    if o.scale_to > 1:
        order.insert(min(1, len(order)), "scale up")
        order.insert(max(len(order) - 1, 2), "scale down")
    return order


def _busiest_partition(bootstrap: str, topic: str) -> int:
    consumer = Consumer(client_config("consumer", bootstrap, {
        "group.id": "revline-chaos-probe", "log_level": 0}, component="chaos"))
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        ends: dict[int, int] = {
            int(p): int(consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1])
            for p in parts}
        return max(ends, key=lambda p: ends[p])
    finally:
        consumer.close()


def _await(run: Run, fault: str, at: float, first: dict[str, Callable[[], float | None]],
           stall_s: float) -> float:
    """Seconds from the fault until every watched component has output again."""
    outputs: dict[str, float] = {}
    restarted = False
    while len(outputs) < len(first):
        for role, when in first.items():
            if role not in outputs and (t := when()) is not None:
                outputs[role] = t
        if len(outputs) == len(first):
            break
        run.supervisor.check()
        now = time.time()
        if not restarted and now > at + stall_s:
            restarted = True
            for role in (r for r in first if r not in outputs):
                log = run.supervisor.log_tail(role)
                run.stalls.append({"fault": fault, "component": role,
                                   "no_output_for_s": round(now - at, 1), "log": log})
                print(f"[chaos] {fault}: {role} STALLED for {now - at:.0f}s; kill -9 and "
                      "restart (as an operator would). Log ends:\n  " + "\n  ".join(log),
                      file=sys.stderr, flush=True)
                run.supervisor.kill9_and_restart(role)
        if now > at + 2 * stall_s + 60:
            raise AssertionError(f"{fault}: no output from "
                                 f"{sorted(set(first) - set(outputs))} even after a restart")
        time.sleep(0.2)
    return max(outputs.values()) - at


def _grows(count: Callable[[], int]) -> Callable[[], float | None]:
    """A watcher: now, once ``count`` is above what it was when this was made (or, if it
    could not be read then, when it first could: -1 is unreadable)."""
    base = [count()]

    def when() -> float | None:
        now = count()
        if base[0] < 0:
            base[0] = now
            return None
        return time.time() if now > base[0] else None

    return when


def _commits_or_idle(bootstrap: str, group: str, topic: str) -> Callable[[], float | None]:
    """A watcher: now, once the group commits more, or has nothing left to do (no exception
    came since: not stuck as far as anyone can tell)."""
    grew = _grows(lambda: _committed(bootstrap, group, topic))

    def when() -> float | None:
        return grew() or (time.time() if group_caught_up(bootstrap, group, [topic]) else None)

    return when


def _watchers(run: Run, since: float, roles: list[str]) -> dict[str, Callable[[], float | None]]:
    p = run.pipeline
    app = p.env["REVLINE_APP_ID"]
    out: dict[str, Callable[[], float | None]] = {}
    for role in roles:
        if role == "worker":
            out[role] = lambda: run.tail.first_made_after(p.topic("outcomes"), since)
        elif role == "auditor":
            out[role] = lambda: run.tail.first_made_after(p.topic("audit"), since)
        elif role == "sink":
            out[role] = _grows(lambda: _effect_rows(run.dsn))  # the killed sink writes no more
        elif role == "erp":  # an ERP effect recorded: applied since the ERP came back
            out[role] = _grows(lambda: _effect_rows(run.dsn, "erp"))
        elif role == "exceptions":
            out[role] = _commits_or_idle(p.bootstrap, f"{app}-exceptions",
                                         p.topic("exceptions"))
    return out


def _sleep_checking(run: Run, seconds: float) -> None:
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        run.supervisor.check()
        time.sleep(min(0.5, max(0.0, until - time.monotonic())))


def _restart_postgres(command: str) -> float:
    """Run the restart command; its duration."""
    began = time.monotonic()
    done = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise AssertionError(f"PostgreSQL restart command failed ({done.returncode}): "
                             f"{command}\n{(done.stdout + done.stderr)[-2000:]}")
    return time.monotonic() - began


def _inject(kind: str, run: Run, cluster: LocalCluster, o: ChaosOptions,
            workers: list[str], release: Callable[[], None]) -> tuple[float, str, list[str]]:
    """Do it; (when, what exactly, the components whose output says it is over).
    ``release`` lets the next chunk flow (the caller does it after, if this did not)."""
    sup = run.supervisor
    if kind == "erp":
        down = erp_down_file(run.pipeline.state_dir)
        before = _effect_rows(run.dsn, "erp")
        down.touch()
        began = time.time()
        release()  # the chunk arrives while the ERP is down
        try:
            _sleep_checking(run, o.erp_down_s)
        finally:
            down.unlink(missing_ok=True)
        back = time.time()
        during = _effect_rows(run.dsn, "erp") - before
        run.notes.append({"fault": "erp", "down_s": round(back - began, 1),
                          "erp_rows_recorded_while_down": during})
        return back, f"ERP down {back - began:.0f}s (timed from its return)", ["erp"]
    if kind == "postgres":
        assert o.pg_restart_command
        at = time.time()
        took = _restart_postgres(o.pg_restart_command)
        run.notes.append({"fault": "postgres", "restart_command_s": round(took, 1)})
        return at, "PostgreSQL restarted", ["sink", "auditor", "exceptions"]
    if kind in ("sink", "auditor", "exceptions"):
        at, _ = sup.kill9_and_restart(kind)
        return at, f"kill -9 {kind}", [kind]
    if kind == "worker":
        role = workers[-1]
        at, _ = sup.kill9_and_restart(role)
        return at, f"kill -9 {role}", ["worker"]
    if kind == "scale up":
        at = time.time()
        for n in range(2, o.scale_to + 1):
            workers.append(f"worker{n}")
            _add_worker(sup, f"worker{n}")
        return at, f"workers 1 -> {len(workers)}", ["worker"]
    if kind == "scale down":
        at = time.time()
        while len(workers) > 1:
            _retire(sup, workers.pop())
        return at, "workers -> 1", ["worker"]
    assert kind == "broker"
    topic = run.pipeline.topic("events")
    partition = _busiest_partition(run.pipeline.bootstrap, topic)
    node = cluster.leader_of(topic, partition)
    at = time.time()
    cluster.kill(node)
    time.sleep(o.broker_down_s)
    cluster.start_node(node)
    return at, f"kill -9 broker {node} (leader of events[{partition}]), restart", \
        ["worker", "sink", "auditor", "exceptions"]


def _chaos_run(bootstrap: str, cluster: LocalCluster, o: ChaosOptions, workload: Workload,
               rules: Path) -> Run:
    run = _start(bootstrap, o.state_dir, "chaos", rules, o.ledger_dsn)
    records = workload.records
    total = len(records)
    schedule = _schedule(o)
    marks = [total * (k + 1) // (len(schedule) + 2) for k in range(len(schedule) + 1)]
    publisher = PacedPublisher(bootstrap, run.pipeline.topic("events"), records, o.rate)
    publisher.hold_at(marks[0])
    workers = ["worker"]
    try:
        publisher.start()
        run.started = time.time()
        for k, kind in enumerate(schedule):
            wait_until(lambda k=k: publisher.sent >= marks[k] or publisher.error is not None,
                       o.wait_s, f"line {marks[k]} published", check=run.supervisor.check)
            if publisher.error is not None:
                raise AssertionError(f"publishing failed: {publisher.error!r}")
            at, what, watch = _inject(kind, run, cluster, o, workers,
                                      partial(publisher.release, marks[k + 1]))
            publisher.release(marks[k + 1])  # the next chunk flows while it recovers
            recovery = _await(run, what, at, _watchers(run, at, watch), o.stall_s)
            run.recoveries.append({"kind": kind, "fault": what, "at_line": marks[k],
                                   "recovery_s": round(recovery, 2)})
            print(f"[chaos] {what}: outputs again after {recovery:.1f}s", flush=True)
        publisher.release()
        wait_until(lambda: publisher.finished_at is not None, o.wait_s,
                   "every line published and delivered", check=run.supervisor.check)
        if publisher.error is not None or publisher.failures or publisher.delivered != total:
            raise AssertionError(f"publishing: {publisher.error!r} {publisher.failures[:3]} "
                                 f"delivered {publisher.delivered}/{total}")
        _drain(run, total, o.wait_s, o.stall_s)
    finally:
        publisher.release()
        run.pipeline.stop_all()
    return run


def _clean_run(bootstrap: str, o: ChaosOptions, workload: Workload, rules: Path) -> Run:
    run = _start(bootstrap, o.state_dir, "clean", rules, None)
    try:
        run.started = time.time()
        run.pipeline.publish(workload)
        _drain(run, len(workload.records), o.wait_s, o.stall_s)
    finally:
        run.pipeline.stop_all()
    return run


# -- what the runs left -------------------------------------------------------------------------
@dataclass
class LedgerView:
    balances: dict[tuple[str, str, str], int]
    unbalanced: list[tuple[str, str]]
    doubled_journals: list[tuple[str, str]]
    doubled_effects: list[tuple[str, str, str]]
    journals: int


def _ledger(dsn: str) -> LedgerView:
    balances: dict[tuple[str, str, str], int] = defaultdict(int)
    unbalanced: list[tuple[str, str]] = []
    with SqlLedger(dsn) as ledger:
        summaries = ledger.journal_summaries()
        counts = Counter((j.order_id, j.idempotency_key) for j in summaries)
        for order in sorted({j.order_id for j in summaries}):
            for j in ledger.journals_for(order):
                debit = sum(ln.debit_minor for ln in j.lines)
                credit = sum(ln.credit_minor for ln in j.lines)
                if debit != credit:
                    unbalanced.append((j.order_id, j.idempotency_key))
                for ln in j.lines:
                    balances[order, ln.account, ln.currency] += ln.debit_minor - ln.credit_minor
        effects = Counter((e.order_id or "", e.idempotency_key, e.adapter)
                          for e in ledger.all_effects())
    return LedgerView(dict(balances), unbalanced,
                      sorted(k for k, n in counts.items() if n > 1),
                      sorted(k for k, n in effects.items() if n > 1), len(summaries))


def _dead_letter_lines(run: Run) -> tuple[Counter[int], int]:
    """(workload line -> distinct inputs dead-lettered for it, repeats). The worker's outputs
    are at-least-once: a worker killed after sending and before committing sends an input's
    dead letter again, the same record for the same input coordinates (as outcomes are
    repeated, and checked after dropping exact repeats). A repeat is counted, not failed;
    ``revline redrive`` sends an input back once."""
    lines: Counter[int] = Counter()
    seen: set[tuple[str | bytes, str | bytes, str | bytes, bytes | None]] = set()
    repeats = 0
    for msg in read_topic(run.pipeline.bootstrap, run.pipeline.topic("deadletter"),
                          missing_ok=True):
        headers = dict(msg.headers() or [])
        same = (headers.get("revline.errors.topic") or b"",
                headers.get("revline.errors.partition") or b"",
                headers.get("revline.errors.offset") or b"", msg.value())
        if same[2] and same in seen:
            repeats += 1
            continue
        seen.add(same)
        header = headers.get(SOURCE_LINE)
        lines[int(header) if header else -1] += 1
    return lines, repeats


def _reconcile(run: Run) -> tuple[int, str]:
    # The ledger and the in-memory ERP (read from the run's file) against the stream.
    done = subprocess.run([sys.executable, "-m", "revline.cli", "reconcile",
                           "--no-exceptions"], env={**run.pipeline.env, "COLUMNS": "200"},
                          capture_output=True, text=True, timeout=600)
    text = done.stdout + done.stderr
    drift = next((ln.strip() for ln in text.splitlines() if ln.strip().startswith("Drift")),
                 text.strip()[-200:])
    return done.returncode, drift


def _p50_max(values: list[float]) -> tuple[float, float]:
    return statistics.median(values), max(values)


def run_chaos(o: ChaosOptions) -> tuple[bool, dict[str, Any]]:
    """Both runs, the checks and the figures: (every check held, the summary)."""
    began = time.time()
    _settle_pg_restarts(o)
    o.state_dir = o.state_dir.absolute() / time.strftime("%Y%m%d-%H%M%S")
    o.state_dir.mkdir(parents=True)
    home = o.cluster_home or cluster_home(default_home()).with_name("chaos-cluster")
    cluster = LocalCluster(home, nodes=3, secure=False, jars_dir=default_home() / "lib")
    started_cluster = cluster.running() is None
    bootstrap = cluster.start(fresh=True) if started_cluster else cluster.running()
    assert bootstrap is not None
    print(f"[chaos] 3-node cluster at {bootstrap} "
          f"({'started' if started_cluster else 'already running'}); state in {o.state_dir}",
          flush=True)
    try:
        workload = generate(WorkloadOptions(orders=o.orders, seed=o.seed))
        total = len(workload.records)
        rules = _rules(o.state_dir)
        print(f"[chaos] workload: {o.orders} orders, {total} inputs {workload.counts()}",
              flush=True)
        clean = _clean_run(bootstrap, o, workload, rules)
        print(f"[chaos] clean run drained in {clean.drained - clean.started:.1f}s", flush=True)
        chaos = _chaos_run(bootstrap, cluster, o, workload, rules)
        print(f"[chaos] chaos run drained in {chaos.drained - chaos.started:.1f}s", flush=True)
        summary = _check(o, workload, clean, chaos)
    finally:
        if started_cluster and not o.keep_cluster:
            cluster.stop()
    summary["seconds"] = round(time.time() - began, 1)
    if o.json_out:
        o.json_out.write_text(json.dumps(summary, indent=2, default=str))
    return all(summary["checks"].values()), summary


def postgres_ledger(dsn: str | None) -> bool:
    return bool(dsn) and normalize_url(dsn or "").startswith("postgresql")


def _settle_pg_restarts(o: ChaosOptions) -> None:
    """``pg_restarts`` None: 1 when possible, else 0; asked for but impossible: an error."""
    possible = postgres_ledger(o.ledger_dsn) and bool(o.pg_restart_command)
    if o.pg_restarts is None:
        o.pg_restarts = 1 if possible else 0
    elif o.pg_restarts > 0 and not possible:
        raise ConfigurationError("PostgreSQL restarts need a PostgreSQL ledger (--ledger-dsn "
                         "postgresql://...) and a restart command (--pg-restart-command or "
                         "REVLINE_CHAOS_PG_RESTART)")


def _skipped(o: ChaosOptions) -> list[str]:
    out = []
    if not o.erp_outages:
        out.append("ERP down (--erp-outages 0)")
    if not o.pg_restarts:
        out.append("PostgreSQL restart (" + ("no restart command: --pg-restart-command or "
                                            "REVLINE_CHAOS_PG_RESTART"
                                            if postgres_ledger(o.ledger_dsn)
                                            else "the ledger is not PostgreSQL: --ledger-dsn")
                   + ")")
    return out


def _erp_effects(dsn: str) -> dict[tuple[str, str], tuple[str, str, float]]:
    """(order, key) -> (done | refused | partial, detail, when: epoch seconds), of every ERP
    side-effect row."""
    def epoch(at: datetime) -> float:
        return (at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp()

    with SqlLedger(dsn) as ledger:
        return {(e.order_id or "", e.idempotency_key):
                (e.status if e.status in ("refused", "partial") else "done", e.detail or "",
                 epoch(e.applied_at))
                for e in ledger.all_effects("erp")}


def _check(o: ChaosOptions, workload: Workload, clean: Run, chaos: Run) -> dict[str, Any]:
    total = len(workload.records)
    manifest = workload.manifest()
    outcomes = read_outcomes(chaos.pipeline.bootstrap, chaos.pipeline.topic("outcomes"))
    clean_outcomes = read_outcomes(clean.pipeline.bootstrap, clean.pipeline.topic("outcomes"))
    per_line: Counter[int] = Counter()
    for finals in finals_by_input(outcomes).values():
        for out in finals:
            per_line[int(out["source_line"] or -1)] += 1
    lost = sum(1 for line in range(1, total + 1) if per_line[line] == 0)
    twice = sum(1 for n in per_line.values() if n > 1)
    manifest_problems = compare_with_manifest(manifest, outcomes)
    clean_problems = compare_with_manifest(manifest, clean_outcomes)
    cl, ch = _ledger(clean.dsn), _ledger(chaos.dsn)
    balance_diff = [k for k in cl.balances.keys() | ch.balances.keys()
                    if cl.balances.get(k, 0) != ch.balances.get(k, 0)]
    poison = {r.seq for r in workload.records if r.expect.outcome == "dead_letter"}
    dead, dead_repeats = _dead_letter_lines(chaos)
    verify = audit_verify(chaos.pipeline)
    verify_out = (verify.stdout + verify.stderr).strip()
    rec_rc, drift = _reconcile(chaos)
    erp_clean, erp_chaos = _erp_effects(clean.dsn), _erp_effects(chaos.dsn)
    erp_lost = sorted(k for k in erp_clean.keys() - erp_chaos.keys())
    # The in-memory ERP keeps its documents in a file (REVLINE_MEMORY_ERP_FILE), so a
    # killed sink's successor has them: no refusal is excused.
    erp_differ = sorted(k for k in erp_clean.keys() & erp_chaos.keys()
                        if erp_clean[k][0] != erp_chaos[k][0])
    erp_extra = sorted(k for k in erp_chaos.keys() - erp_clean.keys())
    faults = Counter(r["kind"] for r in chaos.recoveries)
    recovery: dict[str, dict[str, float]] = {}
    for kind in faults:
        p50, worst = _p50_max([r["recovery_s"] for r in chaos.recoveries if r["kind"] == kind])
        recovery[kind] = {"n": faults[kind], "p50_s": round(p50, 1), "max_s": round(worst, 1)}
    clean_s, chaos_s = clean.drained - clean.started, chaos.drained - chaos.started
    checks = {
        "every input exactly one final outcome": lost == 0 and twice == 0,
        "outcomes equal the manifest": not manifest_problems,
        "clean run outcomes equal the manifest": not clean_problems,
        "ledger per (order, account, currency) equals the clean run's": not balance_diff,
        "every journal balances": not ch.unbalanced and not cl.unbalanced,
        "no journal applied twice": not ch.doubled_journals,
        "no side-effect row twice": not ch.doubled_effects,
        "dead letter holds exactly the poison set (each input once)": (set(dead) == poison
                                                     and all(n == 1 for n in dead.values())),
        "audit verify intact and complete": verify.returncode == 0 and "complete: all"
        in verify_out,
        "reconcile: no drift": rec_rc == 0,
        "ERP effects per (order, key) equal the clean run's (none lost, refused, partial)":
            not erp_lost and not erp_differ and not erp_extra,
        "no stall needed an operator's restart": not chaos.stalls,
        # A watchdog's exit 75 asks the supervisor for a restart (as `revline run` does):
        # recovery, timed above; any other exit is not.
        "no component exited by itself (but a watchdog's 75)": all(
            e.code == EXIT_STALLED for e in chaos.supervisor.unexpected),
    }
    return {
        "orders": o.orders, "seed": o.seed, "inputs": total, "workload": workload.counts(),
        "ledger": "postgresql" if o.ledger_dsn and o.ledger_dsn.startswith("postgres")
        else "sqlite",
        "faults": dict(faults), "recovery": recovery,
        "recoveries": chaos.recoveries, "stalls": chaos.stalls,
        "unexpected_exits": [{"component": e.role, "code": e.code, "log": e.log[-3:]}
                             for e in chaos.supervisor.unexpected],
        "skipped": _skipped(o), "notes": chaos.notes,
        "erp_effects": {"clean": len(erp_clean), "chaos": len(erp_chaos),
                        "lost": len(erp_lost), "status_differs": len(erp_differ),
                        "extra": len(erp_extra),
                        "first": [list(k) for k in (erp_lost + erp_differ + erp_extra)[:5]]},
        "throughput": {"clean_inputs_per_s": round(total / clean_s, 1),
                       "chaos_inputs_per_s": round(total / chaos_s, 1),
                       "clean_s": round(clean_s, 1), "chaos_s": round(chaos_s, 1)},
        "events_lost": lost, "outcomes_twice": twice,
        "effects_doubled": len(ch.doubled_journals) + len(ch.doubled_effects),
        "journals": {"clean": cl.journals, "chaos": ch.journals},
        "balances_differing": len(balance_diff), "unbalanced_journals": len(ch.unbalanced),
        "manifest_problems": manifest_problems[:10],
        "dead_letter": {"poison": len(poison), "records": sum(dead.values()) + dead_repeats,
                        "distinct_lines": len(dead), "repeats": dead_repeats},
        "audit_verify": verify_out.splitlines()[-2:], "reconcile": {"rc": rec_rc,
                                                                     "line": drift},
        "checks": checks,
    }


def table(s: dict[str, Any]) -> str:
    rows = [f"chaos: {s['orders']} orders, {s['inputs']} inputs, ledger {s['ledger']}", "",
            f"{'fault':<12}{'injected':>9}{'recover p50':>13}{'max':>9}"]
    for kind, r in s["recovery"].items():
        rows.append(f"{kind:<12}{r['n']:>9}{r['p50_s']:>12.1f}s{r['max_s']:>8.1f}s")
    t = s["throughput"]
    rows += ["", f"throughput: clean {t['clean_inputs_per_s']:.1f} inputs/s "
             f"({t['clean_s']:.0f}s), under faults {t['chaos_inputs_per_s']:.1f} inputs/s "
             f"({t['chaos_s']:.0f}s, {t['chaos_inputs_per_s'] / t['clean_inputs_per_s']:.0%})",
             f"events lost: {s['events_lost']}; effects doubled: {s['effects_doubled']}",
             f"ERP effects: {s['erp_effects']['chaos']} (clean run {s['erp_effects']['clean']}"
             f"; lost {s['erp_effects']['lost']}, status differs "
             f"{s['erp_effects']['status_differs']}, extra {s['erp_effects']['extra']})",
             f"dead letter: {s['dead_letter']['distinct_lines']} inputs (poison "
             f"{s['dead_letter']['poison']}); the same record sent again by a killed worker "
             f"{s['dead_letter'].get('repeats', 0)}",
             f"reconcile: {s['reconcile']['line']}",
             "exited by themselves (restarted): " + (", ".join(
                 f"{e['component']} ({e['code']})" for e in s["unexpected_exits"]) or "none"),
             f"skipped: {'; '.join(s['skipped']) or 'none'}", ""]
    rows += [f"[{'ok' if ok else 'FAIL'}] {name}" for name, ok in s["checks"].items()]
    return "\n".join(rows)

