"""The wire contract: catalog, both framings, compatibility policy, typed decode errors."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from fastavro import schemaless_writer

from revline.schemas import (
    EVENT_TYPES,
    EventDeserializer,
    EventSerializer,
    MalformedRecordError,
    SchemaCatalog,
    UnknownSchemaError,
    default_catalog,
    registry_client,
    structural_error,
)
from revline.schemas._catalog import AVRO_ROOT
from revline.schemas._compat import compatibility_problems, example_value


def example_event(event_type: str) -> dict:
    entry = default_catalog().latest(event_type)
    assert entry is not None
    event = example_value(entry.schema)
    event["envelope"]["event_type"] = event_type
    event["envelope"]["schema_version"] = entry.version
    return event


def test_catalog_has_every_event_type_with_a_distinct_fingerprint() -> None:
    catalog = default_catalog()
    assert set(catalog.event_types()) == set(EVENT_TYPES.values())
    fingerprints = [e.fingerprint for e in catalog]
    assert len(fingerprints) == len(set(fingerprints))
    for entry in catalog:
        # Self-contained: no dangling reference to a shared named type.
        assert "revline.events.Envelope" not in json.dumps(entry.schema["fields"][0]["type"])
        assert entry.schema["fields"][0]["type"]["name"] == "Envelope"


@pytest.mark.parametrize("event_type", sorted(EVENT_TYPES.values()))
def test_every_schema_round_trips_an_example(event_type: str) -> None:
    event = example_event(event_type)
    data = EventSerializer()(event)
    assert data[:2] == b"\xc3\x01"
    assert EventDeserializer().decode(data) == event


def test_money_is_integer_minor_units_and_time_is_timestamp_millis() -> None:
    for entry in default_catalog():
        text = json.dumps(entry.schema)
        assert "decimal" not in text
        envelope = entry.schema["fields"][0]["type"]
        occurred = next(f for f in envelope["fields"] if f["name"] == "occurred_at")
        assert occurred["type"] == {"type": "long", "logicalType": "timestamp-millis"}
        for field in entry.schema["fields"]:
            if field["name"].endswith("_minor"):
                assert field["type"] == "long"


def test_unknown_fingerprint_is_a_typed_error_naming_it() -> None:
    data = EventSerializer()(example_event("order_booked"))
    forged = b"\xc3\x01" + bytes.fromhex("0011223344556677") + data[10:]
    with pytest.raises(UnknownSchemaError, match="0011223344556677") as info:
        EventDeserializer().decode(forged)
    assert info.value.schema_ref == "fingerprint:0011223344556677"


@pytest.mark.parametrize(
    "data",
    [b"", b"\x7b\x22not avro", b"\xc3\x01\x00", b"garbage-bytes-here"],
)
def test_unframed_or_truncated_bytes_are_malformed(data: bytes) -> None:
    with pytest.raises(MalformedRecordError):
        EventDeserializer().decode(data)


def test_truncated_body_and_trailing_bytes_are_malformed() -> None:
    data = EventSerializer()(example_event("payment_captured"))
    with pytest.raises(MalformedRecordError, match="does not decode"):
        EventDeserializer().decode(data[: len(data) - 5])
    with pytest.raises(MalformedRecordError, match="trailing"):
        EventDeserializer().decode(data + b"\x00\x01")


def mislabelled(body: str, label: str, order_id: str | None = None) -> bytes:
    """A framed ``body`` example whose ``envelope.event_type`` says ``label``."""
    entry = default_catalog().latest(body)
    assert entry is not None
    event = example_event(body)
    event["envelope"]["event_type"] = label
    if order_id is not None:
        event["envelope"]["order_id"] = order_id
    out = io.BytesIO()
    out.write(b"\xc3\x01" + entry.fingerprint)
    schemaless_writer(out, entry.parsed, event)
    return out.getvalue()


@pytest.mark.parametrize("body,label", [("order_cancelled", "discount_approved"),
                                        ("refund_issued", "payment_captured"),
                                        ("order_cancelled", "not_an_event")])
def test_a_body_labelled_as_another_event_is_a_structural_dead_letter(
        body: str, label: str) -> None:
    """``envelope.event_type`` is a plain Avro string: a foreign producer can label one
    event's body as another (the engine then read fields the body lacks and crashed, or
    booked a refund as a payment). The writer schema decides."""
    from revline.processors import DEAD_LETTER, InputRecord
    from revline.schemas import MislabelledRecordError
    from tests.processors.test_engine_manifest import make_engine

    data = mislabelled(body, label)
    with pytest.raises(MislabelledRecordError, match=f"body is a {body}") as raised:
        EventDeserializer().decode(data)
    assert raised.value.stage == "structure"
    decoded, dead = make_engine().decode(InputRecord("in", 0, 0, b"SO-1", data), 0)
    assert decoded is None and dead is not None
    assert dead.kind == DEAD_LETTER and dead.stage == "structure"


def test_confluent_framing_through_the_schema_registry_client() -> None:
    # No Schema Registry server can run here (it is a JVM service outside Maven Central's
    # reach as a runnable artifact), so this uses confluent-kafka's own in-process
    # double behind the real SchemaRegistryClient interface.
    registry = registry_client("mock://revline-tests")
    event = example_event("invoice_issued")
    data = EventSerializer(registry=registry)(event)
    assert data[0] == 0
    schema_id = int.from_bytes(data[1:5], "big")
    registered = registry.get_schema(schema_id)
    assert json.loads(registered.schema_str)["name"] == "InvoiceIssued"
    # The decoder reads both framings; single-object needs no registry.
    decoder = EventDeserializer(registry=registry)
    assert decoder.decode(data) == event
    assert decoder.decode(EventSerializer()(event)) == event


def test_confluent_framing_without_a_registry_says_what_to_set() -> None:
    with pytest.raises(UnknownSchemaError, match="SCHEMA_REGISTRY_URL"):
        EventDeserializer().decode(b"\x00\x00\x00\x00\x07" + b"\x02")


def test_registered_schema_outside_the_catalog_is_schema_drift() -> None:
    from confluent_kafka.schema_registry import Schema

    registry = registry_client("mock://revline-drift")
    foreign = {"type": "record", "name": "Mystery", "namespace": "x", "fields": []}
    schema_id = registry.register_schema("x.Mystery", Schema(json.dumps(foreign), "AVRO"))
    with pytest.raises(UnknownSchemaError, match="not in the local catalog"):
        EventDeserializer(registry=registry).decode(b"\x00" + schema_id.to_bytes(4, "big"))


def test_real_catalog_obeys_the_compatibility_policy() -> None:
    assert compatibility_problems(default_catalog()) == []


def _catalog_with_v2(tmp_path: Path, new_field: dict) -> SchemaCatalog:
    root = tmp_path / "avro"
    shutil.copytree(AVRO_ROOT, root)
    v2 = root / "v2"
    v2.mkdir()
    for shared in ("Envelope.avsc", "Line.avsc"):
        shutil.copy(root / "v1" / shared, v2 / shared)
    schema = json.loads((root / "v1" / "OrderCancelled.avsc").read_text())
    schema["fields"].append(new_field)
    (v2 / "OrderCancelled.avsc").write_text(json.dumps(schema))
    return SchemaCatalog.load(root)


def test_compatible_evolution_is_accepted_and_old_data_resolves_to_the_new_shape(
    tmp_path: Path,
) -> None:
    catalog = _catalog_with_v2(
        tmp_path, {"name": "cancelled_by", "type": ["null", "string"], "default": None}
    )
    assert catalog.versions("order_cancelled") == [1, 2]
    assert compatibility_problems(catalog) == []
    v1 = catalog.get("order_cancelled", 1)
    assert v1 is not None
    event = example_value(v1.schema)
    event["envelope"]["event_type"] = "order_cancelled"
    buffer = io.BytesIO()
    schemaless_writer(buffer, v1.parsed, event)
    data = b"\xc3\x01" + v1.fingerprint + buffer.getvalue()
    decoded = EventDeserializer(catalog).decode(data)
    assert decoded["cancelled_by"] is None  # filled from the v2 default


def test_incompatible_evolution_is_rejected(tmp_path: Path) -> None:
    catalog = _catalog_with_v2(tmp_path, {"name": "cancelled_by", "type": "string"})
    problems = compatibility_problems(catalog)
    assert problems and "order_cancelled" in problems[0]


def test_structural_rules() -> None:
    payment = example_event("payment_captured")
    assert structural_error(payment) is None
    payment["envelope"]["invoice_id"] = None
    assert structural_error(payment) == "payment_captured requires envelope.invoice_id"
    amendment = example_event("order_amended")
    amendment["envelope"]["amendment_number"] = 0
    assert "amendment_number >= 1" in (structural_error(amendment) or "")
    override = example_event("manual_override")
    override["reason_code"] = ""
    assert structural_error(override) == "manual_override requires reason_code"
