"""CLI commands: rules backtest, rules validate.

``revline rules backtest`` replays recorded inputs (the input topic over a time
window, or a JSON-lines export) through the pure engine twice, with the live
rules and with a candidate, and reports what would change
(``revline.processors.backtest``). Nothing is written to Kafka and no state is touched.
Exit 0: no decision changes (or at most ``--max-changes``); 1: more change; 2: error.
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from revline.core.errors import ConfigurationError, InfrastructureError

if TYPE_CHECKING:
    from rich.console import Console

    from revline.core.settings import Settings
    from revline.processors import InputRecord, Rules
    from revline.processors.backtest import BacktestReport, ReferenceTimeline, Side
    from revline.processors.ownership import Ownership

_UNIT_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
TIMESTAMP_KEY = "__timestamp_ms__"  # optional in a JSON-lines export: the record's time


def register(sub: Any) -> None:
    """Add this module's commands to the ``revline`` parser (``sub``: its subparsers)."""
    from revline.cli import COUNT

    rules = sub.add_parser(
        "rules", help="QA rules: backtest a change against recorded inputs, validate a file",
        description="Work on QA rules (rules.yaml) and ownership rules (ownership.yaml) "
        "before they go live.",
    )
    actions = rules.add_subparsers(dest="rules_command", required=True, metavar="ACTION")

    p = actions.add_parser(
        "backtest",
        help="replay recorded inputs with the live rules and a candidate; report what changes",
        description="Replay the input topic over a time window (or a JSON-lines export) "
        "through the decision engine twice, with the live rules (REVLINE_RULES_FILE, "
        "REVLINE_OWNERSHIP_FILE) and with the candidate, and report every decision that "
        "changes: by kind, check, severity and owner, with the money held back or released "
        "and the owners' workload. Nothing is written. Exit 0 when at most --max-changes "
        "decisions change, 1 when more do, 2 on an error.",
    )
    p.add_argument("--rules", metavar="NEW.yaml",
                   help="the candidate QA rules (default: the live ones, with --ownership)")
    p.add_argument("--ownership", metavar="NEW.yaml",
                   help="candidate ownership rules (default: the live ones)")
    window = p.add_mutually_exclusive_group()
    window.add_argument("--since", metavar="T",
                        help="window from T to now: a duration ago (7d, 36h, 90m) or an ISO "
                        "8601 time (no zone = UTC)")
    window.add_argument("--from", dest="from_", metavar="T", help="window start (with --to)")
    p.add_argument("--to", metavar="T", help="window end (default: now)")
    p.add_argument("--input", metavar="FILE.jsonl",
                   help="replay a JSON-lines export (the lines `revline publish` takes; an "
                   f"optional \"{TIMESTAMP_KEY}\" gives a line's time) instead of the topic")
    p.add_argument("--topic", help="input topic (default: REVLINE_INPUT_TOPIC)")
    p.add_argument("--warmup", default="1d", metavar="DURATION",
                   help="also read this long before the window to rebuild the state of orders "
                   "that started earlier; those decisions are not counted (default 1d; 0 = none)")
    p.add_argument("--reference-file", metavar="FILE.yaml",
                   help="judge against this reference data for the whole window (default: the "
                   "reference topic as it stood; with --input, REVLINE_REFERENCE_FILE)")
    p.add_argument("--verify-recorded", action="store_true",
                   help="also compare the live rules' replay with the outcomes the worker "
                   "recorded (REVLINE_OUTCOMES_TOPIC) for the same inputs")
    p.add_argument("--max-changes", type=COUNT, default=0,
                   help="exit 1 only when more decisions than this change (default 0)")
    p.add_argument("--samples", type=COUNT, default=3,
                   help="sample inputs shown per kind of change (default 3)")
    p.add_argument("--show", type=COUNT, default=20,
                   help="changed inputs listed in the terminal (default 20; --json has all)")
    p.add_argument("--json", metavar="FILE", help="write the whole report as JSON here")
    p.add_argument("--html", metavar="FILE", help="write the report as one HTML page here")
    p.set_defaults(func=cmd_backtest)

    p = actions.add_parser(
        "validate",
        help="check a rules file: it parses, every check has a severity and owner, new version",
        description="Check a candidate rules file before a backtest or a deploy: it parses, "
        "every check id the live rules know has a severity and an owner, and its version "
        "differs from the live one's. Exit 0 when valid, 1 when not.",
    )
    p.add_argument("file", metavar="FILE.yaml")
    p.add_argument("--ownership", metavar="FILE.yaml", help="also check ownership rules")
    p.set_defaults(func=cmd_validate)


# -- loading the two sides -----------------------------------------------------------------
def _load_rules(path: Path, flag: str) -> Rules:
    from revline.cli import load_rules

    rules: Rules = load_rules(path, flag)
    return rules


