"""The ``revline`` command line. Errors say what to do; long jobs show progress."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
import typing
from collections.abc import Iterator, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, BinaryIO

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from revline.cli._tables import counts_table
from revline.core.errors import ConfigurationError, InfrastructureError, RevlineError
from revline.core.redact import redact_url
from revline.core.settings import Settings

console = Console(stderr=False, highlight=False)
err_console = Console(stderr=True, highlight=False)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    )


# -- broker --------------------------------------------------------------------------
def cmd_broker(args: argparse.Namespace, settings: Settings) -> int:
    from revline.tools.broker import broker_command

    return broker_command(args.action, settings.broker_home, fresh=args.fresh, yes=args.yes,
                          nodes=args.nodes, secure=args.secure)


# Ctrl-C (SIGINT) and SIGTERM. Before a command's main loop (connecting, waiting out a
# cold cluster) a signal ends the process at once: exit 130 with one line. Once it runs
# (mark_running), a long-running command's signal sets its stop event instead and it
# finishes its batch. librdkafka calls block in C, where Python runs no signal handler
# (list_topics waits up to 30 s): a watcher thread, woken by the signal through the wakeup
# fd, ends a process still running _INTERRUPT_GRACE_S after it.
_running = threading.Event()
_interrupt_said = threading.Event()
_INTERRUPT_GRACE_S = 2.0


def mark_running() -> None:
    """From here on, SIGINT/SIGTERM stop the command gracefully (its stop event), except
    while a start-up check waits for the broker (revline.core.startup.waiting)."""
    _running.set()


def _graceful() -> bool:
    from revline.core.startup import waiting

    return _running.is_set() and not waiting()


def _say_interrupted() -> None:
    if not _interrupt_said.is_set():
        _interrupt_said.set()
        err_console.print("interrupted", soft_wrap=True, markup=False)


_watching: list[object] = []  # the wakeup socket pair, kept open for the process's life


def _watch_interrupts() -> None:
    """Started by the first Kafka step (bootstrap_for): commands that touch no broker
    (broker, chaos, validate) keep Python's own Ctrl-C, and their clean-up, untimed."""
    import signal
    import socket

    if _watching or threading.current_thread() is not threading.main_thread():
        return  # main() called from a test's thread: signals are not ours
    reader, writer = socket.socketpair()
    _watching.extend((reader, writer))
    writer.setblocking(False)
    try:
        signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    except (ValueError, OSError):
        return
    wanted = {int(signal.SIGINT), int(signal.SIGTERM)}

    def watch() -> None:
        while True:
            try:
                data = reader.recv(64)
            except OSError:
                return
            if not data:
                return
            if _graceful() or not wanted.intersection(data):
                continue
            time.sleep(_INTERRUPT_GRACE_S)  # Python code has ended it by now, unless in C
            if _graceful():
                continue
            interrupted = int(signal.SIGINT) in data
            if interrupted:
                _say_interrupted()
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(130 if interrupted else 0)  # SIGTERM: stopped as asked, as in handler()

    threading.Thread(target=watch, name="revline-interrupt", daemon=True).start()


def stop_on_signals(*, log_setup: bool = True) -> threading.Event:
    """For long-running commands: an event SIGTERM/SIGINT set, and INFO logging.

    Until :func:`mark_running`, a signal also interrupts at once (the start-up waits for
    the broker or the database have nothing to finish)."""
    import signal

    if log_setup:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    stop = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        stop.set()
        if _graceful():
            return
        if signum == signal.SIGINT:
            raise KeyboardInterrupt  # one line, exit 130
        # SIGTERM (a supervisor stopping its components): exit 0, as a component stopped
        # after start-up does; nothing has started that needs finishing.
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def bootstrap_for(settings: Settings, *, start_if_missing: bool,
                  one_shot: bool | None = None) -> str:
    """Where Kafka is, checked. ``one_shot`` (default: ``not start_if_missing``): a command
    that reads or sends and ends, so an unreachable broker is one line within seconds; a
    long-running component instead waits out a cold cluster (REVLINE_STARTUP_TIMEOUT_S)."""
    from revline.core.kafka_config import REACHABLE_TIMEOUT_S, check_credentials
    from revline.tools.broker import resolve_bootstrap

    _watch_interrupts()
    address, started = resolve_bootstrap(settings.broker_home, start_if_missing=start_if_missing)
    one_shot = not start_if_missing if one_shot is None else one_shot
    # Refused credentials or a bad TLS file: one error, at once; for a one-shot command
    # also a broker that is not there.
    check_credentials(address, settings=settings, require_answer=one_shot,
                      timeout_s=REACHABLE_TIMEOUT_S if one_shot else 15.0)
    if started:
        err_console.print(
            f"[dim]Started a local Kafka broker at {address} "
            "(stop it with `revline broker stop`).[/dim]"
        )
    return address


def serializer_for(settings: Settings) -> Any:
    from revline.core.kafka_config import registry_config
    from revline.schemas import EventSerializer, registry_client

    registry = registry_config(settings)
    if registry is not None:
        return EventSerializer(registry=registry_client(registry))
    return EventSerializer()


def deserializer_for(settings: Settings) -> Any:
    from revline.core.kafka_config import registry_config
    from revline.schemas import EventDeserializer, registry_client

    registry = registry_config(settings)
    if registry is not None:
        return EventDeserializer(registry=registry_client(registry))
    return EventDeserializer()


# -- generate ------------------------------------------------------------------------
def _workload_options(args: argparse.Namespace) -> Any:
    from revline.tools.workload import WorkloadOptions

    known = {f.name for f in fields(WorkloadOptions)}
    values = {k: v for k, v in vars(args).items() if k in known and v is not None}
    return WorkloadOptions(**values)


