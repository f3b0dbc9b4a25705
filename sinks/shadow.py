"""Shadow mode: a second sink on the same validated topic, and its parity with the primary.

A shadow run is an ordinary ``SinkProcessor`` with its own consumer group, its own
ledger database and its own ERP, producing its refusals to a shadow exceptions
topic, so it never touches what the primary owns (``shadow_processor`` refuses a
configuration that would share any of them). It is how a new posting rule, a new
ERP or a new release is proven before it becomes the primary.

Parity compares the two ledgers per validated event (first copy per idempotency
key, read from the topic): the event's footprint is its journals (effect key,
type, currency, total) and its side-effect statuses per adapter (the ERP's own
document ids differ between two ERPs, so only the status counts). Events whose
type has no effect anywhere (fulfilment, approval, override) are not compared.
Parity % = events with identical footprints / events compared, per event type
and overall; journals whose event is not on the topic are compared too.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from revline.errors import ConfigurationError
from schemas import EventDeserializer
from sinks._protocols import ErpAdapter
from sinks.ledger import JournalSummary, PostingRules, SideEffect, SqlLedger, normalize_url
from sinks.processor import SinkProcessor
from sinks.reconcile import ALL_TIME, ERP_STEPS, StreamView, Window, drift_pct, period_of


@dataclass(frozen=True)
class Footprint:
    """What one event left in one ledger database."""

    journals: tuple[tuple[str, str, str, int], ...] = ()  # (effect key, type, currency, total)
    effects: tuple[tuple[str, str], ...] = ()  # (adapter, status)

    def describe(self) -> str:
        if not self.journals and not self.effects:
            return "nothing"
        parts = [f"journal {k} {c} {t}" for k, _, c, t in self.journals]
        parts += [f"{a}={s}" for a, s in self.effects]
        return "; ".join(parts)


def footprints(
    journals: Iterable[JournalSummary], effects: Iterable[SideEffect]
) -> dict[str, Footprint]:
    """Pure: event key -> footprint, from journal headers and side-effect rows."""
    js: dict[str, list[tuple[str, str, str, int]]] = defaultdict(list)
    for j in journals:
        # A credit note's own key embeds the reversed journal's id; ids are not
        # comparable across releases (uuid5, then time-ordered), the reversed key is.
        key = j.idempotency_key if j.reverses_key is None else (
            f"{j.event_key}:reverses:{j.reverses_key}")
        js[j.event_key].append((key, j.event_type, j.currency, j.total_minor))
    es: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for e in effects:
        es[e.idempotency_key].append((e.adapter, e.status))
    return {
        key: Footprint(tuple(sorted(js.get(key, ()))), tuple(sorted(es.get(key, ()))))
        for key in js.keys() | es.keys()
    }


@dataclass
class TypeParity:
    compared: int = 0
    equal: int = 0

    @property
    def parity_pct(self) -> float:
        return 100.0 - drift_pct(self.compared - self.equal, self.compared)


@dataclass(frozen=True)
class Difference:
    key: str
    event_type: str
    period: str
    primary: str
    shadow: str


@dataclass
class ParityReport:
    window: Window
    by_type: dict[str, TypeParity] = field(default_factory=dict)
    differences: list[Difference] = field(default_factory=list)

    @property
    def compared(self) -> int:
        return sum(t.compared for t in self.by_type.values())

    @property
    def equal(self) -> int:
        return sum(t.equal for t in self.by_type.values())

    @property
    def parity_pct(self) -> float:
        return 100.0 - drift_pct(self.compared - self.equal, self.compared)

    def to_dict(self) -> dict[str, Any]:
        return {
            "period": self.window.label,
            "compared": self.compared,
            "equal": self.equal,
            "parity_pct": round(self.parity_pct, 4),
            "by_event_type": {
                t: {"compared": p.compared, "equal": p.equal, "parity_pct": round(p.parity_pct, 4)}
                for t, p in sorted(self.by_type.items())
            },
            "differences": [d.__dict__ for d in self.differences],
        }


def has_effect(event_type: str, rules: PostingRules) -> bool:
    rule = rules.rule_for(event_type)
    return event_type in ERP_STEPS or (rule is not None and rule.action != "not_applicable")


def parity(
    stream: StreamView,
    primary: Mapping[str, Footprint],
    shadow: Mapping[str, Footprint],
    rules: PostingRules,
    window: Window = ALL_TIME,
    journal_types: Mapping[str, tuple[str, str]] | None = None,
) -> ParityReport:
    """Pure: parity of two ledgers' footprints per validated event in ``window``.

    ``journal_types``: event key -> (event type, period) of journals in the window,
    so effects of events that are not on the topic are compared as well.
    """
    report = ParityReport(window)
    none = Footprint()
    scope: dict[str, tuple[str, str]] = {
        e.key: (e.event_type, e.period)
        for e in stream.in_window(window)
        if has_effect(e.event_type, rules)
    }
    for key, typed in (journal_types or {}).items():
        scope.setdefault(key, typed)
    for key, (event_type, period) in sorted(scope.items()):
        p, s = primary.get(key, none), shadow.get(key, none)
        counts = report.by_type.setdefault(event_type, TypeParity())
        counts.compared += 1
        if p == s:
            counts.equal += 1
        else:
            report.differences.append(
                Difference(key, event_type, period, p.describe(), s.describe())
            )
    return report


def ledger_parity(
    stream: StreamView,
    primary: SqlLedger,
    shadow: SqlLedger,
    rules: PostingRules,
    window: Window = ALL_TIME,
) -> ParityReport:
    """Read both ledgers and compare them (see ``parity``)."""
    journals = {
        name: ledger.journal_summaries(window.start, window.end)
        for name, ledger in (("primary", primary), ("shadow", shadow))
    }
    typed = {j.event_key: (j.event_type, period_of(j.occurred_at))
             for js in journals.values() for j in js}  # fmt: skip
    return parity(
        stream,
        footprints(journals["primary"], primary.all_effects()),
        footprints(journals["shadow"], shadow.all_effects()),
        rules,
        window,
        typed,
    )


def shadow_processor(
    bootstrap: str,
    validated_topic: str,
    *,
    ledger: SqlLedger,
    erp: ErpAdapter,
    group: str,
    exceptions_topic: str,
    primary: Sequence[tuple[str, str]],
    decoder: EventDeserializer | None = None,
    batch_size: int = 500,
) -> SinkProcessor:
    """A sink that runs beside the primary. ``primary``: (what, value) pairs the shadow
    must not share with it (ledger URL, consumer group, exceptions topic)."""
    mine = {
        "ledger": normalize_url(ledger.engine.url.render_as_string(hide_password=False)),
        "consumer group": group,
        "exceptions topic": exceptions_topic,
    }
    for what, value in primary:
        ours = mine.get(what)
        if ours is not None and normalize_url(value) == ours:
            raise ConfigurationError(
                f"the shadow run would share the primary's {what} ({value}); give it its own "
                "(REVLINE_SHADOW_LEDGER_DSN, REVLINE_SHADOW_GROUP, REVLINE_SHADOW_EXCEPTIONS_TOPIC)"
            )
    return SinkProcessor(
        bootstrap, validated_topic, group, ledger, erp, exceptions_topic,
        batch_size=batch_size, decoder=decoder,
    )  # fmt: skip