def _load_ownership(path: Path, flag: str) -> Ownership:
    from revline.cli import file_errors, readable_file
    from revline.processors.ownership import load_ownership

    readable_file(path, "an ownership YAML file", flag)
    with file_errors(path, flag):
        return load_ownership(path)


def _sides(args: argparse.Namespace, settings: Settings) -> tuple[Side, Side]:
    from revline.processors.backtest import Side, missing_checks

    live_rules = _load_rules(settings.rules_file, "REVLINE_RULES_FILE")
    live_ownership = _load_ownership(settings.ownership_file, "REVLINE_OWNERSHIP_FILE")
    if not (args.rules or args.ownership):
        raise ConfigurationError("give the candidate: --rules NEW.yaml and/or --ownership "
                                 "NEW.yaml")
    rules_path = Path(args.rules) if args.rules else settings.rules_file
    rules = _load_rules(rules_path, "--rules") if args.rules else live_rules
    ownership_path = Path(args.ownership) if args.ownership else settings.ownership_file
    ownership = (_load_ownership(ownership_path, "--ownership") if args.ownership
                 else live_ownership)
    missing = missing_checks(rules, live_rules)
    if missing:
        raise ConfigurationError(
            f"--rules {rules_path}: no severity/owner for {', '.join(missing)} (the live rules "
            "have them and the engine reports them): add them under checks:")
    return (Side("current", live_rules, live_ownership, str(settings.rules_file),
                 str(settings.ownership_file)),
            Side("candidate", rules, ownership, str(rules_path), str(ownership_path)))


# -- the window ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Window:
    from_ms: int | None  # None: from the start of the file
    to_ms: int | None  # None: to its end
    warmup_ms: int

    @property
    def read_from_ms(self) -> int | None:
        return None if self.from_ms is None else max(0, self.from_ms - self.warmup_ms)

    def place(self, timestamp_ms: int) -> str:
        """"skip" (before the warm-up, or at/after the end), "warmup" or "counted"."""
        if self.to_ms is not None and timestamp_ms >= self.to_ms:
            return "skip"
        if self.from_ms is None or timestamp_ms >= self.from_ms:
            return "counted"
        start = self.read_from_ms
        return "warmup" if start is not None and timestamp_ms >= start else "skip"


def parse_duration_ms(text: str, flag: str) -> int:
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text.lower())
    if not match:
        raise ConfigurationError(f"{flag} {text!r}: give a duration such as 0, 12h, 1d, 2w")
    value = float(match.group(1))
    unit = match.group(2) or ("s" if value else "d")
    if match.group(2) == "" and value:
        raise ConfigurationError(f"{flag} {text!r}: give a unit (s, m, h, d, w), e.g. 1d")
    return int(value * _UNIT_MS[unit])


def _window(args: argparse.Namespace, now_ms: int) -> Window:
    from revline.operations.replay import parse_when

    warmup = parse_duration_ms(args.warmup, "--warmup")
    if args.to and not (args.from_ or args.input):
        raise ConfigurationError("--to needs --from (or --input): --since always ends now")
    if args.since:
        return Window(parse_when(args.since), now_ms, warmup)
    if args.from_:
        start = parse_when(args.from_)
        end = parse_when(args.to) if args.to else now_ms
        if end <= start:
            raise ConfigurationError(f"--to {args.to!r} is not after --from {args.from_!r}")
        return Window(start, end, warmup)
    if args.input:
        return Window(None, parse_when(args.to) if args.to else None, warmup)
    raise ConfigurationError("give the window: --since 7d, or --from T [--to T] "
                             "(or --input FILE.jsonl for an export)")


# -- reading the inputs --------------------------------------------------------------------
@dataclass
class ReadStats:
    source: str
    read: int = 0
    skipped: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)  # file lines not published
    partitions: dict[int, dict[str, int]] = field(default_factory=dict)


def _consumer(bootstrap: str) -> Any:
    from confluent_kafka import Consumer

    from revline.core.kafka_config import client_config

    return Consumer(client_config("consumer", bootstrap, {
        "group.id": f"revline-backtest-{uuid.uuid4().hex[:8]}",
        "enable.auto.commit": False, "enable.partition.eof": True,
        "isolation.level": "read_committed", "log_level": 3}))


Ranges = dict[int, tuple[int, int, int]]  # partition -> (first offset, first counted, end)