def cmd_generate(args: argparse.Namespace, settings: Settings) -> int:
    from revline.tools.workload import WorkloadGenerator

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigurationError(f"--out {out} is a file: give a directory (it is created)")
    if args.publish:  # an unreachable broker is said before the workload is written
        bootstrap_for(settings, start_if_missing=False)
    workload = WorkloadGenerator(_workload_options(args)).generate()
    events_path, manifest_path = workload.write(out)
    counts = workload.counts()
    console.print(
        f"Generated {len(workload.records)} inputs for {args.orders} orders "
        f"→ {events_path} and {manifest_path}"
    )
    console.print(counts_table("Expected outcomes (manifest)", counts))
    if args.publish:
        return _publish_file(events_path, settings, topic=args.topic, allow_raw=True)
    return 0


# -- publish -------------------------------------------------------------------------
def _lines(stream: BinaryIO) -> Iterator[bytes]:
    """Raw lines: each is decoded on its own, so one bad byte costs one line, not the file."""
    yield from stream


def readable_file(path: Path, what: str, flag: str = "") -> Path:
    """``path`` if it is a regular, readable file; else a one-line error naming it."""
    name = f"{flag} {path}" if flag else str(path)
    if not path.exists():
        raise ConfigurationError(f"{name} does not exist (give {what})")
    if path.is_dir():
        raise ConfigurationError(f"{name} is a directory (give {what})")
    if not path.is_file():  # reading a FIFO with no writer would wait forever
        raise ConfigurationError(f"{name} is not a regular file (a pipe, device or socket; "
                                 f"give {what})")
    if not os.access(path, os.R_OK):
        raise ConfigurationError(f"{name} is not readable (check its permissions)")
    return path


@contextlib.contextmanager
def file_errors(path: Path | str, flag: str = "", what: str = "YAML") -> Iterator[None]:
    """Reading and parsing one file: whatever its bytes or shape make the loader raise is
    one line naming the file (and the flag or variable that named it)."""
    name = f"{flag} {path}" if flag else str(path)
    try:
        yield
    except ConfigurationError as exc:
        text = str(exc)
        if flag and text.startswith(f"{path} "):  # the loader named the file: add the flag
            text = f"{flag} {text}"
        raise ConfigurationError(text if str(path) in text else f"{name}: {text}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigurationError(f"{name} is not UTF-8 text (byte {exc.start}): give a "
                                 f"{what} file") from exc
    except RecursionError as exc:
        raise ConfigurationError(f"{name} is nested too deeply to read") from exc
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as exc:
        # A YAML document of the wrong shape (a list where a mapping goes, a missing key)
        # reaches the loader's code as one of these.
        raise ConfigurationError(f"{name} does not have the expected shape "
                                 f"({describe_error(exc)})") from exc


def load_rules(path: Path, flag: str) -> Any:
    """QA rules from ``path`` (named by ``flag``), or one line saying what is wrong."""
    from revline.processors import Rules, load_yaml

    readable_file(path, "a rules YAML file", flag)
    with file_errors(path, flag):
        return Rules.from_mapping(load_yaml(path))


def writable_file(path: Path, flag: str) -> Path:
    """Checked before any work, so a typo in an output path does not waste a long read."""
    if "\x00" in str(path):
        raise ConfigurationError(f"{flag} {str(path)!r}: a path cannot hold a NUL character")
    if path.is_dir():
        raise ConfigurationError(f"{flag} {path} is a directory: give a file name")
    if path.is_fifo() or path.is_socket():  # opening a FIFO with no reader waits forever
        raise ConfigurationError(f"{flag} {path} is a pipe or socket: give a file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ConfigurationError(f"{flag} {path}: the directory {parent} does not exist")
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigurationError(f"{flag} {path} is not writable (check its permissions)")
    if not path.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigurationError(f"{flag} {path}: cannot create files in {parent}")
    return path


def write_output(path: Path, flag: str, write: typing.Callable[[Path], object]) -> None:
    """Run ``write(path)``; a file system failure is a one-line error naming the flag."""
    try:
        write(path)
    except OSError as exc:
        raise ConfigurationError(
            f"{flag} {path}: cannot write it ({exc.strerror or exc})") from exc


def _publish_file(
    path: Path | None, settings: Settings, *, topic: str | None, allow_raw: bool
) -> int:
    from revline.core.admin import ensure_topics
    from revline.operations.publisher import Publisher, publish_lines

    bootstrap = bootstrap_for(settings, start_if_missing=False)
    topic = topic or settings.input_topic
    ensure_topics(bootstrap, {topic: settings.input_partitions})
    total = None
    if path:
        with path.open("rb") as counted:
            total = sum(1 for _ in counted)
    publisher = Publisher(bootstrap, topic, settings=settings, serializer=serializer_for(settings))
    with _progress() as progress:
        task = progress.add_task(f"publishing to {escape(topic)}", total=total)
        source = path.open("rb") if path else sys.stdin.buffer
        try:
            report = publish_lines(
                publisher,
                _lines(source),
                allow_raw=allow_raw,
                progress=lambda n: progress.update(task, completed=n),
            )
        finally:
            if path:
                source.close()
    for number, why in report.rejected:
        err_console.print(Text.assemble((f"line {number}", "red"), ": ", why), soft_wrap=True)
    for failure in report.delivery_failures:
        err_console.print(Text.assemble(("delivery failed", "red"), ": ", failure),
                          soft_wrap=True)
    console.print(
        f"Published {report.sent:,} events to {topic} on {bootstrap}; "
        f"{len(report.rejected)} lines rejected.", markup=False, soft_wrap=True,
    )
    return 0 if report.ok else 1


def cmd_publish(args: argparse.Namespace, settings: Settings) -> int:
    path = None if args.file == "-" else Path(args.file)
    if path is not None:
        readable_file(path, "a JSON-lines file, or - for stdin")
    return _publish_file(path, settings, topic=args.topic, allow_raw=args.allow_raw)


# -- readback ------------------------------------------------------------------------
def cmd_readback(args: argparse.Namespace, settings: Settings) -> int:

    manifest = _manifest(Path(args.manifest))
    bootstrap = bootstrap_for(settings, start_if_missing=False)
    topic = args.topic or settings.input_topic
    report = _readback(bootstrap, topic, manifest, settings)
    return 0 if report.ok else 1


def _manifest(path: Path) -> dict[str, Any]:
    readable_file(path, "the manifest.json `revline generate` wrote", "--manifest")
    try:
        manifest = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ConfigurationError(f"--manifest {path} is not JSON: {exc}") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("inputs"), list):
        raise ConfigurationError(f"--manifest {path} is not a manifest: no \"inputs\" list "
                                 "(give the manifest.json `revline generate` wrote)")
    return manifest


