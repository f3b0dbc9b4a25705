"""Smoke test of the benchmark harness on the real broker (it checks the plumbing, not speed)."""

from __future__ import annotations

import pytest
from rich.console import Console

from revline.tools.bench import (
    E2E_P99_TARGET_MS,
    LEDGER_TARGET_LINES_PER_S,
    BenchReport,
    SinkBenchOptions,
    ledger_target,
    run_benchmark,
)

EVENTS = 1500
LEDGER_EVENTS = 200
E2E_EVENTS = 300


@pytest.fixture(scope="module")
def report(kafka_bootstrap: str) -> BenchReport:
    steps: list[str] = []

    def progress(step: str, done: int, total: int | None) -> None:
        if not steps or steps[-1] != step:
            steps.append(step)

    # A temporary SQLite ledger: the report's shape does not depend on the backend.
    url, origin = ledger_target(None, "sqlite:///unused.db")
    result = run_benchmark(
        events=EVENTS,
        partitions=2,
        bootstrap=kafka_bootstrap,
        include_pipeline=False,
        progress=progress,
        pace_seconds=2.0,
        sinks=SinkBenchOptions(
            ledger_url=url,
            ledger_origin=origin,
            ledger_events=LEDGER_EVENTS,
            ledger_batch=50,
            e2e_events=E2E_EVENTS,
            e2e_seconds=2.0,
        ),
    )
    assert steps, "the harness reported no progress"
    assert any(step.startswith("end to end") for step in steps), steps
    return result


@pytest.mark.kafka
def test_every_contender_processed_every_event(report: BenchReport) -> None:
    assert report.pipeline is None
    for contender in (report.raw, report.faust):
        assert contender is not None
        assert contender.unavailable is None, f"{contender.name}: {contender.unavailable}"
        assert contender.processed == EVENTS, contender
        assert contender.ok


@pytest.mark.kafka
def test_figures_are_positive(report: BenchReport) -> None:
    for contender in (report.raw, report.faust):
        assert contender is not None
        assert contender.events_per_s is not None and contender.events_per_s > 0
        assert contender.paced_rate is not None and contender.paced_rate > 0
        # Every paced event was matched to its output, so the percentiles are real.
        assert contender.latency_samples == contender.paced_events > 0, contender
        assert contender.p50_ms is not None and contender.p99_ms is not None
        assert 0 <= contender.p50_ms <= contender.p99_ms


@pytest.mark.kafka
def test_ledger_lines_measured(report: BenchReport) -> None:
    assert report.sinks is not None and report.sinks.backend == "sqlite"
    ledger = report.sinks.ledger
    assert ledger is not None and ledger.unavailable is None, ledger
    assert ledger.events == LEDGER_EVENTS
    assert ledger.journal_lines >= ledger.events  # most post two or more lines
    assert ledger.lines_per_s is not None and ledger.lines_per_s > 0
    assert ledger.trial_balance_ok
    assert ledger.ok
    # The report says where the run's events sit on the ledger's timeline.
    assert any("(the ledger held no journals)" in note for note in ledger.notes), ledger.notes


@pytest.mark.kafka
def test_end_to_end_measured(report: BenchReport) -> None:
    assert report.sinks is not None
    e2e = report.sinks.e2e
    assert e2e is not None and e2e.unavailable is None, e2e
    # Every burst event reached the ledger, and every paced event gave one latency.
    assert e2e.burst_committed == e2e.burst_events == E2E_EVENTS, e2e
    assert e2e.max_rate is not None and e2e.max_rate > 0
    assert e2e.paced_rate is not None and e2e.paced_rate == pytest.approx(e2e.max_rate / 2)
    assert e2e.latency_samples == e2e.paced_events == len(e2e.latencies_ms) > 0
    assert e2e.p50_ms is not None and e2e.p95_ms is not None
    assert e2e.p99_ms is not None and e2e.max_ms is not None
    assert 0 <= e2e.p50_ms <= e2e.p95_ms <= e2e.p99_ms <= e2e.max_ms
    assert set(e2e.burst_busy_ms) >= {"ledger post", "side-effect rows", "in-memory ERP"}
    assert e2e.ok and report.ok


@pytest.mark.kafka
def test_markdown_table(report: BenchReport) -> None:
    text = report.to_markdown()
    assert "| raw confluent-kafka loop" in text
    assert "| bare Faust passthrough agent" in text
    assert f"{EVENTS:,} events" in text and "2 partitions" in text
    assert "--no-pipeline" in text
    # The sinks table: figures next to the targets, and what was measured.
    assert "| ledger journal lines/s (batches of 50 events) |" in text
    assert f"≥ {LEDGER_TARGET_LINES_PER_S:,}" in text
    assert "| end to end sustained max, events/s (burst of 300) |" in text
    assert "end to end p99 ms at" in text and f"≤ {E2E_P99_TARGET_MS:,.0f}" in text
    assert "temporary SQLite" in text and "InMemoryErp" in text
    assert "REVLINE_BATCH_WITHIN_S" in text and "poll timeout" in text


