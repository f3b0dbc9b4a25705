"""How fast the Tryton adapter applies validated events, and how many RPCs each costs.

``python -m revline.tools.tryton_bench [--events N] [--batch B] [--mode single|batch|both]``

Generates a workload (``revline.tools.workload.generate``), runs it through the stream
engine in-process and keeps the validated events only, in the order the engine
released them (what the worker publishes on the validated topic, which is what the
sink reads); then applies the first N of them to a fresh trytond (started as the
tests start it: a copy of the prepared template, SQLite, 127.0.0.1):

* ``single``: one ``apply`` per event, as the sink did before ``apply_many``;
* ``batch``: ``apply_many`` on batches of B events (the sink's batch).

``both`` runs the two on the same events, each on its own fresh database, and prints
the ratio. Every RPC is counted by method. ``revline bench --erp tryton`` runs the same
(``compare``) and shows the ratio against the issue's target (``TARGET_RATIO``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from revline.sinks._protocols import EffectResult, Event, PartialWriteError, PermanentSinkError
from revline.sinks.erp._tryton import TrytonErp, _Rpc
from revline.sinks.erp._tryton_setup import (
    TrytonServer,
    default_state_dir,
    prepare_database,
    start_server,
)

TARGET_RATIO = 10.0  # batched events/s over per-document events/s

ProgressFn = Callable[[str, int, int | None], None]
"""``progress(step, done, total)``, as ``revline bench`` takes it."""


def _no_progress(_step: str, _done: int, _total: int | None) -> None:
    pass


def validated_events(orders: int, seed: int = 7) -> list[dict[str, Any]]:
    """The validated events of a generated workload, in the engine's release order,
    decoded from their wire form as the sink decodes them."""
    from revline.core.settings import DATA_DIR
    from revline.processors import (
        FINAL_KINDS,
        Engine,
        InputRecord,
        OrderState,
        ReferenceData,
        Rules,
        load_yaml,
    )
    from revline.schemas import EventDeserializer, EventSerializer
    from revline.tools.workload import WorkloadOptions, generate

    reference = ReferenceData.from_mapping(load_yaml(DATA_DIR / "reference.yaml"))
    engine = Engine(
        rules=Rules.from_mapping(load_yaml(DATA_DIR / "rules.yaml")),
        reference=lambda: reference,
    )
    workload = generate(WorkloadOptions(orders=orders, seed=seed, poison=0.0))
    encode, decode = EventSerializer(), EventDeserializer()
    states: dict[bytes, OrderState] = {}
    out: list[dict[str, Any]] = []

    def keep(decisions: Any) -> None:
        for d in decisions:
            if d.kind in FINAL_KINDS and d.kind == "validated" and d.event is not None:
                out.append(decode.decode(encode(d.event)))

    for r in workload.records:
        value = encode(r.event) if r.event is not None else r.raw
        if value is None:
            continue
        rec = InputRecord("in", 0, r.seq, r.key.encode(), value)
        event, dead = engine.decode(rec, 0)
        if dead is not None or event is None or rec.key is None:
            continue
        keep(engine.process(states.setdefault(rec.key, OrderState()), rec, event, 0))
    later = int(engine.rules.hold_timeout_seconds * 1000) + 1
    for state in states.values():
        keep(engine.expire_holds(state, later))
    return out


@dataclass
class Run:
    mode: str
    events: int
    seconds: float
    rpcs: Counter[str] = field(default_factory=Counter)
    rpc_seconds: dict[str, float] = field(default_factory=dict)
    statuses: Counter[str] = field(default_factory=Counter)
    by_type: Counter[str] = field(default_factory=Counter)

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0

    def per_event(self) -> dict[str, float]:
        return {k: n / self.events for k, n in self.rpcs.most_common()}

    def report(self) -> str:
        total = sum(self.rpcs.values())
        lines = [
            f"{self.mode}: {self.events} events in {self.seconds:.1f}s = {self.rate:.1f} events/s; "
            f"{total} RPCs = {total / self.events:.2f} per event; statuses {dict(self.statuses)}",
        ]
        for method, n in self.rpcs.most_common():
            spent = self.rpc_seconds.get(method, 0.0)
            lines.append(f"    {n / self.events:7.3f}/event  {n:6d}  {spent:7.2f}s  {method}")
        return "\n".join(lines)


@contextmanager
def counting(counter: Counter[str], seconds: dict[str, float] | None = None) -> Iterator[None]:
    """Count (and time) every JSON-RPC request, by method, any adapter of this process sends."""
    original = _Rpc._post
    spent = seconds if seconds is not None else {}

    def post(self: _Rpc, method: str, params: Sequence[Any]) -> Any:
        counter[method] += 1
        started = time.perf_counter()
        try:
            return original(self, method, params)
        finally:
            spent[method] = spent.get(method, 0.0) + time.perf_counter() - started

    _Rpc._post = post  # type: ignore[method-assign]
    try:
        yield
    finally:
        _Rpc._post = original  # type: ignore[method-assign]


def apply_events(erp: TrytonErp, events: Sequence[Event], mode: str, batch: int,
                 tick: Callable[[int], None] = lambda _n: None) -> list[
        EffectResult | Exception]:
    """Apply as the sink would: a refused event is that event's outcome, not the run's."""
    out: list[EffectResult | Exception] = []
    if mode == "single":
        for ev in events:
            try:
                out.append(erp.apply(ev))
            except (PermanentSinkError, PartialWriteError) as exc:
                out.append(exc)
            tick(len(out))
        return out
    for start in range(0, len(events), batch):
        out.extend(erp.apply_many(events[start : start + batch]))
        tick(len(out))
    return out


def run(server: TrytonServer, events: Sequence[Event], mode: str, batch: int,
        tick: Callable[[int], None] = lambda _n: None) -> Run:
    db = server.database
    counter: Counter[str] = Counter()
    spent: dict[str, float] = {}
    with counting(counter, spent), TrytonErp(server.url, db.name, db.user, db.password) as erp:
        erp.rpc("model.res.user.get_preferences", True)  # log in outside the timing
        erp._cfg()
        counter.clear()
        spent.clear()
        started = time.perf_counter()
        results = apply_events(erp, events, mode, batch, tick)
        seconds = time.perf_counter() - started
    statuses: Counter[str] = Counter(
        r.status if isinstance(r, EffectResult) else type(r).__name__ for r in results
    )
    types = Counter(str(e["envelope"]["event_type"]) for e in events)
    return Run(mode, len(events), seconds, counter, spent, statuses, types)


def fresh_server(root: Path, name: str) -> TrytonServer:
    return start_server(prepare_database(root / name, state_dir=default_state_dir()))


def events_for(n: int, seed: int = 7) -> list[dict[str, Any]]:
    """The first ``n`` validated events of a workload large enough to have them."""
    orders = max(10, n // 4)
    events: list[dict[str, Any]] = []
    while len(events) < n:
        events = validated_events(orders, seed)
        orders *= 2
    return events[:n]


_MODE_LABELS = {"single": "per document (`apply`)", "batch": "batched (`apply_many`)"}


@dataclass
class Comparison:
    """Per document and batched on the same events, each on a fresh database."""

    events: int
    batch: int
    types: Counter[str]
    runs: dict[str, Run] = field(default_factory=dict)
    unavailable: str | None = None

    @property
    def ratio(self) -> float | None:
        single, batched = self.runs.get("single"), self.runs.get("batch")
        if single is None or batched is None or not single.rate:
            return None
        return batched.rate / single.rate

    @property
    def same_outcomes(self) -> bool:
        single, batched = self.runs.get("single"), self.runs.get("batch")
        return single is not None and batched is not None and single.statuses == batched.statuses

    @property
    def ok(self) -> bool:
        return self.unavailable is None and self.same_outcomes

    def rows(self) -> list[tuple[str, str, str, str, str]]:
        """(mode, events/s, RPCs per event, seconds, statuses)"""
        out = []
        for mode in ("single", "batch"):
            r = self.runs.get(mode)
            if r is None:
                continue
            label = _MODE_LABELS[mode] + (f", batches of {self.batch}" if mode == "batch" else "")
            out.append((label, f"{r.rate:.2f}", f"{sum(r.rpcs.values()) / r.events:.2f}",
                        f"{r.seconds:.1f}",
                        ", ".join(f"{k} {v}" for k, v in sorted(r.statuses.items()))))
        return out

    def verdict(self) -> str:
        ratio = self.ratio
        if ratio is None:
            return ""
        return "met" if ratio >= TARGET_RATIO else "missed"

    def lines(self) -> list[str]:
        types = ", ".join(f"{n} {t}" for t, n in self.types.most_common())
        out = [f"ERP (Tryton): {self.events} validated events ({types}) on two fresh trytond "
               "databases (SQLite), RPCs counted by method"]
        if self.unavailable is not None:
            out.append(f"ERP (Tryton): unavailable: {self.unavailable}")
        elif self.runs and not self.same_outcomes:
            out.append("ERP (Tryton): OUTCOMES DIFFER between the modes: "
                       + " vs ".join(str(dict(r.statuses)) for r in self.runs.values()))
        batched = self.runs.get("batch")
        if batched is not None:
            top = ", ".join(f"{m} {n / batched.events:.2f}"
                            for m, n in batched.rpcs.most_common(5))
            out.append(f"ERP (Tryton): batched RPCs per event, most frequent: {top}")
        return out


def compare(events: int = 150, batch: int = 200, seed: int = 7,
            progress: ProgressFn = _no_progress) -> Comparison:
    """Both modes on the same ``events``; a failure to start Tryton is reported, not raised."""
    step = "ERP (Tryton): generating validated events"
    progress(step, 0, None)
    chosen = events_for(events, seed)
    result = Comparison(len(chosen), batch,
                        Counter(str(e["envelope"]["event_type"]) for e in chosen))
    with tempfile.TemporaryDirectory(prefix="revline-tryton-bench-") as tmp:
        for mode in ("single", "batch"):
            label = _MODE_LABELS[mode]
            progress(f"ERP (Tryton): {label}: a fresh database", 0, None)
            try:
                server = fresh_server(Path(tmp), mode)
            except Exception as exc:  # reported in the table
                result.unavailable = f"trytond did not start: {exc}"
                return result
            step = f"ERP (Tryton): {label}"
            try:
                progress(step, 0, len(chosen))

                def tick(done: int, step: str = step) -> None:
                    progress(step, done, len(chosen))

                result.runs[mode] = run(server, chosen, mode, batch, tick)
            finally:
                server.stop()
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m revline.tools.tryton_bench",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=300)
    parser.add_argument("--batch", type=int, default=200, help="events per apply_many call")
    parser.add_argument("--mode", choices=("single", "batch", "both"), default="both")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    events = events_for(args.events, args.seed)
    types = Counter(str(e["envelope"]["event_type"]) for e in events)
    print(f"{len(events)} validated events: {dict(types.most_common())}")
    modes = ("single", "batch") if args.mode == "both" else (args.mode,)
    runs: dict[str, Run] = {}
    with tempfile.TemporaryDirectory(prefix="revline-tryton-bench-") as tmp:
        for mode in modes:
            server = fresh_server(Path(tmp), mode)
            try:
                runs[mode] = run(server, events, mode, args.batch)
            finally:
                server.stop()
            print(runs[mode].report(), flush=True)
    if len(runs) == 2:
        print(f"batch/single: {runs['batch'].rate / runs['single'].rate:.1f}x events/s; RPCs per "
              f"event {sum(runs['single'].rpcs.values()) / len(events):.1f} -> "
              f"{sum(runs['batch'].rpcs.values()) / len(events):.2f}")
        if runs["batch"].statuses != runs["single"].statuses:
            print(f"OUTCOMES DIFFER: {runs['single'].statuses} vs {runs['batch'].statuses}")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
