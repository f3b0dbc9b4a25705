"""`revline bench --only memory` (issue 20: bounded state), CI-sized: the worker, the
exception manager and the auditor in their own child processes, fed a short generated
history through their real state code, without a broker; docs/performance.md has 1M."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from revline.tools import bench, memory_bench
from revline.tools.memory_bench import (
    COMPONENTS,
    ComponentRun,
    MemoryBenchOptions,
    MemoryReport,
    Point,
    deep_size,
)


def test_the_memory_section_measures_each_component_in_its_own_process_without_a_broker(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from revline.cli import main

    def no_broker(*_: object, **__: object) -> None:
        raise AssertionError("the memory section needs no broker")

    monkeypatch.setattr(bench, "_Run", no_broker)
    monkeypatch.setattr("revline.cli.bootstrap_for", no_broker)
    seen: list[MemoryReport] = []
    run = memory_bench.run

    def recorded(*args: Any, **kwargs: Any) -> MemoryReport:
        seen.append(run(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(memory_bench, "run", recorded)
    out = tmp_path / "bench.md"
    code = main(["bench", "--only", "memory", "--memory", "1000,2500", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    [report] = seen
    assert report.ok, [r.error for r in report.runs]
    worker, manager, auditor = report.runs
    assert [r.name for r in report.runs] == list(COMPONENTS)
    for r in report.runs:
        assert [p.orders for p in r.points] == [1000, 2500]
        assert all(p.rss_kb > r.baseline_rss_kb > 0 and p.hwm_kb >= p.rss_kb and
                   p.state_bytes > 0 for p in r.points), r
    # Well inside the retention window and the caches: everything is still held.
    assert [p.kept["orders"] for p in worker.points] == [1000, 2500]
    for p in manager.points:
        assert p.kept["cached states"] == p.stored["state rows"] == p.stored[
            "exceptions opened"] > 0
    for p in auditor.points:
        assert p.kept["cached heads"] == p.stored["chains"] >= p.orders
        assert p.stored["audit records"] > 5 * p.orders
    text = out.read_text()
    assert "| component | orders | RSS MiB | peak RSS MiB | state heap MiB |" in text
    assert "auditor: 2,500 ÷ 1,000 orders — RSS" in text and "librdkafka" not in text
    assert "memory by history size" in capsys.readouterr().out


def test_past_the_bounds_what_each_component_holds_stops_growing(tmp_path: Path) -> None:
    """Bounds lowered to 100 (the worker's max_orders, the manager's state cache, the
    auditor's head cache): from 1,000 to 3,000 orders the items each keeps stay at the
    bound, and so does the heap of its state, while the history outside memory grows."""
    steps: list[tuple[str, int, int | None]] = []
    report = memory_bench.run(MemoryBenchOptions(sizes=(1000, 3000), cap=100),
                              lambda s, d, t: steps.append((s, d, t)), workdir=tmp_path)
    assert report.ok, [r.error for r in report.runs]
    worker, manager, auditor = report.runs
    # Evicted by the evict ticks housekeeping sends: the next batch's orders come first.
    assert all(100 <= p.kept["orders"] < 100 + memory_bench.WORKER_BATCH // 2
               for p in worker.points), worker.points
    assert all(p.kept["cached states"] <= 100 for p in manager.points)
    assert manager.points[-1].stored["state rows"] > 300
    assert [p.kept["cached heads"] for p in auditor.points] == [100, 100]
    assert auditor.points[-1].stored["chains"] > 3 * auditor.points[0].kept["cached heads"]
    for r in report.runs:
        ratio = r.ratio("state_bytes")
        assert ratio is not None and ratio < 1.5, (r.name, ratio)
    assert any("bounds lowered to 100" in line for line in report.lines())
    assert {s for s, _, _ in steps} == {"memory: worker, exceptions, auditor (a process each)"}
    assert steps[-1][1:] == (3000, 3000)
    assert not list(tmp_path.iterdir())  # the run's files are removed


def test_a_failed_child_is_reported_not_raised() -> None:
    report = MemoryReport(sizes=(10, 20), runs=[
        ComponentRun("worker", [Point(10, 100, 120, 5)], 50),
        ComponentRun("auditor", error="exit 1: boom")])
    assert not report.ok and report.runs[0].ratio("rss_kb") is None
    rows = report.rows()
    assert rows[-1][-2] == "failed: exit 1: boom"
    console = Console(record=True, width=200)
    for part in report.to_rich():
        console.print(part)
    assert "failed: exit 1: boom" in console.export_text()
    assert MemoryBenchOptions().sizes == (10_000, 100_000, 1_000_000)


def test_deep_size_counts_shared_objects_once() -> None:
    shared = b"x" * 1000
    assert deep_size({"a": shared, "b": shared}) < 2 * len(shared)
    assert len(shared) < deep_size([shared], [shared]) < 2 * len(shared)