def _readback(bootstrap: str, topic: str, manifest: dict[str, Any], settings: Settings) -> Any:
    from revline.core.readback import read_topic
    from revline.operations.verify import check_against_manifest

    with _progress() as progress:
        task = progress.add_task(f"reading {escape(topic)} back", total=len(manifest["inputs"]))
        report = check_against_manifest(
            read_topic(bootstrap, topic),
            manifest,
            deserializer_for(settings),
            progress=lambda n: progress.update(task, completed=n),
        )
    table = Table(title=Text(f"What landed on {topic}"))
    table.add_column("event type / failure")
    table.add_column("records", justify="right")
    for name, count in sorted(report.by_type.items()):
        table.add_row(Text(str(name)), f"{count:,}")
    for name, count in sorted(report.decode_errors.items()):
        table.add_row(Text(f"undecodable — {name}", style="yellow"), f"{count:,}")
    table.add_row("[bold]total[/bold]", f"[bold]{report.records:,}[/bold]")
    console.print(table)
    verdict = "[green]matches[/green]" if report.ok else "[red]does NOT match[/red]"
    console.print(
        f"{report.matched:,} of {len(manifest['inputs']):,} manifest inputs found and decoded as "
        f"expected; the topic {verdict} the manifest."
    )
    for problem in report.mismatches[:20]:
        err_console.print(Text.assemble(("mismatch", "red"), ": ", str(problem)), soft_wrap=True)
    if report.missing:
        err_console.print(Text.assemble(("missing inputs", "red"), ": ",
                                        str(report.missing[:20])), soft_wrap=True)
    return report


# -- demo ----------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    """Broker (if needed) → reference data → worker + sink → workload → outcomes and money."""
    from revline.cli.demo import DemoOptions, run_demo

    # One-shot: a configured cluster that is not there is one line within seconds, before
    # the workload or a Tryton database is built.
    bootstrap = bootstrap_for(settings, start_if_missing=True, one_shot=True)
    options = DemoOptions(orders=args.orders, seed=args.seed, hold_timeout=args.hold_timeout,
                          erp=args.erp)
    mark_running()  # the demo's own components stop on its KeyboardInterrupt
    try:
        return run_demo(options, settings, bootstrap, console, _progress)
    except subprocess.CalledProcessError as exc:
        if exc.returncode > 0:  # a step run as `revline …` printed its own one-line error
            return exc.returncode
        raise InfrastructureError(  # killed by a signal: it printed nothing
            f"the demo's step `revline {' '.join(map(str, exc.cmd[3:]))}` was killed by "
            f"signal {-exc.returncode}") from exc


# -- worker --------------------------------------------------------------------------
def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    # Its QA rules first: a bad file is one line naming it, before any broker wait.
    load_rules(settings.rules_file, "REVLINE_RULES_FILE")
    bootstrap = bootstrap_for(settings, start_if_missing=True)
    mark_running()  # Faust (or the supervisor) handles the signals from here
    if args.workers <= 1:
        from revline.streams import run

        run(settings, bootstrap)
        return 0
    return _run_worker_processes(args.workers, settings, bootstrap)


def _run_worker_processes(count: int, settings: Settings, bootstrap: str) -> int:
    """N processes in one consumer group split the partitions; SIGTERM stops them all."""
    commands = []
    for i in range(count):
        env = {"REVLINE_STATE_DIR": str(settings.state_dir / f"worker-{i}")}
        if settings.metrics_port:
            env["REVLINE_METRICS_PORT"] = str(settings.metrics_port + i)
        commands.append((("worker",), env))
    return _supervise(commands, bootstrap)