def plan_window(bootstrap: str, topic: str, window: Window) -> Ranges:
    """Per partition, the offsets to read: from the warm-up start, counted from the window's
    start, up to its end, from the broker's time index (``offsets_for_times``: the first
    offset whose timestamp is at or after the time; none means the partition's end)."""
    from confluent_kafka import KafkaException, TopicPartition

    from revline.core.readback import watermarks

    consumer = _consumer(bootstrap)
    try:
        try:
            metadata = consumer.list_topics(topic, timeout=30)
        except KafkaException as exc:
            raise InfrastructureError(f"cannot reach Kafka at {bootstrap}: {exc}") from exc
        if topic not in metadata.topics or metadata.topics[topic].error is not None:
            raise InfrastructureError(f"topic {topic} does not exist on {bootstrap} (give the "
                                      "input topic with --topic or REVLINE_INPUT_TOPIC)")
        partitions = sorted(metadata.topics[topic].partitions)
        marks = {p: watermarks(consumer, topic, p) for p in partitions}

        def offsets_at(ms: int | None, edge: int) -> dict[int, int]:
            if ms is None:
                return {p: marks[p][edge] for p in partitions}
            try:
                found = consumer.offsets_for_times(
                    [TopicPartition(topic, p, ms) for p in partitions], timeout=30)
            except KafkaException as exc:
                raise InfrastructureError(f"cannot look up offsets by time on {topic}: {exc}"
                                          ) from exc
            out = {}
            for tp in found:
                if tp.error is not None:
                    raise InfrastructureError(f"offsets_for_times {topic}/{tp.partition}: "
                                              f"{tp.error}")
                out[tp.partition] = tp.offset if tp.offset >= 0 else marks[tp.partition][1]
            return out

        begin = offsets_at(window.read_from_ms, 0)
        counted_from = offsets_at(window.from_ms, 0)
        end = offsets_at(window.to_ms, 1)
        return {p: (begin[p], counted_from[p], end[p]) for p in partitions}
    finally:
        consumer.close()


def read_window(bootstrap: str, topic: str, ranges: Ranges, stats: ReadStats,
                progress: Callable[[int, int], None] | None = None,
                timeout: float = 600.0) -> Iterator[tuple[InputRecord, bool]]:
    """(record, counted) for every input in ``ranges``, each partition in offset order: a
    record is counted from the window's first offset on, whatever later timestamps say."""

    from revline.processors import InputRecord

    stats.partitions = {p: {"from_offset": b, "counted_from_offset": c, "end_offset": e}
                        for p, (b, c, e) in ranges.items()}
    todo = {p: (b, e) for p, (b, _, e) in ranges.items() if e > b}
    if not todo:
        return
    total = sum(e - b for b, e in todo.values())
    from revline.core.readback import read_topic

    def counted(done: int, _offsets: int) -> None:
        stats.read = done
        if progress is not None:
            progress(done, total)

    for msg in read_topic(bootstrap, topic, ranges=todo, timeout=timeout, progress=counted):
        p, offset, value = msg.partition() or 0, msg.offset() or 0, msg.value()
        yield InputRecord(
            topic=topic, partition=p, offset=offset, key=msg.key(),
            value=value if value is not None else b"", headers=_headers(msg.headers()),
            timestamp_ms=msg.timestamp()[1],
        ), offset >= ranges[p][1]


def _headers(raw: Any) -> tuple[tuple[str, bytes], ...]:
    pairs = raw.items() if isinstance(raw, dict) else (raw or ())
    return tuple((k, v if isinstance(v, bytes) else b"" if v is None
                  else str(v).encode(errors="replace")) for k, v in pairs)


def read_file(path: Path, window: Window, stats: ReadStats, serializer: Any,
              progress: Callable[[int, int], None] | None = None,
              ) -> Iterator[tuple[InputRecord, bool]]:
    """(record, counted) for each line of a JSON-lines export, as `revline publish` would
    have sent it: partition 0, offset = line number - 1, the order id as key, the line
    number as the source-line header. A line's time is its ``__timestamp_ms__`` if given,
    else its event's ``occurred_at``; a line `revline publish` would refuse is skipped
    (and counted)."""
    import base64
    import binascii
    from datetime import datetime

    from revline.operations.publisher import SOURCE_LINE_HEADER, LineError, parse_line
    from revline.processors import InputRecord
    from revline.schemas import EncodeError, EventValidationError, validate_event

    with path.open("rb") as counted:
        total = sum(1 for _ in counted)
    topic = path.name
    clock = 0
    with path.open("rb") as lines:
        for number, line in enumerate(lines, start=1):
            if progress is not None and number % 500 == 0:
                progress(number, total)
            if not line.strip():
                continue
            headers = ((SOURCE_LINE_HEADER, str(number).encode()),)
            try:
                raw = parse_line(line, number)
                if not isinstance(raw, dict):
                    raise LineError("expected a JSON object")
                stamp = raw.pop(TIMESTAMP_KEY, None)
                if stamp is not None and (not isinstance(stamp, int) or stamp < 0):
                    raise LineError(f"{TIMESTAMP_KEY}: expected epoch milliseconds")
                if "__raw__" in raw:
                    value = base64.b64decode(raw["__raw__"], validate=True)
                    key = str(raw.get("__key__", f"raw-line-{number}")).encode()
                    occurred = None
                else:
                    event = validate_event(raw)
                    value = serializer(event)
                    key = str(event["envelope"]["order_id"]).encode()
                    when = event["envelope"]["occurred_at"]
                    occurred = int(when.timestamp() * 1000) if isinstance(when, datetime) \
                        else None
            except (LineError, binascii.Error, TypeError, ValueError, KeyError) as exc:
                stats.rejected.append((number, str(exc)))
                continue
            except (EventValidationError, EncodeError) as exc:
                problems = getattr(exc, "problems", None)
                stats.rejected.append((number, "; ".join(problems) if problems else str(exc)))
                continue
            timestamp = stamp if stamp is not None else occurred if occurred is not None \
                else clock
            clock = max(clock, timestamp)
            place = window.place(timestamp)
            stats.read += 1
            if place == "skip":
                stats.skipped += 1
                continue
            yield InputRecord(topic=topic, partition=0, offset=number - 1, key=key, value=value,
                              headers=headers, timestamp_ms=timestamp), place == "counted"
    if progress is not None:
        progress(total, total)


