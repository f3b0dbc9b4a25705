"""A hostile corpus (tests/data/hostile.json) through `revline publish`, the worker on the real
broker, and every CLI command: each bad input gives one clear error or a routed record,
never a traceback, a stopped worker or a lost good record around it."""

from __future__ import annotations

import argparse
import base64
import copy
import json
import os
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from revline.cli import build_parser, main
from revline.core.readback import header, read_topic
from revline.core.redact import csv_safe, redact_url
from revline.core.settings import DATA_DIR
from revline.operations.publisher import SOURCE_LINE_HEADER, Publisher
from revline.operations.verify import compare_with_manifest, finals_by_input
from revline.schemas import EventSerializer, validate_event
from revline.tools.isolated import IsolatedPipeline
from revline.tools.workload import WorkloadOptions, generate

CORPUS = json.loads((Path(__file__).parent / "data" / "hostile.json").read_text())

GOOD: dict[str, Any] = {
    "envelope": {
        "event_type": "payment_captured", "idempotency_key": "SO-H1:capture:1",
        "order_id": "SO-H1", "occurred_at": "2026-11-24T09:30:00Z", "source_system": "stripe",
        "source_record_id": "ch_1", "invoice_id": "INV-1", "payment_id": "PAY-1",
    },
    "currency": "EUR", "amount_minor": 100, "method": "card", "processor_ref": "ch_1",
}


def _bad_line(case: dict[str, Any]) -> bytes:
    if "line_b64" in case:
        return base64.b64decode(case["line_b64"])
    if "deep" in case:
        return b"[" * case["deep"] + b"]" * case["deep"]
    if "deep_object" in case:
        return b'{"a":' * case["deep_object"] + b"1" + b"}" * case["deep_object"]
    if "line" in case:
        return case["line"].replace("1DIGITS", "1" * case.get("digits", 1)).encode()
    event = copy.deepcopy(GOOD)
    event.update(case.get("mutate", {}))
    event["envelope"].update(case.get("mutate_envelope", {}))
    text = json.dumps(event)
    if "line_replace" in case:
        old, new = case["line_replace"]
        assert old in text, case
        text = text.replace(old, new, 1)
    return text.encode()


def _one_error_line(err: str) -> None:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err


# -- unit: the helpers ---------------------------------------------------------------------
def test_every_publish_case_is_refused_with_its_field_or_published_literally() -> None:
    from revline.operations.publisher import parse_line

    for case in CORPUS["publish"]:
        line = _bad_line(case)
        try:
            raw = parse_line(line, 2)
            problem = None
            if not isinstance(raw, dict):
                problem = "expected a JSON object"
            elif "__raw__" in raw:
                problem = "--allow-raw"
            else:
                validate_event(raw)
                EventSerializer()(validate_event(raw))
        except Exception as exc:  # the publisher reports these per line
            problem = str(exc)
        if case["expect"] is None:
            assert problem is None, (case["name"], problem)
        else:
            assert problem is not None and (case["expect"] in problem
                                            or case["expect"] == "--allow-raw"), (case, problem)


def test_a_bom_at_the_start_is_accepted() -> None:
    from revline.operations.publisher import parse_line

    assert parse_line(b"\xef\xbb\xbf" + json.dumps(GOOD).encode(), 1)["currency"] == "EUR"
    assert parse_line("\ufeff" + json.dumps(GOOD), 1)["currency"] == "EUR"


@pytest.mark.parametrize(("url", "hidden", "kept"), [
    ("postgresql+psycopg://app:s3cr%40t@db:5432/ledger", "s3cr", "app:***@db:5432/ledger"),
    ("postgresql://app:pw@db/x?sslmode=require&password=pw2", "pw", "sslmode=require"),
    ("host=db user=app password=hunter2 dbname=ledger", "hunter2", "password=***"),
    ("http://admin:revline-admin@127.0.0.1:8000/revline/", "revline-admin", "admin:***@"),
    ("https://reg.example/?api_key=abc&x=1", "abc", "x=1"),
    ("sqlite:////tmp/ledger.db", None, "sqlite:////tmp/ledger.db"),
])
def test_connection_strings_are_redacted(url: str, hidden: str | None, kept: str) -> None:
    out = redact_url(url)
    if hidden:
        assert hidden not in out.replace("***", "")
    assert kept in out