def _supervise(commands: Sequence[tuple[tuple[str, ...], dict[str, str]]],
               bootstrap: str) -> int:
    """Run ``revline COMMAND`` processes until SIGTERM/SIGINT, which is passed on to all.

    A component that dies (kill -9, a watchdog exit 75, a batch that could not be made
    durable, 70) is restarted, as a supervisor would: every component resumes from what
    is durable; so is one that exited 2 (its one-line error may be a broker that was away).
    More than ``_RESTARTS`` deaths of one component within ``_RESTART_WINDOW_S`` (a
    configuration error dies at once, every time), or a clean exit 0, stop them all: a
    half-running pipeline (a worker without its sink, say) is worse than a stopped one.
    """
    import signal

    def launch(args: tuple[str, ...], extra: dict[str, str]) -> subprocess.Popen[bytes]:
        env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap, **extra}
        return subprocess.Popen([sys.executable, "-m", "revline.cli", *args], env=env)

    procs = [launch(args, extra) for args, extra in commands]
    deaths: list[list[float]] = [[] for _ in commands]
    stopping = False

    def stop(signum: int = signal.SIGTERM, _frame: object = None) -> None:
        nonlocal stopping
        stopping = True
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    final: dict[int, int] = {}
    while not stopping:
        time.sleep(0.5)
        for n, proc in enumerate(procs):
            code = proc.poll()
            if code is None or stopping:
                continue
            args = commands[n][0]
            now = time.monotonic()
            deaths[n] = [t for t in deaths[n] if now - t < _RESTART_WINDOW_S] + [now]
            if code == 0 or len(deaths[n]) > _RESTARTS:
                final[n] = code
                stop()
                break
            err_console.print(f"revline {' '.join(args)} exited with {code}; restarting it "
                              f"({len(deaths[n])} of {_RESTARTS} in "
                              f"{_RESTART_WINDOW_S / 60:.0f} min)", markup=False)
            time.sleep(min(5.0, 0.5 * len(deaths[n])))
            procs[n] = launch(*commands[n])
    codes = [final.get(n, proc.wait()) for n, proc in enumerate(procs)]
    for (args, _), code in zip(commands, codes, strict=True):
        if code not in (0, -signal.SIGTERM):
            err_console.print(f"[red]revline {' '.join(args)} exited with {code}[/red]")
    return max((c for c in codes if c > 0), default=0)


_RESTARTS = 5
_RESTART_WINDOW_S = 600.0


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    """The whole pipeline: worker(s), sink, audit chainer, exception manager."""
    bootstrap = bootstrap_for(settings, start_if_missing=True)
    from revline.core.admin import ensure_operations_topics

    ensure_operations_topics(bootstrap, settings)  # before the auditor checks their shapes
    # Static group membership: the sink and the exception manager of this pipeline join
    # as <instance>-sink and <instance>-exceptions (a restarted one takes its place back).
    named = {"REVLINE_INSTANCE_ID": args.instance} if args.instance else {}
    commands: list[tuple[tuple[str, ...], dict[str, str]]] = [
        (("worker", "--workers", str(args.workers)), named),
        (("sink",), named),
        (("auditor", "--metrics-port", str(args.auditor_metrics_port)), named),
        (("exceptions", "run"), named),
    ]
    err_console.print(
        f"Running worker x{args.workers}, sink, auditor and exception manager on {bootstrap}; "
        "Ctrl-C (SIGTERM) stops them all."
    )
    mark_running()  # the supervisor passes a signal on to its components and waits
    return _supervise(commands, bootstrap)


def cmd_sink(args: argparse.Namespace, settings: Settings) -> int:
    """Validated topic → ledger and ERP until SIGTERM (or SIGINT)."""
    from revline.core._gc import freeze_long_lived
    from revline.core.admin import ensure_operations_topics, ensure_topics
    from revline.core.metrics import SinkMetrics
    from revline.core.startup import (
        claim_instance,
        group_instance_id,
        membership_config,
        wait_for_group_coordinator,
    )
    from revline.sinks.erp import erp_from_settings
    from revline.sinks.ledger import SqlLedger
    from revline.sinks.processor import SinkProcessor

    stop = stop_on_signals()
    bootstrap = bootstrap_for(settings, start_if_missing=True)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    group = args.group or settings.sink_group_id
    instance = args.instance or settings.instance_id
    claim_instance(settings.state_dir, f"{group}-{group_instance_id('sink', instance)}")
    n = settings.input_partitions
    # Start-up waits out a cold cluster (REVLINE_STARTUP_TIMEOUT_S), saying what for.
    ensure_topics(bootstrap, {settings.validated_topic: n, settings.exceptions_topic: n},
                  startup_timeout_s=settings.startup_timeout_s)
    ensure_operations_topics(bootstrap, settings)
    wait_for_group_coordinator(bootstrap, group, component="sink",
                               timeout_s=settings.startup_timeout_s)
    metrics = SinkMetrics()
    port = metrics.serve(settings.sink_metrics_port, settings.metrics_host)
    erp = erp_from_settings(settings)
    erp_where = (redact_url(settings.tryton_url) if settings.tryton_url
                 else f"in-memory, kept in {settings.memory_erp_file}"
                 if settings.memory_erp_file is not None
                 else "in-memory: lives as long as this process")
    membership = membership_config(settings.session_timeout_s, "sink", instance)
    err_console.print(
        f"sink: {settings.validated_topic} → ledger {redact_url(settings.ledger_url)} and ERP "
        f"{erp.name} ({erp_where}); group {group} as {membership['group.instance.id']}; "
        f"metrics on :{port}/metrics",
        markup=False, soft_wrap=True,
    )
    # A database still starting (or restarting) is waited for, as the broker is.
    with SqlLedger(settings.ledger_url, wait_s=settings.startup_timeout_s) as ledger:
        processor = SinkProcessor(
            bootstrap, settings.validated_topic, group,
            ledger, erp, settings.exceptions_topic, metrics,
            batch_size=args.batch_size or settings.sink_batch_size,
            poll_timeout_s=settings.sink_poll_timeout_s,
            audit_topic=settings.audit_facts_topic,
            decoder=deserializer_for(settings),
            crash_after_erp_writes=settings.sink_crash_after_erp_writes,
            consumer_config=membership,
        )
        freeze_long_lived()  # everything set up lives as long as the process
        mark_running()
        processor.run(stop)
    return 0