# -- reference data ------------------------------------------------------------------------
def _reference(args: argparse.Namespace, settings: Settings,
               bootstrap: str | None) -> tuple[ReferenceTimeline, str]:
    """The reference data to judge against, and what it is (for the report)."""
    from revline.processors import ReferenceData, load_yaml
    from revline.processors.backtest import ReferenceTimeline, reference_timeline

    def from_file(path: Path, flag: str) -> ReferenceData:
        from revline.cli import file_errors, readable_file

        readable_file(path, "a reference data YAML file", flag)
        with file_errors(path, flag):
            return ReferenceData.from_mapping(load_yaml(path))

    if args.reference_file:
        data = from_file(Path(args.reference_file), "--reference-file")
        return ReferenceTimeline.fixed(data), (f"the file {args.reference_file} (version "
                                               f"{data.version}) for the whole window")
    if bootstrap is None:
        data = from_file(settings.reference_file, "REVLINE_REFERENCE_FILE")
        return ReferenceTimeline.fixed(data), (f"the file {settings.reference_file} (version "
                                               f"{data.version}) for the whole window")
    import orjson

    from revline.core.readback import read_topic

    def records() -> Iterator[tuple[str, Mapping[str, Any] | None, int, int]]:
        for msg in read_topic(bootstrap, settings.reference_topic, missing_ok=True):
            if msg.key() is None:
                continue
            key = (msg.key() or b"").decode(errors="replace")
            value = msg.value()
            if value is None:
                yield key, None, msg.timestamp()[1], msg.offset() or 0
                continue
            try:
                data = orjson.loads(value)
            except orjson.JSONDecodeError:
                continue
            if isinstance(data, dict):
                yield key, data, msg.timestamp()[1], msg.offset() or 0

    timeline = reference_timeline(records())
    if timeline is None:
        data = from_file(settings.reference_file, "REVLINE_REFERENCE_FILE")
        return (ReferenceTimeline.fixed(data, f"no reference load on {settings.reference_topic}:"
                                        f" judged against {settings.reference_file}"),
                f"the file {settings.reference_file} (the reference topic holds no load)")
    loads = len(timeline.snapshots)
    return timeline, (f"the reference topic {settings.reference_topic} as it stood: each of its "
                      f"{loads} surviving load(s) applies from its time (versions "
                      f"{', '.join(d.version for _, d in timeline.snapshots)})")


# -- recorded outcomes ---------------------------------------------------------------------
def verify_recorded(bootstrap: str, settings: Settings, topic: str,
                    report: BacktestReport, replay: Mapping[str, Any],
                    samples: int) -> dict[str, Any]:
    """The live rules' replay against what the worker recorded for the same inputs."""
    from revline.core.readback import read_topic
    from revline.schemas import outcome_codec

    codec = outcome_codec()
    recorded: dict[str, dict[str, Any]] = {}
    for msg in read_topic(bootstrap, settings.outcomes_topic, missing_ok=True):
        try:
            o = codec.decode(msg.value() or b"")
        except Exception:  # another producer's junk is not ours to judge
            continue
        if not o["final"] or o["input_topic"] != topic:
            continue
        recorded.setdefault(f"{topic}/{o['input_partition']}/{o['input_offset']}", o)
    matched = missing = 0
    differ: list[dict[str, Any]] = []
    for coords, outcome in replay.items():
        have = recorded.get(coords)
        if have is None:
            missing += 1
            continue
        want = (have["kind"], have["check_id"],
                tuple(sorted(have["warnings"])) if have["kind"] == "validated" else ())
        got = (outcome.kind, outcome.check_id,
               tuple(sorted(outcome.warnings)) if outcome.kind == "validated" else ())
        if want == got:
            matched += 1
        else:
            differ.append({"input": coords, "recorded": list(want), "replayed": list(got),
                           "recorded_rules_version": have["rules_version"],
                           "recorded_reason": have["reason"], "replayed_reason": outcome.reason})
    versions = sorted({o["rules_version"] for c, o in recorded.items() if c in replay})
    return {"topic": settings.outcomes_topic, "compared": matched + len(differ),
            "matched": matched, "differ": len(differ), "not_recorded": missing,
            "recorded_rules_versions": versions, "samples": differ[:max(samples, 10)]}


