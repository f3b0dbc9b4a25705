"""One bundle of Prometheus metrics, created once and passed to whoever records.

Each bundle has its own registry, so tests and several workers in one process
never collide; ``serve()`` exposes it on ``/metrics``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
                    60, 300, 3600, 86400)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.events_in = Counter(
            "revline_events_in_total", "Input records by event type", ["event_type"], registry=r
        )
        self.outcomes = Counter(
            "revline_outcomes_total", "Final outcomes by kind", ["kind"], registry=r
        )
        self.duplicates = Counter(
            "revline_duplicates_total", "Re-sent copies recognised and not applied", registry=r
        )
        self.conflicting_duplicates = Counter(
            "revline_conflicting_duplicates_total",
            "Same idempotency key with a different body",
            registry=r,
        )
        self.replayed = Counter(
            "revline_replayed_inputs_total",
            "Redelivered inputs recognised by their coordinates (changed nothing)",
            registry=r,
        )
        self.gaps_filled = Counter(
            "revline_consumer_gaps_filled_total",
            "Inputs the consumer skipped and the worker fetched and processed itself",
            registry=r,
        )
        self.held = Gauge("revline_holds_current", "Events currently held", registry=r)
        self.oldest_hold_age = Gauge(
            "revline_hold_oldest_age_seconds", "Age of the oldest held event", registry=r
        )
        self.holds_released = Counter(
            "revline_holds_released_total", "Held events judged after release", registry=r
        )
        self.hold_timeouts = Counter(
            "revline_hold_timeouts_total", "Holds that outlived their timeout", registry=r
        )
        self.qa_failures = Counter(
            "revline_qa_failures_total", "Failed QA checks by check id and severity",
            ["check_id", "severity"], registry=r,
        )
        self.dead_letters = Counter(
            "revline_dead_letters_total", "Dead-lettered inputs by stage", ["stage"], registry=r
        )
        self.schema_drift = Counter(
            "revline_schema_drift_total", "Records naming a schema the catalog does not know",
            ["schema_ref"], registry=r,
        )
        self.processing_latency = Histogram(
            "revline_processing_seconds", "Time to decide and durably route one batch",
            registry=r, buckets=_LATENCY_BUCKETS,
        )
        self.end_to_end_latency = Histogram(
            "revline_end_to_end_seconds", "occurred_at of the event -> routed",
            registry=r, buckets=_LATENCY_BUCKETS,
        )
        self.consumer_lag = Gauge(
            "revline_consumer_lag", "Input records not yet processed", ["partition"], registry=r
        )
        self.reference_loaded = Gauge(
            "revline_reference_data_loaded", "1 once reference data is loaded", registry=r
        )
        self.recovering = Gauge(
            "revline_worker_recovering",
            "1 while the worker rebuilds state or waits for reference data (not consuming)",
            registry=r,
        )
        self.last_batch = Gauge(
            "revline_worker_last_batch_timestamp_seconds",
            "Unix time of the last batch the worker made durable", registry=r,
        )

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Expose /metrics; port 0 picks a free one. Returns the port."""
        return serve_registry(self.registry, port, addr)


def serve_registry(registry: CollectorRegistry, port: int, addr: str = "127.0.0.1") -> int:
    server, _ = start_http_server(port, addr=addr, registry=registry)
    bound: int = server.server_port
    return bound


class SinkMetrics:
    """The sink processor's metrics: effects, breakers, pauses, lag, latency."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.effects = Counter(
            "revline_sink_effects_total",
            "Effects by adapter and status (applied, already_applied, skipped, partial, refused)",
            ["adapter", "status"], registry=r,
        )
        # A validated event that the ledger or the ERP still refused: QA refuses first
        # whatever an adapter would, so this means the system's own data disagrees
        # with the stream. adapter is "ledger" or "erp" (fixed values, never input).
        self.refusals_validated = Counter(
            "revline_sink_refusals_validated_total",
            "Validated events a sink adapter refused (its data disagrees with the stream)",
            ["adapter"], registry=r,
        )
        for adapter in ("ledger", "erp"):
            self.refusals_validated.labels(adapter)  # exported at 0, so increase() sees the 1st
        self.breaker_open = Gauge(
            "revline_sink_breaker_open", "1 while the adapter's circuit breaker is open",
            ["adapter"], registry=r,
        )
        self.paused = Gauge(
            "revline_sink_paused", "1 while consumption is paused by an open breaker", registry=r
        )
        self.lag = Gauge(
            "revline_sink_lag", "Validated records not yet applied", ["partition"], registry=r
        )
        self.end_to_end = Histogram(
            "revline_sink_end_to_end_seconds",
            "Input record published -> its ledger/ERP effects committed",
            registry=r, buckets=_LATENCY_BUCKETS,
        )
        self.batch_seconds = Histogram(
            "revline_sink_batch_seconds", "Time to apply and commit one batch",
            registry=r, buckets=_LATENCY_BUCKETS,
        )

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        return serve_registry(self.registry, port, addr)


class ExceptionMetrics:
    """The exception manager's metrics: open exceptions and their age, SLA breaches."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.open = Gauge(
            "revline_exceptions_open", "Exceptions open or acknowledged (not yet closed)",
            ["owner", "severity"], registry=r,
        )
        self.oldest_age = Gauge(
            "revline_exception_oldest_age_seconds", "Age of the oldest exception not yet closed",
            ["owner", "severity"], registry=r,
        )
        self.sla_breaches = Counter(
            "revline_sla_breaches_total", "Exceptions not acknowledged within their SLA",
            ["owner", "severity"], registry=r,
        )
        self.transitions = Counter(
            "revline_exception_transitions_total",
            "Lifecycle transitions applied (open, acknowledged, escalated, resolved, waived, "
            "expired)", ["status"], registry=r,
        )
        self.escalations = Counter(
            "revline_escalations_total", "Escalations, by the backup owner they went to",
            ["owner"], registry=r,
        )

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Expose /metrics; port 0 picks a free one. Returns the port."""
        return serve_registry(self.registry, port, addr)
