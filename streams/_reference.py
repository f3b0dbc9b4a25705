"""Reference data (products, campaigns, channels) in a compacted Kafka topic.

``publish_reference`` writes one record per item (``product:SKU``,
``campaign:ID``, ``channel:ID``) and then ``__meta__`` with the version; the
worker reads the topic as a Faust global table and waits for ``__meta__``
before judging anything, so checks never run against half-loaded data.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any

from confluent_kafka import Producer

from revline.core.admin import ensure_topics
from revline.core.errors import InfrastructureError
from revline.core.kafka_config import client_config
from revline.processors import ReferenceData

META_KEY = b"__meta__"


def reference_records(data: Mapping[str, Any]) -> list[tuple[bytes, dict[str, Any]]]:
    records: list[tuple[bytes, dict[str, Any]]] = []
    for product in data.get("products", []):
        records.append((f"product:{product['sku']}".encode(), dict(product)))
    for campaign in data.get("campaigns", []):
        records.append((f"campaign:{campaign['campaign_id']}".encode(), dict(campaign)))
    for channel in data.get("channels", []):
        records.append((f"channel:{channel['channel_id']}".encode(), dict(channel)))
    return records


def publish_reference(bootstrap: str, topic: str, data: Mapping[str, Any]) -> int:
    """Publish reference data; returns the number of items (meta excluded)."""
    ReferenceData.from_mapping(data)  # refuse malformed data before anything is sent
    ensure_topics(
        bootstrap,
        {topic: 1},
        config={topic: {"cleanup.policy": "compact"}},
    )
    producer = Producer(client_config("producer", bootstrap, {"enable.idempotence": True,
                                                               "acks": "all"}))
    records = reference_records(data)
    for key, value in records:
        producer.produce(topic, key=key, value=json.dumps(value).encode())
    meta = {"version": str(data["version"]), "items": len(records),
            "loaded_at_ms": int(time.time() * 1000)}
    producer.produce(topic, key=META_KEY, value=json.dumps(meta).encode())
    if producer.flush(30):
        raise InfrastructureError(f"reference data not acknowledged by {bootstrap}")
    return len(records)


class ReferenceView:
    """ReferenceData built from a key -> JSON mapping (the global table), cached by version."""

    def __init__(self, table: Mapping[bytes, Any]) -> None:
        self._table = table
        self._stamp: tuple[Any, ...] | None = None
        self._data = ReferenceData(version="")

    def loaded(self) -> bool:
        return self._table.get(META_KEY) is not None

    def __call__(self) -> ReferenceData:
        return self._data

    def refresh(self) -> ReferenceData:
        """Rebuild if the loader published a new version (call once per batch, not per event)."""
        meta = self._table.get(META_KEY) or {}
        stamp = (meta.get("version"), meta.get("loaded_at_ms"))
        if stamp != self._stamp:
            products, campaigns, channels = [], [], []
            for key, value in list(self._table.items()):
                name = key.decode() if isinstance(key, bytes) else str(key)
                if value is None:
                    continue
                if name.startswith("product:"):
                    products.append(value)
                elif name.startswith("campaign:"):
                    campaigns.append(value)
                elif name.startswith("channel:"):
                    channels.append(value)
            self._data = ReferenceData.from_mapping({
                "version": meta.get("version", ""),
                "products": products,
                "campaigns": campaigns,
                "channels": channels,
            })
            self._stamp = stamp
        return self._data


ReferenceSource = Callable[[], ReferenceData]