# -- the command ---------------------------------------------------------------------------
def cmd_backtest(args: argparse.Namespace, settings: Settings) -> int:
    from rich.markup import escape

    from revline.cli import (
        _progress,
        bootstrap_for,
        console,
        deserializer_for,
        err_console,
        readable_file,
        serializer_for,
        writable_file,
        write_output,
    )
    from revline.processors.backtest import Backtest

    now_ms = int(time.time() * 1000)
    window = _window(args, now_ms)  # argument mistakes first: they cost nothing to find
    current, candidate = _sides(args, settings)
    if args.verify_recorded and args.input:
        raise ConfigurationError("--verify-recorded compares with the outcomes topic: it needs "
                                 "the input topic, not --input")
    for flag in ("json", "html"):
        if getattr(args, flag):
            writable_file(Path(getattr(args, flag)), f"--{flag}")
    input_path = Path(args.input) if args.input else None
    if input_path is not None:
        readable_file(input_path, "a JSON-lines export", "--input")
    bootstrap = None if input_path is not None else bootstrap_for(settings,
                                                                  start_if_missing=False)
    topic = args.topic or settings.input_topic
    ranges = plan_window(bootstrap, topic, window) if bootstrap is not None else {}
    reference, reference_label = _reference(args, settings, bootstrap)
    backtest = Backtest(current, candidate, reference, deserializer_for(settings))
    stats = ReadStats(source=str(input_path) if input_path else f"topic {topic}")
    # Two engines' order states stay alive to the end: collect young garbage less often
    # than every 700 allocations, so the collector does not walk them over and over.
    import gc

    thresholds = gc.get_threshold()
    gc.set_threshold(100_000, 50, 100)
    started = time.perf_counter()
    try:
        with _progress() as progress:
            task = progress.add_task(f"replaying {escape(stats.source)}", total=None)

            def advance(done: int, total: int) -> None:
                progress.update(task, completed=done, total=total)

            if input_path is not None:
                source = read_file(input_path, window, stats, serializer_for(settings),
                                   advance)
            else:
                assert bootstrap is not None
                source = read_window(bootstrap, topic, ranges, stats, advance)
            for record, counted in source:
                backtest.feed(record, counted=counted)
            report = backtest.finish(window.to_ms, samples=args.samples)
    finally:
        gc.set_threshold(*thresholds)
    seconds = time.perf_counter() - started
    recorded = None
    if args.verify_recorded:
        assert bootstrap is not None
        recorded = verify_recorded(bootstrap, settings, topic, report,
                                   backtest.current.outcomes, args.samples)
    changed = report.changed
    code = 1 if changed > args.max_changes else 0
    document = _document(report, window, stats, reference_label, recorded, seconds,
                         args.max_changes, code)
    _print(report, document, console, args.show)
    if stats.rejected:
        err_console.print(f"{len(stats.rejected)} line(s) of {input_path} not replayed "
                          f"(`revline publish` would refuse them), e.g. line "
                          f"{stats.rejected[0][0]}: {stats.rejected[0][1]}", markup=False,
                          soft_wrap=True)
    if args.json:
        import json

        text = json.dumps(document, indent=1, ensure_ascii=False) + "\n"
        write_output(Path(args.json), "--json", lambda p: p.write_text(text, encoding="utf-8"))
        err_console.print(f"JSON report written to {args.json}", markup=False)
    if args.html:
        page = render_html(document)
        write_output(Path(args.html), "--html", lambda p: p.write_text(page, encoding="utf-8"))
        err_console.print(f"HTML report written to {args.html}", markup=False)
    return code


def _iso(ms: int | None) -> str | None:
    from revline.operations.replay import format_ms

    return None if ms is None else format_ms(ms)


