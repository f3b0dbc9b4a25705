"""Read-only views of the worker's state straight from Kafka (no worker needed)."""

from __future__ import annotations

import json
from typing import Any

from revline.core.readback import read_topic
from revline.core.settings import Settings


def changelog_topic(settings: Settings) -> str:
    return f"{settings.app_id}-{settings.orders_table}-changelog"


def order_states(bootstrap: str, settings: Settings) -> dict[str, dict[str, Any]]:
    """The latest state of every order, from the orders table's changelog."""
    latest: dict[str, dict[str, Any] | None] = {}
    for msg in read_topic(bootstrap, changelog_topic(settings)):
        key = (msg.key() or b"").decode()
        value = msg.value()
        latest[key] = json.loads(value) if value else None
    return {k: v for k, v in latest.items() if v is not None}


def held_events(bootstrap: str, settings: Settings) -> list[dict[str, Any]]:
    rows = []
    for order_id, state in order_states(bootstrap, settings).items():
        for entry in state.get("held", []):
            rows.append({
                "order_id": order_id,
                "event_type": entry["event_type"],
                "idempotency_key": entry["key"],
                "waiting_for": entry["waiting_for"],
                "since_ms": entry["since_ms"],
                "coords": f"{entry['topic']}/{entry['partition']}/{entry['offset']}",
            })
    return sorted(rows, key=lambda r: r["since_ms"])