@pytest.mark.parametrize("cell", ["=1+1", "+1", "-2", "@SUM(A1)", "\tx", "\rx",
                                  "=HYPERLINK(\"http://x\")"])
def test_csv_cells_that_a_spreadsheet_would_evaluate_are_neutralised(cell: str) -> None:
    assert csv_safe(cell) == "'" + cell
    assert csv_safe("plain") == "plain" and csv_safe(5) == 5


def test_drift_labels_do_not_come_from_input_bytes() -> None:
    from revline.streams.app import UNKNOWN_SCHEMA_LABEL, _DriftLog

    drift = _DriftLog(interval_s=3600)
    labels = {drift.label(f"fingerprint:{i:016x}", "unknown schema fingerprint")
              for i in range(10_000)}
    labels |= {drift.label(f"schema-id:{i}", "schema id is not in the schema registry")
               for i in range(10_000)}
    assert labels == {UNKNOWN_SCHEMA_LABEL}
    known = {drift.label(f"schema-id:{i}", "is registered but not in the local catalog")
             for i in range(1000)}
    assert len(known) <= 51


# -- the CLI ---------------------------------------------------------------------------------
def _subcommands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
                 ) -> list[tuple[str, ...]]:
    out = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.extend(_subcommands(sub, (*prefix, name)))
    return out