def _document(report: BacktestReport, window: Window, stats: ReadStats, reference: str,
              recorded: dict[str, Any] | None, seconds: float, max_changes: int,
              code: int) -> dict[str, Any]:
    body = report.as_dict()
    replayed = report.inputs + report.warmup
    notes = list(body.pop("notes"))
    if window.warmup_ms == 0 and window.from_ms is not None:
        notes.append("no warm-up: orders that started before the window are judged from an "
                     "empty state (their events wait for a booking that is not replayed)")
    if stats.rejected:
        notes.append(f"{len(stats.rejected)} line(s) of the file were not replayed: "
                     "`revline publish` would refuse them")
    return {
        "verdict": "changed" if report.changed else "unchanged",
        "exit_code": code,
        "max_changes": max_changes,
        "source": stats.source,
        "window": {
            "from": _iso(window.from_ms), "to": _iso(window.to_ms),
            "warmup_from": _iso(window.read_from_ms), "warmup_ms": window.warmup_ms,
            "from_ms": window.from_ms, "to_ms": window.to_ms,
            **{k: v for k, v in body.pop("window").items()},
            "partitions": {str(p): r for p, r in stats.partitions.items()},
        },
        "reference_data": reference,
        "speed": {"seconds": round(seconds, 3), "inputs_replayed": replayed,
                  "events_per_second": round(replayed / seconds) if seconds > 0 else None},
        "recorded": recorded,
        "notes": notes,
        **body,
    }


# -- terminal output -----------------------------------------------------------------------
def _print(report: BacktestReport, doc: Mapping[str, Any], console: Console, show: int) -> None:
    from rich.table import Table
    from rich.text import Text

    from revline.core.money import format_money

    def table(title: str, *columns: str, right: tuple[str, ...] = ()) -> Table:
        t = Table(title=Text(title), title_justify="left")
        for column in columns:
            t.add_column(column, justify="right" if column in right else "left")
        return t

    cur, cand = doc["current"], doc["candidate"]
    w = doc["window"]
    span = (f"{w['from'] or 'start of file'} → {w['to'] or 'end of file'}"
            + (f" (warm-up from {w['warmup_from']})" if w["warmup_ms"] and w["from"] else ""))
    console.print(Text.assemble(
        ("Backtest ", "bold"), f"{cand['rules_file']} (rules {cand['rules_version']}, ownership "
        f"{cand['ownership_version']}) against the live rules {cur['rules_version']} "
        f"(ownership {cur['ownership_version']})\n",
        f"Inputs: {doc['source']}, {span}: {report.inputs:,} counted, {report.warmup:,} "
        f"warm-up, {report.dead_letters:,} dead letters; "
        f"{doc['speed']['events_per_second'] or 0:,} events/s\n",
        f"Reference data: {doc['reference_data']}"), soft_wrap=True)
    if report.rule_changes:
        console.print(Text("What the candidate changes: " + "; ".join(report.rule_changes)),
                      soft_wrap=True)

    if report.transitions:
        t = table("Decisions that change", "live rules", "candidate", "inputs", "orders",
                  "sample (order · event · reason live → candidate)", right=("inputs", "orders"))
        for tr in report.transitions:
            sample = tr["samples"][0] if tr["samples"] else None
            text = "" if sample is None else (
                f"{sample['order_id']} · {sample['event_type'] or '—'} · "
                f"{sample['reason_before'] or '—'} → {sample['reason_after'] or '—'}")
            t.add_row(Text(tr["before"]), Text(tr["after"]), f"{tr['inputs']:,}",
                      f"{tr['orders']:,}", Text(text))
        console.print(t)

    changed_checks = [c for c in report.checks if c["delta"]]
    if changed_checks:
        t = table("Exceptions per check (blocking and advisory)", "check", "live", "candidate",
                  "Δ", right=("live", "candidate", "Δ"))
        for c in changed_checks:
            t.add_row(Text(c["check_id"]), f"{c['before']:,}", f"{c['after']:,}",
                      f"{c['delta']:+,}")
        console.print(t)

    changed_cells = [c for c in report.workload if c["delta"]]
    if changed_cells:
        t = table("Owners' workload (exceptions opened in the window)", "owner", "severity",
                  "live", "candidate", "Δ", "SLA to acknowledge",
                  right=("live", "candidate", "Δ"))
        for c in changed_cells:
            sla = c["sla_minutes_after"]
            t.add_row(c["owner"], c["severity"], f"{c['before']:,}", f"{c['after']:,}",
                      f"{c['delta']:+,}", "—" if sla is None else f"{sla:g} min")
        console.print(t)
    over = [d for d in report.daily if d["over_capacity"]]
    if over:
        t = table("Days above the owner's busiest day with the live rules (SLA breaches likely)",
                  "day", "owner", "live", "candidate", "busiest live day",
                  right=("live", "candidate", "busiest live day"))
        for d in over[:20]:
            t.add_row(d["day"], d["owner"], f"{d['before']:,}", f"{d['after']:,}",
                      f"{d['capacity']:,}")
        console.print(t)

    if report.money:
        t = table("Money that changes state (validated on one side only)", "currency", "event",
                  "held back", "released", "net", right=("held back", "released", "net"))
        for m in report.money:
            cur_code = m["currency"]
            t.add_row(cur_code, m["event_type"],
                      format_money(m["held_back_minor"], cur_code, code=False),
                      format_money(m["released_minor"], cur_code, code=False),
                      format_money(m["released_minor"] - m["held_back_minor"], cur_code,
                                   signed=True, code=False))
        console.print(t)

    holds = report.holds
    if (holds["hold_timeout_seconds_before"] != holds["hold_timeout_seconds_after"]
            or holds["timeouts_before"] != holds["timeouts_after"]):
        console.print(
            f"Holds: timeout {holds['hold_timeout_seconds_before']:g}s → "
            f"{holds['hold_timeout_seconds_after']:g}s; hold.timeout exceptions "
            f"{holds['timeouts_before']:,} → {holds['timeouts_after']:,}; still held at the "
            f"window's end {holds['pending_at_end_before']:,} → "
            f"{holds['pending_at_end_after']:,}", markup=False, soft_wrap=True)

    if report.changes and show:
        t = table(f"Changed inputs (first {min(show, report.changed):,} of "
                  f"{report.changed:,}; --json has all)", "input", "order", "event", "amount",
                  "live rules", "candidate", right=("amount",))
        for change in report.changes[:show]:
            info = change.info
            amount = ("" if info.amount_minor is None or info.currency is None
                      else format_money(info.amount_minor, info.currency))
            t.add_row(Text(info.coords), Text(info.order_id or ""), info.event_type or "—",
                      amount, Text(change.before.describe()), Text(change.after.describe()))
        console.print(t)

    recorded = doc.get("recorded")
    if recorded is not None:
        ok = recorded["differ"] == 0
        console.print(Text.assemble(
            ("Recorded outcomes: ", "bold"),
            (f"{recorded['matched']:,} of {recorded['compared']:,} reproduced",
             "green" if ok else "red"),
            f" by the live rules' replay ({recorded['not_recorded']:,} inputs have no final "
            f"outcome on {recorded['topic']}; recorded with rules "
            f"{', '.join(recorded['recorded_rules_versions']) or '—'})"), soft_wrap=True)
        for d in recorded["samples"][:5]:
            console.print(Text(f"  {d['input']}: recorded {d['recorded']}, replayed "
                               f"{d['replayed']}"), soft_wrap=True)
    for note in doc["notes"]:
        console.print(Text(f"note: {note}", style="dim"), soft_wrap=True)
    if report.changed:
        console.print(Text.assemble(
            ("CHANGED: ", "bold red"),
            f"{report.changed:,} decision(s) on {report.orders_affected:,} order(s) would "
            f"change (exceptions {report.exceptions['before']:,} → "
            f"{report.exceptions['after']:,}: {report.exceptions['opened']:,} opened, "
            f"{report.exceptions['closed']:,} no longer opened, "
            f"{report.exceptions['changed']:,} owned or judged differently); "
            f"--max-changes {doc['max_changes']:,}"), soft_wrap=True)
    else:
        console.print(Text.assemble(("UNCHANGED: ", "bold green"),
                                    f"the candidate decides all {report.inputs:,} inputs as "
                                    "the live rules do"), soft_wrap=True)


