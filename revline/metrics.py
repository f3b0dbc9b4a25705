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

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Expose /metrics; port 0 picks a free one. Returns the port."""
        server, _ = start_http_server(port, addr=addr, registry=self.registry)
        bound: int = server.server_port
        return bound
