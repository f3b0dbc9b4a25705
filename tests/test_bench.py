"""Smoke test of the benchmark harness on the real broker (it checks the plumbing, not speed)."""

from __future__ import annotations

import pytest

from revline.bench import BenchReport, run_benchmark

pytestmark = pytest.mark.kafka

EVENTS = 1500


@pytest.fixture(scope="module")
def report(kafka_bootstrap: str) -> BenchReport:
    steps: list[str] = []

    def progress(step: str, done: int, total: int | None) -> None:
        if not steps or steps[-1] != step:
            steps.append(step)

    result = run_benchmark(
        events=EVENTS,
        partitions=2,
        bootstrap=kafka_bootstrap,
        include_pipeline=False,
        progress=progress,
        pace_seconds=2.0,
    )
    assert steps, "the harness reported no progress"
    return result


def test_every_contender_processed_every_event(report: BenchReport) -> None:
    assert report.pipeline is None
    for contender in (report.raw, report.faust):
        assert contender.unavailable is None, f"{contender.name}: {contender.unavailable}"
        assert contender.processed == EVENTS, contender
        assert contender.ok


def test_figures_are_positive(report: BenchReport) -> None:
    for contender in (report.raw, report.faust):
        assert contender.events_per_s is not None and contender.events_per_s > 0
        assert contender.paced_rate is not None and contender.paced_rate > 0
        # Every paced event was matched to its output, so the percentiles are real.
        assert contender.latency_samples == contender.paced_events > 0, contender
        assert contender.p50_ms is not None and contender.p99_ms is not None
        assert 0 <= contender.p50_ms <= contender.p99_ms


def test_markdown_table(report: BenchReport) -> None:
    text = report.to_markdown()
    assert "| raw confluent-kafka loop" in text
    assert "| bare Faust passthrough agent" in text
    assert f"{EVENTS:,} events" in text and "2 partitions" in text
    assert "--no-pipeline" in text