def cmd_reference(args: argparse.Namespace, settings: Settings) -> int:
    from revline.processors import ReferenceData, load_yaml
    from revline.streams import publish_reference

    # The file first: a typo in it is refused before any wait on the broker.
    path = Path(args.file) if args.file else settings.reference_file
    readable_file(path, "a reference YAML file", "--file" if args.file else "")
    with file_errors(path, "--file" if args.file else "REVLINE_REFERENCE_FILE"):
        data = load_yaml(path)
        version = ReferenceData.from_mapping(data).version  # malformed: said before connecting
    bootstrap = bootstrap_for(settings, start_if_missing=False)
    count = publish_reference(bootstrap, settings.reference_topic, data)
    console.print(
        f"Published {count} reference items (version {version}) from {path} "
        f"to {settings.reference_topic}."
    )
    return 0


def cmd_holds(args: argparse.Namespace, settings: Settings) -> int:
    from revline.streams.inspect import held_events

    bootstrap = bootstrap_for(settings, start_if_missing=False)
    rows = held_events(bootstrap, settings)
    table = Table(title=f"Held events ({len(rows)})")
    for column in ("order", "event", "waiting for", "held since", "age", "input"):
        table.add_column(column)
    now = time.time()
    for row in rows[: args.limit]:
        since = row["since_ms"] / 1000
        try:
            held_since = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(since)) + "Z"
        except (OverflowError, ValueError, OSError):  # out of range: show the number
            held_since = f"{row['since_ms']} ms"
        table.add_row(*(Text(str(cell)) for cell in (  # data, never markup
            row["order_id"], row["event_type"], ", ".join(map(str, row["waiting_for"])),
            held_since, f"{(now - since) / 60:.1f} min", row["coords"],
        )))
    console.print(table)
    return 0


# -- bench ---------------------------------------------------------------------------
def cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    from revline.tools.backtest_bench import BacktestBenchOptions
    from revline.tools.bench import (
        ErpBenchOptions,
        ReadModelBenchOptions,
        SinkBenchOptions,
        ledger_target,
        rich_progress_callback,
        run_benchmark,
    )

    if args.out:
        writable_file(Path(args.out), "--out")
    only: set[str] | None = set(args.only) if args.only else None
    if only is not None:
        if args.no_pipeline or args.no_sinks or args.sinks_only:
            raise ConfigurationError("--only names the sections to run; leave out --no-pipeline, "
                             "--no-sinks and --sinks-only")
        args.no_pipeline = "pipeline" not in only
        args.no_sinks = "sinks" not in only
    erp = read_model = None
    if args.erp or (only is not None and "erp" in only):
        import importlib.util

        if importlib.util.find_spec("trytond") is None:
            raise ConfigurationError("--erp tryton needs trytond (the development dependencies: "
                             "pip install -e '.[dev]')")
        erp = ErpBenchOptions(**{k: v for k, v in {
            "adapter": args.erp, "events": args.erp_events, "batch": args.erp_batch,
        }.items() if v is not None})
    if args.read_model or (only is not None and "read-model" in only):
        read_model = ReadModelBenchOptions(**{k: v for k, v in {
            "sizes": args.read_model, "runs": args.read_model_runs,
        }.items() if v is not None})
    backtest = None
    if args.backtest or (only is not None and "backtest" in only):
        backtest = BacktestBenchOptions(**{k: v for k, v in {
            "orders": args.backtest_orders, "runs": args.backtest_runs}.items() if v is not None})
    memory = None
    if args.memory or (only is not None and "memory" in only):
        from revline.tools.memory_bench import MemoryBenchOptions

        memory = MemoryBenchOptions(**({"sizes": args.memory} if args.memory else {}))
    for flag, section in (("--erp", "erp"), ("--read-model", "read-model"),
                          ("--backtest", "backtest"), ("--memory", "memory")):
        if only is not None and getattr(args, section.replace("-", "_")) and section not in only:
            raise ConfigurationError(f"{flag} asks for the {section} section, which --only "
                                     "leaves out: add it to --only")
    sinks = None
    if not args.no_sinks:
        url, origin = ledger_target(args.ledger_dsn, settings.ledger_url)
        given = {
            "ledger_events": args.ledger_events,
            "ledger_batch": args.ledger_batch,
            "e2e_events": args.e2e_events,
            "e2e_seconds": args.e2e_seconds,
            "worker_batch_within_s": args.e2e_batch_within,
            "sink_batch": args.e2e_sink_batch,
            "sink_poll_timeout_s": args.e2e_sink_poll_timeout,
        }
        # Flags left out keep SinkBenchOptions' defaults (one place for them).
        sinks = SinkBenchOptions(
            ledger_url=url,
            ledger_origin=origin,
            **{k: v for k, v in given.items() if v is not None},
        )
    include_pipeline = not (args.no_pipeline or args.sinks_only)
    include_baselines = not args.sinks_only and (only is None or "contenders" in only)
    kafka = include_pipeline or include_baselines or sinks is not None
    bootstrap = (bootstrap_for(settings, start_if_missing=True, one_shot=True)
                 if kafka else None)
    mark_running()  # the benchmark stops what it started on its KeyboardInterrupt
    with _progress() as progress:
        report = run_benchmark(
            events=args.events,
            partitions=args.partitions,
            bootstrap=bootstrap,
            include_pipeline=include_pipeline,
            progress=rich_progress_callback(progress),
            pace_seconds=args.pace_seconds,
            include_baselines=include_baselines,
            sinks=sinks,
            settings=settings,
            erp=erp,
            read_model=read_model,
            backtest=backtest,
            memory=memory,
        )
    console.print(report.to_rich())
    if args.out:
        write_output(Path(args.out), "--out", lambda p: p.write_text(report.to_markdown()))
        console.print(f"Wrote {args.out}", markup=False)
    return 0 if report.ok else 1


