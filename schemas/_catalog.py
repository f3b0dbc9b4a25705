"""The local schema catalog: every versioned Avro record under ``schemas/avro/vN``.

Each event type's schema is expanded into one self-contained schema (shared
named types such as ``Envelope`` and ``Line`` inlined) so that it has a stable
CRC-64-AVRO fingerprint and can be registered as-is with a schema registry.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, cast

from fastavro.schema import fingerprint, parse_schema, to_parsing_canonical_form

AVRO_ROOT = Path(__file__).parent / "avro"
NAMESPACE = "revline.events"

# Record name -> wire event_type, in the order a flow usually happens.
EVENT_TYPES: dict[str, str] = {
    "OrderBooked": "order_booked",
    "DiscountApproved": "discount_approved",
    "OrderAmended": "order_amended",
    "OrderCancelled": "order_cancelled",
    "FulfilmentConfirmed": "fulfilment_confirmed",
    "InvoiceIssued": "invoice_issued",
    "PaymentCaptured": "payment_captured",
    "RefundIssued": "refund_issued",
    "ManualOverride": "manual_override",
}
RECORD_NAMES: dict[str, str] = {v: k for k, v in EVENT_TYPES.items()}

_VERSION_DIR = re.compile(r"^v(\d+)$")


@dataclass(frozen=True)
class SchemaEntry:
    """One version of one event type's schema."""

    event_type: str
    version: int
    full_name: str
    schema: dict[str, Any]  # self-contained JSON schema, as registered
    parsed: dict[str, Any] = field(repr=False)  # fastavro-parsed, for the codec
    fingerprint: bytes  # CRC-64-AVRO of the parsing canonical form, 8 bytes little-endian

    @property
    def schema_str(self) -> str:
        return json.dumps(self.schema, separators=(",", ":"))

    @property
    def fingerprint_hex(self) -> str:
        return self.fingerprint.hex()


def _inline(schema: Any, named: Mapping[str, dict[str, Any]], seen: set[str]) -> Any:
    """Replace references to shared named types by their definitions (first use only)."""
    if isinstance(schema, str):
        full = schema if "." in schema else f"{NAMESPACE}.{schema}"
        if full in named and full not in seen:
            seen.add(full)
            return _inline(named[full], named, seen)
        return schema
    if isinstance(schema, list):
        return [_inline(s, named, seen) for s in schema]
    if isinstance(schema, dict):
        kind = schema.get("type")
        if kind == "record":
            seen.add(f"{schema.get('namespace', NAMESPACE)}.{schema['name']}")
            out = dict(schema)
            out["fields"] = [
                {**f, "type": _inline(f["type"], named, seen)} for f in schema["fields"]
            ]
            return out
        if kind == "array":
            return {**schema, "items": _inline(schema["items"], named, seen)}
        if kind == "map":
            return {**schema, "values": _inline(schema["values"], named, seen)}
        if isinstance(kind, dict | list | str) and kind not in _PRIMITIVES:
            return {**schema, "type": _inline(kind, named, seen)}
        return schema
    return schema


_PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string",
               "enum", "fixed"}


def crc64_fingerprint(schema: dict[str, Any]) -> bytes:
    """The 8-byte little-endian CRC-64-AVRO fingerprint Avro single-object encoding uses."""
    canonical = to_parsing_canonical_form(parse_schema(schema, _write_hint=False))
    value = int(fingerprint(canonical, "CRC-64-AVRO"), 16)
    return value.to_bytes(8, "little")


class SchemaCatalog:
    """All known schema versions, indexed by event type, version and fingerprint."""

    def __init__(self, entries: list[SchemaEntry]) -> None:
        self._by_type: dict[str, dict[int, SchemaEntry]] = {}
        self._by_fingerprint: dict[bytes, SchemaEntry] = {}
        for entry in entries:
            self._by_type.setdefault(entry.event_type, {})[entry.version] = entry
            self._by_fingerprint[entry.fingerprint] = entry

    @classmethod
    def load(cls, root: Path = AVRO_ROOT) -> SchemaCatalog:
        entries: list[SchemaEntry] = []
        for version_dir in sorted(p for p in root.iterdir() if _VERSION_DIR.match(p.name)):
            version = int(version_dir.name[1:])
            raw = {p.stem: json.loads(p.read_text()) for p in sorted(version_dir.glob("*.avsc"))}
            shared = {
                f"{s.get('namespace', NAMESPACE)}.{s['name']}": s
                for name, s in raw.items()
                if name not in EVENT_TYPES
            }
            for record_name, event_type in EVENT_TYPES.items():
                if record_name not in raw:
                    continue  # a version may add only some records
                expanded = _inline(raw[record_name], shared, set())
                entries.append(
                    SchemaEntry(
                        event_type=event_type,
                        version=version,
                        full_name=f"{NAMESPACE}.{record_name}",
                        schema=expanded,
                        parsed=cast(dict[str, Any], parse_schema(expanded, _write_hint=False)),
                        fingerprint=crc64_fingerprint(expanded),
                    )
                )
        return cls(entries)

    def __iter__(self) -> Iterator[SchemaEntry]:
        for versions in self._by_type.values():
            yield from versions.values()

    def event_types(self) -> list[str]:
        return list(self._by_type)

    def versions(self, event_type: str) -> list[int]:
        return sorted(self._by_type.get(event_type, {}))

    def get(self, event_type: str, version: int | None = None) -> SchemaEntry | None:
        versions = self._by_type.get(event_type)
        if not versions:
            return None
        return versions.get(max(versions) if version is None else version)

    def latest(self, event_type: str) -> SchemaEntry | None:
        return self.get(event_type)

    def by_fingerprint(self, fp: bytes) -> SchemaEntry | None:
        return self._by_fingerprint.get(fp)


@cache
def default_catalog() -> SchemaCatalog:
    return SchemaCatalog.load()