# -- HTML ----------------------------------------------------------------------------------
def render_html(doc: Mapping[str, Any]) -> str:
    """The backtest as one self-contained page, in the operations report's style."""
    from revline.operations.report_html import (
        AMBER,
        CSS,
        GREY,
        _e,
        _kpi,
        _section,
        _table,
        hbar_chart,
    )

    checks = [c for c in doc["checks"] if c["delta"]] or doc["checks"]
    bars = []
    for c in checks:
        bars.append((f"{c['check_id']} (live)", c["before"], f"{c['before']:,}", GREY))
        bars.append((f"{c['check_id']} (candidate)", c["after"], f"{c['after']:,}", AMBER))
    kpis = (
        '<div class="kpis">'
        + _kpi("changed", "Decisions that change", f"{doc['changed']:,}",
               f"on {doc['orders_affected']:,} orders", "bad" if doc["changed"] else "ok")
        + _kpi("inputs", "Inputs replayed", f"{doc['inputs']['counted']:,}",
               f"{doc['inputs']['warmup']:,} warm-up")
        + _kpi("opened", "Exceptions", f"{doc['exceptions']['before']:,} → "
               f"{doc['exceptions']['after']:,}",
               f"{doc['exceptions']['opened']:,} opened, {doc['exceptions']['closed']:,} closed")
        + _kpi("speed", "Replay speed", f"{doc['speed']['events_per_second'] or 0:,}/s",
               "events, two engines")
        + "</div>")
    transitions = _table(
        ["live rules", "candidate", "inputs", "orders", "sample reason (live → candidate)"],
        [[_e(t["before"]), _e(t["after"]), f"{t['inputs']:,}", f"{t['orders']:,}",
          _e(" → ".join((t["samples"][0]["reason_before"] or "—",
                         t["samples"][0]["reason_after"] or "—")) if t["samples"] else "")]
         for t in doc["transitions"]], numeric={2, 3}, table_id="transitions")
    money = _table(
        ["currency", "event", "held back", "released", "net"],
        [[_e(m["currency"]), _e(m["event_type"]), _e(m["held_back"]), _e(m["released"]),
          _e(m["net"])] for m in doc["money"]], numeric={2, 3, 4}, table_id="money")
    workload = _table(
        ["owner", "severity", "live", "candidate", "Δ", "SLA (min)"],
        [[_e(w["owner"]), _e(w["severity"]), f"{w['before']:,}", f"{w['after']:,}",
          f"{w['delta']:+,}", _e(w["sla_minutes_after"])] for w in doc["workload"]],
        numeric={2, 3, 4, 5}, table_id="workload")
    changes = _table(
        ["input", "order", "event", "amount", "live rules", "candidate"],
        [[_e(c["input"]), _e(c["order_id"]), _e(c["event_type"]),
          _e(c["amount"]["text"] if c["amount"] else ""),
          _e(_describe(c["before"])), _e(_describe(c["after"]))]
         for c in doc["changes"][:500]], numeric={3}, table_id="changes", dense=True)
    notes = "".join(f"<li>{_e(n)}</li>" for n in doc["notes"])
    window = doc["window"]
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>Revline rules backtest — {_e(doc['candidate']['rules_version'])}</title>"
        f"<style>{CSS}</style></head><body>"
        '<header class="top"><div class="inner"><div class="brand">Revline · revenue '
        "operations</div><h1>Rules backtest</h1>"
        f'<p id="period">Candidate {_e(doc["candidate"]["rules_file"])} (rules '
        f'{_e(doc["candidate"]["rules_version"])}) against the live rules '
        f'{_e(doc["current"]["rules_version"])}, on {_e(doc["source"])} from '
        f'{_e(window["from"] or "the start")} to {_e(window["to"] or "the end")}.</p>'
        f"</div></header><main>{kpis}"
        + _section("checks", "Exceptions per check, before and after",
                   "Inputs whose exception (blocking, or advisory for a P3 finding) names "
                   "each check.", hbar_chart(bars, title="exceptions per check"))
        + _section("kinds", "Decisions that change", "Each kind of change, with a sample "
                   "and its reason on both sides.", transitions)
        + _section("money-moved", "Money that changes state", "Validated on one side only, "
                   "per currency, in major units.", money)
        + _section("owners", "Owners' workload", "Exceptions each owner would get, by "
                   "severity, with the SLA to acknowledge.", workload)
        + _section("orders", "Changed inputs", f"{doc['changed']:,} in all"
                   + (" (the first 500 shown; the JSON report has all)"
                      if doc["changed"] > 500 else "") + ".", changes)
        + "<footer><p>Generated by <code>revline rules backtest</code>. Times are UTC.</p>"
        f"{'<ul>' + notes + '</ul>' if notes else ''}</footer></main></body></html>\n"
    )