# -- parser --------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one ``error: …`` line (exit 2)."""

    def error(self, message: str) -> typing.NoReturn:
        print_error(f"{self.prog}: {_one_line(message)} (see `{self.prog} --help`)")
        self.exit(2)


def _bounded_int(low: int, high: int | None = None) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            span = f"from {low} to {high}" if high is not None else f"{low} or more"
            raise argparse.ArgumentTypeError(f"{value} is out of range: give {span}")
        return value

    parse.__name__ = "whole number"  # argparse names the type in its messages
    return parse


def _bounded_float(low: float, high: float | None = None) -> Any:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (value >= low and (high is None or value <= high)):  # also refuses nan
            span = f"from {low:g} to {high:g}" if high is not None else f"{low:g} or more"
            raise argparse.ArgumentTypeError(f"{text} is out of range: give {span}")
        return value

    parse.__name__ = "number"
    return parse


def _instance_name(text: str) -> str:
    import re

    if not re.fullmatch(r"[A-Za-z0-9._-]{1,100}", text):
        raise argparse.ArgumentTypeError(
            f"{text!r}: use 1 to 100 letters, digits, '.', '_' or '-'")
    return text


# Shared argument types: a count, a limit, a size, a share, a time span.
_BENCH_SECTIONS = ("contenders", "pipeline", "sinks", "erp", "read-model",  # bench.SECTIONS
                   "backtest", "memory")


def _bench_sections(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in _BENCH_SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"{', '.join(unknown) or 'nothing'}: choose from {', '.join(_BENCH_SECTIONS)}")
    return names


def _sizes(text: str) -> tuple[int, ...]:
    parse = _bounded_int(100, 10**8)
    sizes = tuple(parse(n.strip()) for n in text.split(",") if n.strip())
    if not sizes:
        raise argparse.ArgumentTypeError("give sizes such as 10000,1000000")
    return sizes