@pytest.mark.parametrize("command", _subcommands(build_parser()), ids=" ".join)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_works_for_every_command(command: tuple[str, ...], flag: str, capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as info:
        main([*command, flag])
    out = capsys.readouterr()
    assert info.value.code == 0, out.err
    assert "usage:" in out.out and "Traceback" not in out.out + out.err


def _fill(arg: str, tmp_path: Path) -> str:
    notjson = tmp_path / "not.json"
    notjson.write_text("{not json")
    readonly = tmp_path / "readonly"
    readonly.mkdir(exist_ok=True)
    readonly.chmod(0o500)
    return (arg.replace("{tmp}", str(tmp_path)).replace("{notjson}", str(notjson))
            .replace("{readonly}", str(readonly)))


@pytest.mark.kafka
@pytest.mark.parametrize("case", CORPUS["cli"], ids=lambda c: " ".join(c["args"])[:80])
def test_bad_arguments_end_in_one_error_line_and_exit_2(
    case: dict[str, Any], kafka_bootstrap: str, tmp_path: Path, capsys, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    if "{readonly}" in " ".join(case["args"]) and os.geteuid() == 0:
        pytest.skip("root can write anywhere")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap)
    monkeypatch.setenv("REVLINE_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("REVLINE_INPUT_TOPIC", f"hostile-cli-{os.getpid()}")
    monkeypatch.delenv("REVLINE_DEBUG", raising=False)
    for name, value in case.get("env", {}).items():
        monkeypatch.setenv(name, value)
    args = [_fill(a, tmp_path) for a in case["args"]]
    try:
        code = main(args)
    except SystemExit as exc:  # argparse refuses before main's boundary
        code = exc.code
    out = capsys.readouterr()
    assert code == 2, out.out + out.err
    _one_error_line(out.err)
    assert case["expect"] in out.err


def test_debug_shows_the_traceback_and_without_it_there_is_none(capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("REVLINE_INPUT_PARTITIONS", "abc")
    monkeypatch.delenv("REVLINE_DEBUG", raising=False)
    assert main(["holds"]) == 2
    _one_error_line(capsys.readouterr().err)
    assert main(["--debug", "holds"]) == 2
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("REVLINE_DEBUG", "1")
    assert main(["holds"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_an_unexpected_failure_is_one_line_too(capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import revline.cli as cli

    def boom(*_: object) -> int:
        raise ZeroDivisionError("[/x] [bold]literal[/bold]")

    monkeypatch.delenv("REVLINE_DEBUG", raising=False)
    monkeypatch.setattr(cli, "cmd_holds", boom)
    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            action.choices["holds"].set_defaults(func=boom)
    assert cli.main(["holds"]) == 2
    err = capsys.readouterr().err
    _one_error_line(err)
    assert "[/x] [bold]literal[/bold]" in err

    def interrupted(*_: object) -> int:
        raise KeyboardInterrupt

    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    action.choices["holds"].set_defaults(func=interrupted)
    assert cli.main(["holds"]) == 130


# -- publish ---------------------------------------------------------------------------------
@pytest.mark.kafka
def test_publish_reports_every_bad_line_and_sends_every_good_one(
    kafka_bootstrap: str, new_topic, tmp_path: Path, capsys, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap)
    topic = new_topic("hostile-publish")
    lines: list[bytes] = []
    expect: dict[int, str | None] = {}
    good_lines: set[int] = set()

    def good(n: int) -> None:
        event = copy.deepcopy(GOOD)
        event["envelope"]["idempotency_key"] = f"SO-H1:capture:{n}"
        lines.append(json.dumps(event).encode())
        good_lines.add(len(lines))

    good(0)
    lines[0] = b"\xef\xbb\xbf" + lines[0]  # a BOM at the start is accepted
    for i, case in enumerate(CORPUS["publish"]):
        lines.append(_bad_line(case))
        expect[len(lines)] = case["expect"]
        if case["expect"] is None:
            good_lines.add(len(lines))
        good(i + 1)
    lines.append(b"")  # blank lines are skipped
    path = tmp_path / "hostile.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")

    code = main(["publish", str(path), "--topic", topic])
    out = capsys.readouterr()
    assert code == 1
    assert "Traceback" not in out.err + out.out
    for number, want in expect.items():
        reported = [line for line in out.err.splitlines() if line.startswith(f"line {number}:")]
        if want is None:
            assert not reported, (number, reported)
        else:
            assert len(reported) == 1 and want in reported[0], (number, want, reported)
    landed = list(read_topic(kafka_bootstrap, topic))
    assert {int(header(m, SOURCE_LINE_HEADER) or 0) for m in landed} == good_lines
    assert f"Published {len(good_lines)} events" in out.out


# -- the worker on the real broker -----------------------------------------------------------
def _rules(tmp_path: Path) -> Path:
    rules = yaml.safe_load((DATA_DIR / "rules.yaml").read_text())
    rules["hold_timeout_seconds"] = 4
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    return path


def _hostile_records(case: dict[str, Any]) -> list[dict[str, Any]]:
    if "fingerprints" in case:
        return [{"key": f"drift-{i}".encode(),
                 "value": b"\xc3\x01" + os.urandom(8) + b"junk", "headers": []}
                for i in range(case["fingerprints"])]
    if "big_currency" in case:
        workload = generate(WorkloadOptions(orders=1, seed=3, run_id="HOSTILE", poison=0.0,
                                            duplicates=0.0, conflicts=0.0, out_of_order=0.0))
        booked = next(r.event for r in workload.records if r.event
                      and r.event["envelope"]["event_type"] == "order_booked")
        event = copy.deepcopy(booked)
        event["currency"] = "X" * case["big_currency"]
        return [{"key": event["envelope"]["order_id"].encode(),
                 "value": EventSerializer()(event), "headers": []}]
    if "mislabelled" in case:  # one event's body, its envelope naming another event
        from tests.test_schemas import mislabelled

        body, label = case["mislabelled"]
        return [{"key": b"MISLABELLED-1", "value": mislabelled(body, label, "MISLABELLED-1"),
                 "headers": []}]
    if case.get("null_value"):
        return [{"key": b"null-value", "value": None, "headers": []}]
    headers: list[tuple[str, bytes | None]] = [("x-null", None)] if case.get("null_header") else []
    return [{"key": None if case.get("null_key") else b"junk",
             "value": os.urandom(case["junk"]), "headers": headers}]


@pytest.mark.kafka
@pytest.mark.slow
def test_no_hostile_record_stops_the_worker_or_a_good_record_around_it(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    pipeline = IsolatedPipeline(kafka_bootstrap, tmp_path, partitions=1,
                                rules_file=_rules(tmp_path))
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    # The dead letter topic takes less than the producer's message.max.bytes (1,000,000).
    dead = pipeline.topic("deadletter")
    admin.create_topics([NewTopic(dead, 1, -1, config={"max.message.bytes": "200000"})]
                        )[dead].result(60)
    pipeline.create_input_topic()
    workload = generate(WorkloadOptions(orders=12, seed=29, poison=0.0, orphans=0))
    good = [r for r in workload.records if r.event is not None]
    hostile: list[tuple[str, dict[str, Any]]] = [
        (case["name"], record) for case in CORPUS["worker"] for record in _hostile_records(case)]
    try:
        pipeline.cli("reference", "load")
        proc = pipeline.start_worker()
        raw = Producer({"bootstrap.servers": kafka_bootstrap, "message.max.bytes": 2_000_000,
                        "enable.idempotence": True, "acks": "all"})
        events = Publisher(kafka_bootstrap, pipeline.topic("events"))
        # Good and hostile records interleaved, in one partition: every hostile record has
        # good ones before and after it.
        step = max(1, len(good) // max(1, len(CORPUS["worker"])))
        hostile_iter = iter(hostile)
        line = 100_000
        for i, rec in enumerate(good):
            events.publish(rec.event or {}, validate=False,
                           headers=[(SOURCE_LINE_HEADER, str(rec.seq).encode())])
            events.flush()
            if i % step == 0 or i == len(good) - 1:
                batch = [next(hostile_iter, None) for _ in range(40 if i else 1)]
                for item in batch:
                    if item is None:
                        break
                    _, record = item
                    line += 1
                    raw.produce(pipeline.topic("events"), key=record["key"],
                                value=record["value"],
                                headers=[*record["headers"],
                                         (SOURCE_LINE_HEADER, str(line).encode())])
                    raw.poll(0)
                assert raw.flush(60) == 0
        for _, record in hostile_iter:  # whatever is left, then good ones after it
            line += 1
            raw.produce(pipeline.topic("events"), key=record["key"], value=record["value"],
                        headers=[*record["headers"], (SOURCE_LINE_HEADER, str(line).encode())])
        assert raw.flush(60) == 0
        total = len(good) + len(hostile)
        outcomes = pipeline.wait_for(lambda o: len(finals_by_input(o)) >= total, 240,
                                     "a final outcome for every input, good and hostile")
        assert proc.poll() is None, "the worker stopped"
        assert compare_with_manifest(workload.manifest(), outcomes) == []
        assert all(len(v) == 1 for v in finals_by_input(outcomes).values())

        dead_letters = list(read_topic(kafka_bootstrap, dead))
        by_line = {int(header(m, SOURCE_LINE_HEADER) or 0): m for m in dead_letters}
        for m in dead_letters:
            assert header(m, "revline.errors.offset") is not None
            assert header(m, "revline.errors.exception.message")
            assert header(m, "x-null") in (None, b"")  # never b"None"
        shrunk = [m for m in dead_letters if header(m, "revline.truncated")]
        assert len(shrunk) >= 4, [len(m.value() or b"") for m in dead_letters]
        for m in shrunk:
            assert m.value() is None
        null = [m for m in dead_letters
                if b"null value" in (header(m, "revline.errors.exception.message") or b"")]
        assert len(null) == 1 and null[0].value() is None
        assert len(by_line) >= len(hostile) - 1  # the big currency is an exception, not dead

        log = (tmp_path / "worker-0.log").read_text(errors="replace")
        port = int(re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", log).group(1))  # type: ignore[union-attr]
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        labels = set(re.findall(rb'revline_schema_drift_total\{schema_ref="([^"]*)"\}', metrics))
        assert labels == {b"unknown"}, labels
        assert log.count("schema drift") <= 5  # rate-limited, not one per record
        time.sleep(1)
        assert proc.poll() is None
    finally:
        pipeline.stop_all()


def test_an_oversized_json_record_of_the_exception_manager_is_shrunk_not_fatal() -> None:
    import orjson

    from revline.streams.exceptions import shrink_json

    big = orjson.dumps({"reason": "X" * 2_000_000, "history": [{"note": "y" * 10}] * 500})
    small = shrink_json(big)
    assert small is not None and len(small) < 100_000
    assert orjson.loads(small)["reason"].startswith("XXX")
    assert shrink_json(b"\x00not json") is None
