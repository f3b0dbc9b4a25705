"""`revline bench --only backtest` (issue 21's speed requirement), CI-sized: the rules
backtest against the worker's in-process engine on the same generated inputs, without a
broker; docs/backtest.md has the 10,000-order week."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from revline.tools import backtest_bench, bench
from revline.tools.backtest_bench import (
    TARGET_EVENTS_PER_S,
    BacktestBenchOptions,
    BacktestBenchReport,
    candidate_rules,
)


def test_the_backtest_section_times_both_on_the_same_inputs_without_a_broker(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from revline.cli import main

    def no_broker(*_: object, **__: object) -> None:
        raise AssertionError("the backtest section needs no broker")

    monkeypatch.setattr(bench, "_Run", no_broker)
    monkeypatch.setattr("revline.cli.bootstrap_for", no_broker)
    seen: list[BacktestBenchReport] = []
    run = backtest_bench.run

    def recorded(*args: Any, **kwargs: Any) -> BacktestBenchReport:
        seen.append(run(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(backtest_bench, "run", recorded)
    out = tmp_path / "bench.md"
    code = main(["bench", "--only", "backtest", "--backtest-orders", "150",
                 "--backtest-runs", "2", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    [report] = seen
    assert report.ok and report.orders == 150 and len(report.engine_s) == 2
    assert report.inputs > 600 and report.changed > 0 and 0 < report.shared < report.inputs
    engine, backtest = report.rows()
    assert engine[0].startswith("worker's engine") and backtest[0].startswith("rules backtest")
    ratios = report.ratios
    assert len(ratios) == 2 and all(0.1 < r < 2 for r in ratios), ratios
    assert ratios[0] == pytest.approx(report.engine_s[0] / report.backtest_s[0])
    assert report.verdict() in ("met", "missed")
    text = out.read_text()
    assert "| backtest speed | events/s (best) | range over runs | seconds (best) |" in text
    assert f"target ≥ {TARGET_EVENTS_PER_S:,}" in text and "backtest ÷ engine" in text
    assert len(report.engine_cpu_s) == len(report.backtest_cpu_s) == 2
    assert all(s > 0 for s in report.engine_cpu_s + report.backtest_cpu_s)
    assert "over CPU time: engine " in text and report.cpu_line() in text
    assert "Kafka" not in text
    assert "rules backtest vs the worker's engine" in capsys.readouterr().out


def test_the_candidate_lowers_every_family_ceiling_by_five_points() -> None:
    tolerance = {"families": {"a": 2000, "b": 300}, "skus": {"X": 0}}
    raw: dict[str, Any] = {"version": "1", "discount_tolerance_bps": tolerance}
    new = candidate_rules(raw)
    assert new["discount_tolerance_bps"] == {"families": {"a": 1500, "b": 0}, "skus": {"X": 0}}
    assert new["version"] != "1" and raw["discount_tolerance_bps"]["families"]["a"] == 2000


def test_a_report_without_runs_is_not_ok() -> None:
    report = BacktestBenchReport(orders=1, inputs=0, days=0.0)
    assert not report.ok and report.verdict() == "" and "not measured" in report.ratio_line()
    console = Console(record=True, width=200)
    for part in report.to_rich():
        console.print(part)
    assert "–" in console.export_text()
    assert BacktestBenchOptions().orders == 10_000