def _describe(outcome: Mapping[str, Any]) -> str:
    kind = outcome["kind"]
    if kind == "exception":
        return f"exception {outcome['check_id']} {outcome['severity']} {outcome['owner']}"
    if kind == "validated" and outcome["opens"]:
        return f"validated (advisory {outcome['opens']})"
    if kind == "held":
        return "held (pending)"
    return str(kind)


# -- validate ------------------------------------------------------------------------------
def cmd_validate(args: argparse.Namespace, settings: Settings) -> int:
    from rich.text import Text

    from revline.cli import console, err_console
    from revline.processors.backtest import missing_checks, rules_differences

    live = _load_rules(settings.rules_file, "REVLINE_RULES_FILE")
    path = Path(args.file)
    rules = _load_rules(path, "FILE")  # parse errors: one error line, exit 2
    problems = []
    missing = missing_checks(rules, live)
    if missing:
        problems.append(f"no severity/owner for {', '.join(missing)}")
    unknown_sla = sorted({spec.severity for spec in rules.checks.values()}
                         - set(rules.sla_minutes))
    if unknown_sla:
        problems.append(f"sla_minutes has no entry for {', '.join(unknown_sla)}")
    if rules.hold_timeout_seconds <= 0:
        problems.append(f"hold_timeout_seconds {rules.hold_timeout_seconds:g} must be > 0")
    if rules.version == live.version:
        problems.append(f"version {rules.version} is the live one's: change it with every edit "
                        "(every decision carries it)")
    if args.ownership:
        _load_ownership(Path(args.ownership), "--ownership")
    for line in rules_differences(live, rules)[1:]:
        console.print(Text(f"  {line}"), soft_wrap=True)
    if problems:
        for problem in problems:
            err_console.print(Text.assemble(("invalid", "red"), f": {path}: {problem}"),
                              soft_wrap=True)
        return 1
    console.print(Text(f"{path}: valid (rules {live.version} → {rules.version}, "
                       f"{len(rules.checks)} checks)"), soft_wrap=True)
    return 0