@pytest.mark.kafka
def test_rich_output(report: BenchReport) -> None:
    console = Console(record=True, width=240)
    console.print(report.to_rich())
    text = console.export_text()
    assert "revline bench — sinks (sqlite ledger)" in text
    assert "ledger journal lines/s" in text and "end to end p99 ms" in text


def test_ledger_target_prefers_flag_then_postgres() -> None:
    pg = "postgresql://revline@127.0.0.1:55432/revline"
    assert ledger_target("sqlite:///x.db", pg) == ("sqlite:///x.db", "from --ledger-dsn")
    assert ledger_target(None, pg) == (pg, "from REVLINE_LEDGER_DSN")
    # The state dir's own SQLite ledger would keep the benchmark's journals: never used.
    url, origin = ledger_target(None, "sqlite:////srv/.revline/ledger.db")
    assert url is None and "temporary SQLite" in origin


def test_paced_events_follow_where_the_run_continues() -> None:
    """Paced events cached before ``continue_from`` occurred too early: they are dropped."""
    from datetime import UTC, datetime, timedelta

    from revline.schemas import EventDeserializer
    from revline.tools.bench import _Input, _Run

    run = _Run.__new__(_Run)  # no broker: only the generator's timeline
    run.start = datetime(2026, 1, 1, tzinfo=UTC)
    run.prefix, run.seed, run.step = "revline-bench-test-abcdef", 1, lambda *_: None
    run._fresh, run._fresh_batches = [], 0
    decode = EventDeserializer().decode

    def occurred(inputs: list[_Input]) -> list[datetime]:
        return [decode(i.value)["envelope"]["occurred_at"] for i in inputs]

    early = occurred(run.fresh_inputs(40))
    later = max(early) + timedelta(days=30)
    run.continue_from(later)
    assert min(occurred(run.fresh_inputs(40))) >= later
    run.continue_from(later - timedelta(days=60))  # never backwards
    assert run.start >= later


# -- the sections without Kafka: read model and ERP (revline bench --only erp,read-model) ----
def test_the_read_model_section_runs_without_a_broker_and_shows_the_targets(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """CI-sized (2k and 20k records, a few seconds); docs/performance.md has 10k and 1M."""
    import statistics

    from revline.tools import bench
    from revline.tools.bench import ReadModelBenchOptions

    def no_broker(*_: object, **__: object) -> None:
        raise AssertionError("the read-model section needs no broker")

    monkeypatch.setattr(bench, "_Run", no_broker)
    steps: list[str] = []
    report = run_benchmark(
        include_pipeline=False, include_baselines=False,
        progress=lambda step, done, total: steps.append(step) if step not in steps else None,
        read_model=ReadModelBenchOptions(sizes=(2_000, 20_000), runs=3, cli=False))
    rm = report.read_model
    assert rm is not None and rm.ok and report.ok
    assert any(s.startswith("read model: filling 20,000") for s in steps), steps
    rows = {row[0]: row for row in rm.rows()}
    assert set(rows) == {"audit ORDER_ID", "exceptions list --owner finance",
                         "report --since 7d"}
    for command in ("audit", "exceptions", "report"):
        small = statistics.median(rm.timing(command, 2_000).runs_ms)  # type: ignore[union-attr]
        big = statistics.median(rm.timing(command, 20_000).runs_ms)  # type: ignore[union-attr]
        assert rm.ratio(command) == pytest.approx(big / small)
        assert big < max(3 * small, small + 50) and big < 1000, (command, small, big)
    text = report.to_markdown()
    assert "| command | 2,000 records, ms | 20,000 records, ms | 20,000 / 2,000 |" in text
    assert "≤ 2×, < 1 s" in text and "SQLite" in text
    assert "Kafka" not in text and "Sinks not measured" not in text
    console = Console(record=True, width=240)
    console.print(report.to_rich())
    assert "read model: operator commands by history size" in console.export_text()


@pytest.mark.slow
def test_the_erp_section_compares_per_document_and_batched_on_the_same_events() -> None:
    pytest.importorskip("trytond")
    from revline.tools.bench import ErpBenchOptions

    report = run_benchmark(include_pipeline=False, include_baselines=False,
                           erp=ErpBenchOptions(events=8))
    erp = report.erp
    assert erp is not None and erp.unavailable is None and erp.ok, erp
    assert set(erp.runs) == {"single", "batch"} and erp.same_outcomes
    assert erp.ratio is not None and erp.verdict() in ("met", "missed")
    single, batched = erp.runs["single"], erp.runs["batch"]
    assert sum(batched.rpcs.values()) < sum(single.rpcs.values())
    text = report.to_markdown()
    assert "| per document (`apply`) |" in text and "target ≥ 10×" in text


def test_bench_only_names_known_sections(capsys: pytest.CaptureFixture[str]) -> None:
    from revline.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--only", "erp,nonsense"])
    assert exit_.value.code == 2
    assert "choose from contenders, pipeline, sinks, erp, read-model" in capsys.readouterr().err
    assert main(["bench", "--only", "read-model", "--erp", "tryton"]) != 0
    assert "--only leaves out" in capsys.readouterr().err
