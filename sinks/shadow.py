"""Shadow mode: a second sink on the same validated topic, and its parity with the primary.

A shadow run is an ordinary ``SinkProcessor`` with its own consumer group, its own
ledger database and its own ERP, producing its refusals to a shadow exceptions
topic, so it never touches what the primary owns (``shadow_processor`` refuses a
configuration that would share any of them). It is how a new posting rule, a new
ERP or a new release is proven before it becomes the primary.

Parity compares the two ledgers per validated event, that is per effect
(order_id, idempotency_key) (first copy of each, read from the topic; two orders
may share a key and are two events): the event's footprint is its journals (effect
key, type, currency, total) and its side-effect statuses per adapter (the ERP's own
document ids differ between two ERPs, so only the status counts). Events whose
type has no effect anywhere (fulfilment, approval, override) are not compared.
Parity % = events with identical footprints / events compared, per event type
and overall; journals whose event is not on the topic are compared too.

A legacy side-effect row (order_id None, written before effects were identified
per order) counts for every order's event under its key that has no row of its
own for that adapter, as the sink's lookups treat it.

The shadow sink fails over like the primary: REVLINE_SESSION_TIMEOUT_S and static
group membership (``group.instance.id`` = <instance>-shadow-sink), a watchdog on its
Kafka calls and a heartbeat (component ``shadow-sink``), and start-up that waits out
a cold cluster.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from revline.core.errors import ConfigurationError
from revline.core.metrics import SinkMetrics
from revline.core.redact import redact_url
from revline.core.settings import Settings
from revline.schemas import EventDeserializer
from revline.sinks._protocols import ErpAdapter
from revline.sinks.ledger import (
    EffectId,
    JournalSummary,
    PostingRules,
    SideEffect,
    SqlLedger,
    normalize_url,
)
from revline.sinks.processor import SinkProcessor
from revline.sinks.reconcile import ALL_TIME, ERP_STEPS, StreamView, Window, drift_pct, period_of


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


# Where footprints keep the legacy side-effect rows of a key no order-specific
# footprint has: (LEGACY_ORDER, key). ``parity`` falls back to it.
LEGACY_ORDER = ""


def footprints(
    journals: Iterable[JournalSummary], effects: Iterable[SideEffect]
) -> dict[EffectId, Footprint]:
    """Pure: (order_id, event key) -> footprint, from journal headers and side-effect rows.

    A legacy row (order_id None) joins every footprint of its key that has no row of
    that adapter; with none, it is kept under (LEGACY_ORDER, key).
    """
    js: dict[EffectId, list[tuple[str, str, str, int]]] = defaultdict(list)
    for j in journals:
        # A credit note's own key embeds the reversed journal's id; ids are not
        # comparable across releases (uuid5, then time-ordered), the reversed key is.
        key = j.idempotency_key if j.reverses_key is None else (
            f"{j.event_key}:reverses:{j.reverses_key}")
        js[(j.order_id, j.event_key)].append((key, j.event_type, j.currency, j.total_minor))
    es: dict[EffectId, dict[str, str]] = defaultdict(dict)  # effect -> adapter -> status
    legacy: dict[str, dict[str, str]] = defaultdict(dict)
    for e in effects:
        if e.order_id is None:
            legacy[e.idempotency_key][e.adapter] = e.status
        else:
            es[(e.order_id, e.idempotency_key)][e.adapter] = e.status
    idents = js.keys() | es.keys()
    keyed: dict[str, list[EffectId]] = defaultdict(list)
    for ident in idents:
        keyed[ident[1]].append(ident)
    for key, rows in legacy.items():
        for ident in keyed.get(key) or [(LEGACY_ORDER, key)]:
            for adapter, status in rows.items():
                es[ident].setdefault(adapter, status)
    return {
        ident: Footprint(tuple(sorted(js.get(ident, ()))),
                         tuple(sorted(es.get(ident, {}).items())))
        for ident in js.keys() | es.keys()
    }  # fmt: skip


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
    order_id: str
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


def _footprint(prints: Mapping[EffectId, Footprint], ident: EffectId) -> Footprint:
    found = prints.get(ident)
    if found is None:
        found = prints.get((LEGACY_ORDER, ident[1]), Footprint())
    return found


def parity(
    stream: StreamView,
    primary: Mapping[EffectId, Footprint],
    shadow: Mapping[EffectId, Footprint],
    rules: PostingRules,
    window: Window = ALL_TIME,
    journal_types: Mapping[EffectId, tuple[str, str]] | None = None,
) -> ParityReport:
    """Pure: parity of two ledgers' footprints per validated event in ``window``.

    Events are (order_id, key) effects. ``journal_types``: effect -> (event type,
    period) of journals in the window, so effects of events that are not on the
    topic are compared as well.
    """
    report = ParityReport(window)
    scope: dict[EffectId, tuple[str, str]] = {
        (e.order_id, e.key): (e.event_type, e.period)
        for e in stream.in_window(window)
        if has_effect(e.event_type, rules)
    }
    for ident, typed in (journal_types or {}).items():
        scope.setdefault(ident, typed)
    for ident, (event_type, period) in sorted(scope.items()):
        p, s = _footprint(primary, ident), _footprint(shadow, ident)
        counts = report.by_type.setdefault(event_type, TypeParity())
        counts.compared += 1
        if p == s:
            counts.equal += 1
        else:
            order_id, key = ident
            report.differences.append(
                Difference(key, order_id, event_type, period, p.describe(), s.describe())
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
    typed = {(j.order_id, j.event_key): (j.event_type, period_of(j.occurred_at))
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
    settings: Settings | None = None,
    instance: str | None = None,
    metrics: SinkMetrics | None = None,
) -> SinkProcessor:
    """A sink that runs beside the primary. ``primary``: (what, value) pairs the shadow
    must not share with it (ledger URL, consumer group, exceptions topic).

    ``settings`` (default: from the environment) gives the session timeout, the
    instance name (``instance`` wins) and the start-up deadline; ``metrics`` the
    registry of its heartbeat (serve it to scrape it)."""
    mine = {
        "ledger": normalize_url(ledger.engine.url.render_as_string(hide_password=False)),
        "consumer group": group,
        "exceptions topic": exceptions_topic,
    }
    for what, value in primary:
        ours = mine.get(what)
        if ours is not None and normalize_url(value) == ours:
            raise ConfigurationError(
                f"the shadow run would share the primary's {what} ({redact_url(value)}); give "
                "it its own (REVLINE_SHADOW_LEDGER_DSN, REVLINE_SHADOW_GROUP, "
                "REVLINE_SHADOW_EXCEPTIONS_TOPIC)"
            )
    from revline.core.startup import (
        claim_instance,
        group_instance_id,
        membership_config,
        wait_for_group_coordinator,
    )

    settings = settings or Settings()
    instance = instance or settings.instance_id
    claim_instance(settings.state_dir, f"{group}-{group_instance_id(SHADOW, instance)}")
    wait_for_group_coordinator(bootstrap, group, component=SHADOW,
                               timeout_s=settings.startup_timeout_s)
    return SinkProcessor(
        bootstrap, validated_topic, group, ledger, erp, exceptions_topic,
        metrics or SinkMetrics(), batch_size=batch_size, decoder=decoder,
        consumer_config=membership_config(settings.session_timeout_s, SHADOW, instance),
        component=SHADOW,
    )  # fmt: skip


SHADOW = "shadow-sink"
