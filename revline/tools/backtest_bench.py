"""``revline bench --only backtest``: the rules backtest against the worker's engine (issue 21).

Speed requirement: ``revline rules backtest`` runs at the engine's in-process speed, at
least ``TARGET_EVENTS_PER_S`` on one core for a 7-day window. On one generated week
(``orders`` orders, the same encoded inputs for both, in memory: no Kafka, no file):

* **engine** — what the worker runs per input, one pass: ``Engine.decode`` then
  ``Engine.process`` on the order's state, with the live rules (the shipped
  ``rules.yaml``, ``reference.yaml``);
* **backtest** — ``processors.backtest.Backtest`` fed the same inputs and finished into
  its report: the live rules against a candidate with every product family's discount
  ceiling 5 points lower (the change docs/backtest.md shows), two sides.

Each run times one engine pass then one backtest, ``runs`` times, alternating, with the
collector set as ``revline rules backtest`` sets it. Reported: events/s of each (best and
range over the runs), the ratio backtest ÷ engine events/s (per run, its range) and the
verdict of the best backtest run against the target. The same over the process's CPU
time is shown too: on a shared machine the wall clock also counts the time other jobs
held the core, the CPU time only this process's own work (one core).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from revline.core.settings import DATA_DIR

TARGET_EVENTS_PER_S = 20_000
CEILING_CUT_BPS = 500  # the candidate: every family's discount ceiling 5 points lower

ProgressFn = Callable[[str, int, int | None], None]


@dataclass(frozen=True)
class BacktestBenchOptions:
    orders: int = 10_000  # a generated week (10,000 orders: ~51,000 inputs)
    seed: int = 42
    runs: int = 3


@dataclass
class BacktestBenchReport:
    orders: int
    inputs: int
    days: float  # the inputs' time span
    engine_s: list[float] = field(default_factory=list)
    backtest_s: list[float] = field(default_factory=list)
    engine_cpu_s: list[float] = field(default_factory=list)  # process CPU time, per run
    backtest_cpu_s: list[float] = field(default_factory=list)
    changed: int = 0  # decisions the candidate changes (the same every run)
    shared: int = 0  # inputs judged once for both sides

    @property
    def ok(self) -> bool:
        return bool(self.engine_s) and len(self.engine_s) == len(self.backtest_s)

    def rates(self, seconds: list[float]) -> list[float]:
        return [self.inputs / s for s in seconds if s > 0]

    @property
    def ratios(self) -> list[float]:
        """Per run: backtest events/s ÷ engine events/s (= engine time ÷ backtest time)."""
        return [e / b for e, b in zip(self.engine_s, self.backtest_s, strict=True) if b > 0]

    @property
    def backtest_best(self) -> float | None:
        return max(self.rates(self.backtest_s), default=None)

    def verdict(self) -> str:
        best = self.backtest_best
        if best is None:
            return ""
        return "met" if best >= TARGET_EVENTS_PER_S else "missed"

    @staticmethod
    def header() -> tuple[str, ...]:
        return ("backtest speed", "events/s (best)", "range over runs", "seconds (best)")

    def rows(self) -> list[tuple[str, ...]]:
        out: list[tuple[str, ...]] = []
        for label, seconds in (("worker's engine (one pass)", self.engine_s),
                               ("rules backtest (two sides)", self.backtest_s)):
            rates = self.rates(seconds)
            if not rates:
                out.append((label, "–", "–", "–"))
                continue
            out.append((label, f"{max(rates):,.0f}", f"{min(rates):,.0f}–{max(rates):,.0f}",
                        f"{min(seconds):.2f}"))
        return out

    def ratio_line(self) -> str:
        ratios = self.ratios
        best = self.backtest_best
        if not ratios or best is None:
            return "backtest ÷ engine: not measured"
        return (f"backtest ÷ engine events/s: {min(ratios):.2f}–{max(ratios):.2f} over "
                f"{len(ratios)} runs; backtest best {best:,.0f} events/s, target ≥ "
                f"{TARGET_EVENTS_PER_S:,}: {self.verdict()}")

    def cpu_line(self) -> str:
        """The same comparison over CPU time (this process's own, one core)."""
        engine, backtest = self.rates(self.engine_cpu_s), self.rates(self.backtest_cpu_s)
        if not engine or not backtest or len(engine) != len(backtest):
            return "CPU time: not measured"
        ratios = [b / e for e, b in zip(engine, backtest, strict=True)]
        return (f"over CPU time: engine {min(engine):,.0f}–{max(engine):,.0f} events/s, "
                f"backtest {min(backtest):,.0f}–{max(backtest):,.0f} events/s, backtest ÷ "
                f"engine {min(ratios):.2f}–{max(ratios):.2f}")

    def lines(self) -> list[str]:
        return [f"backtest: {self.orders:,} generated orders, {self.inputs:,} inputs over "
                f"{self.days:.1f} days, in memory; candidate: every family's discount ceiling "
                f"{CEILING_CUT_BPS // 100} points lower ({self.changed:,} decisions change; "
                f"{self.shared:,} inputs judged once for both sides); {len(self.engine_s)} "
                "runs, engine pass then backtest, alternating"]

    def to_markdown(self) -> list[str]:
        lines = ["| " + " | ".join(self.header()) + " |", "|---|--:|--:|--:|"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows()]
        return [*lines, "", f"- {self.ratio_line()}", f"- {self.cpu_line()}"]

    def to_rich(self) -> list[Any]:
        from rich.table import Table
        from rich.text import Text

        table = Table(title="revline bench — rules backtest vs the worker's engine, "
                            f"{self.inputs:,} inputs")
        for i, name in enumerate(self.header()):
            table.add_column(name, justify="left" if i == 0 else "right")
        for row in self.rows():
            table.add_row(*(Text(cell) for cell in row))
        style = {"met": "green", "missed": "red"}.get(self.verdict(), "")
        return [table, Text(self.ratio_line(), style=style), Text(self.cpu_line())]


def candidate_rules(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` (a rules mapping) with every family's discount ceiling lowered."""
    tolerance = dict(raw.get("discount_tolerance_bps", {}))
    tolerance["families"] = {family: max(0, bps - CEILING_CUT_BPS)
                             for family, bps in tolerance.get("families", {}).items()}
    return {**raw, "version": f"{raw['version']}-ceiling-{CEILING_CUT_BPS}",
            "discount_tolerance_bps": tolerance}


def workload_inputs(orders: int, seed: int) -> list[Any]:
    """The generated week as the worker reads it: encoded, keyed by order, each stamped
    with its event's time (poison with the time before it), as ``--input`` replays it."""
    from revline.processors import InputRecord
    from revline.tools.workload import WorkloadOptions, encoded, generate

    out = []
    for r, value, clock in encoded(generate(WorkloadOptions(orders=orders, seed=seed)).records):
        out.append(InputRecord("bench-input", 0, r.seq - 1, r.key.encode(), value,
                               (("revline-source-line", str(r.seq).encode()),), clock))
    return out


def run(options: BacktestBenchOptions | None = None,
        progress: ProgressFn | None = None) -> BacktestBenchReport:
    """Generate the week, then time the engine and the backtest ``options.runs`` times."""
    import yaml

    from revline.processors import Engine, OrderState, ReferenceData, Rules, load_yaml
    from revline.processors.backtest import Backtest, ReferenceTimeline, Side
    from revline.processors.ownership import load_ownership

    options = options or BacktestBenchOptions()
    step = progress or (lambda _step, _done, _total: None)
    step("backtest: generating the workload", 0, options.orders)
    raw = yaml.safe_load((DATA_DIR / "rules.yaml").read_text())
    live = Rules.from_mapping(raw)
    candidate = Rules.from_mapping(candidate_rules(raw))
    ownership = load_ownership(DATA_DIR / "ownership.yaml")
    reference = ReferenceData.from_mapping(load_yaml(DATA_DIR / "reference.yaml"))
    records = workload_inputs(options.orders, options.seed)
    times = [r.timestamp_ms for r in records if r.timestamp_ms]
    report = BacktestBenchReport(
        orders=options.orders, inputs=len(records),
        days=(max(times) - min(times)) / 86_400_000 if times else 0.0)

    def engine_pass() -> float:
        engine = Engine(rules=live, reference=lambda: reference)
        states: dict[bytes, OrderState] = {}
        cpu = time.process_time()
        started = time.perf_counter()
        for rec in records:
            event, dead = engine.decode(rec, rec.timestamp_ms)
            if dead is None:
                assert event is not None and rec.key is not None
                state = states.get(rec.key)
                if state is None:
                    state = states[rec.key] = OrderState()
                engine.process(state, rec, event, rec.timestamp_ms)
        seconds = time.perf_counter() - started
        report.engine_cpu_s.append(time.process_time() - cpu)
        return seconds

    def backtest() -> float:
        bt = Backtest(Side("current", live, ownership), Side("candidate", candidate, ownership),
                      ReferenceTimeline.fixed(reference))
        cpu = time.process_time()
        started = time.perf_counter()
        for rec in records:
            bt.feed(rec)
        result = bt.finish()
        seconds = time.perf_counter() - started
        report.backtest_cpu_s.append(time.process_time() - cpu)
        report.changed, report.shared = result.changed, bt.shared_inputs
        return seconds

    thresholds = gc.get_threshold()
    gc.set_threshold(100_000, 50, 100)  # as `revline rules backtest` runs
    try:
        for n in range(options.runs):
            step("backtest: engine pass, then backtest", n, options.runs)
            gc.collect()
            report.engine_s.append(engine_pass())
            gc.collect()
            report.backtest_s.append(backtest())
        step("backtest: engine pass, then backtest", options.runs, options.runs)
    finally:
        gc.set_threshold(*thresholds)
    return report


__all__ = ["TARGET_EVENTS_PER_S", "BacktestBenchOptions", "BacktestBenchReport",
           "candidate_rules", "run", "workload_inputs"]