COUNT = _bounded_int(0, 10**9)
POSITIVE = _bounded_int(1, 10**9)
PORT = _bounded_int(-1, 65535)
SHARE = _bounded_float(0.0, 1.0)
SECONDS = _bounded_float(0.0, 10**7)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="revline",
        description="Revline: an auditable Kafka pipeline for revenue operations.",
    )
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show the traceback too (or set REVLINE_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("broker", help="start, stop or inspect the local Kafka broker (or cluster)")
    p.add_argument("action", choices=["start", "stop", "status", "restart", "reset"],
                   help="stop/start/restart keep topics, records and offsets; reset deletes them")
    p.add_argument("--fresh", action="store_true",
                   help="with start/restart: delete every topic first and pick new ports")
    p.add_argument("--yes", action="store_true", help="with reset: do not ask for confirmation")
    p.add_argument("--nodes", type=POSITIVE, default=None, metavar="N",
                   help="a local cluster of N combined controller+broker nodes "
                        "(replication factor 3 and min.insync.replicas 2 from 3 nodes)")
    p.add_argument("--secure", action="store_true",
                   help="the cluster with SASL_SSL (SCRAM-SHA-512), TLS and ACLs; its client "
                        "settings are written to a client.env to source")
    p.set_defaults(func=cmd_broker)

    p = sub.add_parser(
        "demo", help="start a broker if needed, publish a workload, show what landed"
    )
    p.add_argument("--orders", type=POSITIVE, default=120,
                   help="orders to generate (default 120; Tryton applies ~3 events/s)")
    p.add_argument("--seed", type=COUNT, default=7)
    p.add_argument("--hold-timeout", type=SECONDS, default=5.0,
                   help="seconds a hold may wait in the demo (default 5)")
    p.add_argument("--erp", choices=["auto", "tryton", "memory"], default="auto",
                   help="auto: a local Tryton when installed, else the in-memory ERP")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("generate", help="write a realistic workload and its manifest")
    p.add_argument("--orders", type=POSITIVE, default=100)
    p.add_argument("--seed", type=COUNT, default=1)
    p.add_argument("--run-id", dest="run_id", help="prefix of order ids (default: r<seed>)")
    p.add_argument("--out", default="workload", help="directory for events.jsonl, manifest.json")
    for name, help_text in [
        ("duplicates", "share of events re-sent with the same body"),
        ("conflicts", "share of invoices/payments re-sent with a different body"),
        ("out-of-order", "share of orders delivered shuffled"),
        ("incomplete", "share of orders with an incomplete booking"),
        ("off-policy", "share of orders with an off-policy price or discount"),
        ("unknown-attribution", "share of orders with an unknown campaign or channel"),
        ("amount-mismatch", "share of orders whose amounts do not reconcile"),
        ("poison", "share of inputs that are poison bytes"),
    ]:
        p.add_argument(f"--{name}", dest=name.replace("-", "_"), type=SHARE, help=help_text)
    p.add_argument("--orphans", type=COUNT, help="amendments whose booking never arrives")
    p.add_argument("--publish", action="store_true", help="also publish to the input topic")
    p.add_argument("--topic", help="topic to publish to (default: the input topic)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("publish", help="publish JSON lines of canonical events (FILE or -)")
    p.add_argument("file", metavar="FILE|-")
    p.add_argument("--topic", help="default: the input topic (REVLINE_INPUT_TOPIC)")
    p.add_argument(
        "--allow-raw",
        action="store_true",
        help='send {"__raw__": base64} lines as-is (for testing the dead-letter path)',
    )
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("worker", help="run the stream core (dedup, holds, QA, routing)")
    p.add_argument("--workers", type=POSITIVE, default=1,
                   help="processes sharing the partitions")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser(
        "run", help="the whole pipeline: worker, sink, auditor, exception manager (until SIGTERM)"
    )
    p.add_argument("--workers", type=POSITIVE, default=1, help="worker processes")
    p.add_argument("--auditor-metrics-port", type=PORT, default=9102)
    p.add_argument("--instance", type=_instance_name,
                   help="this pipeline's name in its consumer groups (static membership); "
                        "default REVLINE_INSTANCE_ID, else the host name")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("sink", help="apply validated events to the ledger and the ERP")
    p.add_argument("--group", help="consumer group (default: <app id>-sink)")
    p.add_argument("--batch-size", type=POSITIVE, help="events per batch (default 300)")
    p.add_argument("--instance", type=_instance_name,
                   help="this sink's name in its group (static membership: a restart takes "
                        "its partitions back at once); default REVLINE_INSTANCE_ID, else the "
                        "host name. Give each of several sinks on one host its own")
    p.set_defaults(func=cmd_sink)

    p = sub.add_parser("reference", help="publish reference data (products, campaigns, channels)")
    p.add_argument("action", choices=["load"])
    p.add_argument("--file", help="YAML file (default: the bundled reference.yaml)")
    p.set_defaults(func=cmd_reference)

    p = sub.add_parser("holds", help="list held events: order, waiting for what, since when")
    p.add_argument("--limit", type=COUNT, default=200)
    p.set_defaults(func=cmd_holds)

    p = sub.add_parser("readback", help="read a topic back and compare it with a manifest")
    p.add_argument("--manifest", required=True)
    p.add_argument("--topic")
    p.set_defaults(func=cmd_readback)

    p = sub.add_parser(
        "bench", help="pipeline vs bare Faust vs raw loop; ledger lines/s; input → ledger latency"
    )
    p.add_argument("--events", type=POSITIVE, default=20000, help="events per contender (20000)")
    p.add_argument("--partitions", type=POSITIVE, default=3)
    p.add_argument("--pace-seconds", type=SECONDS, default=10.0,
                   help="contenders' latency runs, seconds each (10)")
    p.add_argument("--no-pipeline", action="store_true", help="skip the pipeline contender")
    p.add_argument("--no-sinks", action="store_true", help="skip the ledger and end-to-end runs")
    p.add_argument("--sinks-only", action="store_true", help="only the ledger and end-to-end runs")
    p.add_argument("--ledger-dsn", metavar="DSN",
                   help="ledger database; journals stay in it, so use a scratch one (default: "
                        "REVLINE_LEDGER_DSN if PostgreSQL, else a temporary SQLite file)")
    p.add_argument("--ledger-events", type=POSITIVE,
                   help="money events posted for ledger lines/s (20000)")
    p.add_argument("--ledger-batch", type=POSITIVE, help="events per ledger post (500)")
    p.add_argument("--e2e-events", type=POSITIVE,
                   help="burst measuring the end-to-end sustained maximum (5000)")
    p.add_argument("--e2e-seconds", type=SECONDS,
                   help="end-to-end latency run at half that maximum, seconds (15)")
    p.add_argument("--e2e-batch-within", type=SECONDS,
                   help="the worker's REVLINE_BATCH_WITHIN_S (longest idle wait) in the "
                        "end-to-end run (0.05, its default)")
    p.add_argument("--e2e-sink-batch", type=POSITIVE, help="sink batch size, end-to-end run (300)")
    p.add_argument("--e2e-sink-poll-timeout", type=SECONDS,
                   help="sink poll timeout (longest wait for a first record), end-to-end "
                        "run (0.05, its default)")
    p.add_argument("--only", type=_bench_sections, metavar="SECTION[,SECTION…]",
                   help="run only these: " + ", ".join(_BENCH_SECTIONS) + " (e.g. "
                        "--only erp,read-model: no broker needed)")
    p.add_argument("--erp", choices=["tryton"],
                   help="also compare per-document apply with batched apply_many on this ERP "
                        "(fresh trytond databases; target ≥ 10×)")
    p.add_argument("--erp-events", type=POSITIVE, help="validated events applied (150)")
    p.add_argument("--erp-batch", type=POSITIVE, help="events per apply_many call (200)")
    p.add_argument("--read-model", type=_sizes, metavar="N,N…",
                   help="also time audit, exceptions list and report on read models of these "
                        "sizes (e.g. 10000,1000000; target: the largest ≤ 2× the smallest "
                        "and < 1 s)")
    p.add_argument("--read-model-runs", type=POSITIVE, help="timed runs per command (5)")
    p.add_argument("--backtest", action="store_true",
                   help="also time `revline rules backtest` against the worker's in-process "
                        "engine on one generated week (target ≥ 20,000 events/s)")
    p.add_argument("--backtest-orders", type=POSITIVE, help="orders in that week (10000)")
    p.add_argument("--backtest-runs", type=POSITIVE, help="runs of each, alternating (3)")
    p.add_argument("--memory", type=_sizes, metavar="N,N…",
                   help="also measure the worker's, exception manager's and auditor's memory "
                        "after generated histories of these many orders (10000,100000,1000000; "
                        "each in its own process; target: roughly flat)")
    p.add_argument("--out", metavar="FILE.md", help="also write the markdown tables here")
    p.set_defaults(func=cmd_bench)

    # Operations commands live in their own modules; each adds its parsers here.
    import importlib

    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


_COMMAND_MODULES = (
    "revline.cli.audit",  # auditor, audit ORDER_ID, audit verify
    "revline.cli.exceptions",  # exceptions run|list|show|ack|resolve|waive, override
    "revline.cli.replay",  # replay, redrive
    "revline.cli.reconcile",  # reconcile, shadow parity
    "revline.cli.report",  # report
    "revline.cli.rules",  # rules backtest|validate
    "revline.cli.index",  # index rebuild|status (the operators' read model)
    "revline.cli.chaos",  # chaos (faults on the 3-node cluster, checked and measured)
)


def _debug_requested(argv: Sequence[str]) -> bool:
    env = os.environ.get("REVLINE_DEBUG", "").strip().lower()
    return "--debug" in argv or env not in ("", "0", "false", "no", "off")


def _one_line(text: str) -> str:
    """A message as one line: a person reads it, a log greps it."""
    return " ".join(part.strip() for part in text.splitlines() if part.strip()) or "(no message)"


def describe_error(exc: BaseException) -> str:
    """What went wrong, in one line, for a failure nobody raised on purpose."""
    if isinstance(exc, RevlineError):
        return _one_line(str(exc))
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename is not None else ""
        return _one_line(f"{exc.strerror}{where}")
    text = str(exc)
    return _one_line(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


def settings_error(exc: Exception) -> ConfigurationError:
    """A pydantic-settings failure as one line naming each environment variable."""
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError):
        return ConfigurationError(f"cannot read the settings: {describe_error(exc)}")
    problems = []
    for err in exc.errors():
        name = str(err["loc"][0]) if err["loc"] else "?"
        field_info = Settings.model_fields.get(name)
        alias = getattr(field_info, "validation_alias", None) if field_info else None
        choices = getattr(alias, "choices", None)
        variable = str(choices[0]) if choices else f"REVLINE_{name.upper()}"
        value = err.get("input")
        shown = f"={value!r}" if isinstance(value, str | int | float) else ""
        problems.append(f"{variable}{shown}: {err['msg']}")
    return ConfigurationError("; ".join(problems) + " (fix or unset the environment variable)")


def load_settings() -> Settings:
    from revline.core.kafka_config import validate

    try:
        settings = Settings()
        validate(settings)  # the files the security settings name exist and agree
        return settings
    except RevlineError:
        raise  # already one clear line naming the variable
    except Exception as exc:  # pydantic ValidationError, or a bad .env / dotenv value
        raise settings_error(exc) from exc


def print_error(message: str) -> None:
    err_console.print(Text.assemble(("error:", "red"), " ", message), soft_wrap=True)


class _QuietLastResort(logging.Handler):
    """What Python's last-resort handler does for a one-shot command's WARNING+ records
    (a long-running command's basicConfig prints them itself), without librdkafka's:
    against a broker that is away it logs a FAIL line per reconnect (hundreds before the
    command's own error), and that error says it in one line. --debug shows them."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def _someone_else_prints(self) -> bool:
        # As Python's last resort: only when no other handler would see the record (the
        # demo logs revline.* to its own file; basicConfig gives the root a handler).
        mine = logging.getLogger("revline")
        return bool(logging.getLogger().handlers) or any(h is not self for h in mine.handlers)

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.endswith(".kafka") or self._someone_else_prints():
            return
        with contextlib.suppress(Exception):
            sys.stderr.write(_one_line(self.format(record)) + "\n")


_ASCII_FALLBACK = {"→": "->", "←": "<-", "—": "-", "–": "-", "…": "...", "×": "x", "≥": ">=",
                   "≤": "<=", "✓": "ok", "✗": "x", "‘": "'", "’": "'", "“": '"',
                   "”": '"'}


def _degrade(exc: UnicodeError) -> tuple[str, int]:
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    text = exc.object[exc.start:exc.end]
    return "".join(_ASCII_FALLBACK.get(ch, "?") for ch in text), exc.end


def _tolerant_streams() -> None:
    """A terminal or pipe that cannot show a character (PYTHONIOENCODING=ascii, a C locale)
    gets an ASCII stand-in ("->" for "→", "?" else) instead of a UnicodeEncodeError."""
    import codecs

    codecs.register_error("revline-ascii", _degrade)
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("_", "-")
        if callable(reconfigure) and encoding not in ("utf-8", "utf8"):
            with contextlib.suppress(Exception):
                reconfigure(errors="revline-ascii")


def main(argv: Sequence[str] | None = None) -> int:
    """Every failure is one ``error: …`` line and exit 2 (``--debug``: the traceback too)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(arguments)
    _tolerant_streams()
    quiet = _QuietLastResort()
    if not debug:
        logging.getLogger("revline").addHandler(quiet)
    try:
        return _main(arguments, debug)
    finally:
        logging.getLogger("revline").removeHandler(quiet)


def _main(arguments: list[str], debug: bool) -> int:
    try:
        args = build_parser().parse_args(arguments)
        debug = debug or bool(getattr(args, "debug", False))
        settings = load_settings()
        result: int = args.func(args, settings)
        return result
    except KeyboardInterrupt:
        _say_interrupted()
        return 130
    except SystemExit:
        raise  # argparse (--help, a usage error) and commands that exit on purpose
    except BaseException as exc:  # the CLI's one error boundary
        if debug:
            import traceback

            traceback.print_exc(file=sys.stderr)
        elif not isinstance(exc, RevlineError):
            print_error(describe_error(exc) + " (REVLINE_DEBUG=1 or --debug shows the traceback)")
            return 2
        print_error(describe_error(exc))
        return 2
