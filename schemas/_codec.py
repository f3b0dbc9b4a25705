"""Encode and decode canonical events on the wire.

Two framings, both read by the same decoder:

* Avro single-object encoding (``C3 01`` + 8-byte CRC-64-AVRO fingerprint +
  body), resolved from the local catalog: the embedded default.
* The Confluent Schema Registry framing (``00`` + 4-byte schema id + body),
  used when a schema registry client is configured.

A record written with an older version of its event type is resolved to the
newest reader schema, so the rest of the pipeline sees one shape per type.
Serializers follow confluent-kafka's ``__call__(obj, ctx)`` convention.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping
from enum import StrEnum
from typing import TYPE_CHECKING, Any, cast

from fastavro import parse_schema, schemaless_reader, schemaless_writer

from revline.core.errors import InfrastructureError, RevlineError
from revline.schemas._catalog import SchemaCatalog, SchemaEntry, crc64_fingerprint, default_catalog
from revline.schemas._fastread import Reader, compile_reader

# fastavro names the stream it read from ("cannot read boolean from <_io.BytesIO object at
# 0x7f…>"): an address that differs on every run would make the same bad record's error text
# differ between a run and its replay, and tells an operator nothing.
_OBJECT_REPR = re.compile(r"\s*(?:from\s+)?<[\w.]+ object at 0x[0-9a-fA-F]+>")


def describe_decode_error(exc: Exception) -> str:
    """``ExcType: message`` of what fastavro raised, without the stream's address."""
    return f"{type(exc).__name__}: {_OBJECT_REPR.sub('', str(exc))}"

if TYPE_CHECKING:
    from confluent_kafka.schema_registry import SchemaRegistryClient

SINGLE_OBJECT_MAGIC = b"\xc3\x01"
CONFLUENT_MAGIC = b"\x00"


class WireFormat(StrEnum):
    SINGLE_OBJECT = "single-object"
    CONFLUENT = "confluent"


class DecodeError(RevlineError):
    """A record that cannot become a canonical event. Routed to the dead-letter topic."""

    stage = "decode"

    def __init__(self, message: str, *, schema_ref: str = "") -> None:
        super().__init__(message)
        self.schema_ref = schema_ref


class RegistryUnavailableError(InfrastructureError):
    """The schema registry refused us or did not answer: not the record's fault, so never
    a dead letter (the caller fails, and retries once the registry answers)."""


def registry_failure(exc: Exception, doing: str) -> RegistryUnavailableError:
    status = getattr(exc, "http_status_code", None)
    hint = (" (HTTP 401/403: check SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO)"
            if status in (401, 403) else "")
    return RegistryUnavailableError(f"the schema registry failed {doing}{hint}: {exc}")


class UnknownSchemaError(DecodeError):
    """The record names a schema (fingerprint or registry id) this catalog does not know."""

    stage = "schema"


class MalformedRecordError(DecodeError):
    """The bytes are not a well-framed Avro record of the schema they name."""


class MislabelledRecordError(MalformedRecordError):
    """A record whose ``envelope.event_type`` names another event than its schema: the
    body of one event labelled as another. Avro cannot say it (``event_type`` is a plain
    string); the engine would read fields the body does not have."""

    stage = "structure"


class EncodeError(RevlineError):
    """An event does not fit its schema (a bug in the caller: validate first)."""


INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
_Path = tuple[str, ...]  # field names; "*" steps into every item of an array


def _int_paths(schema: Any, path: _Path = ()) -> list[_Path]:
    """Where a record of ``schema`` holds an Avro ``int`` (32-bit): fastavro writes any
    Python int there as a varint, so a value beyond 32 bits would be accepted silently
    and break readers in other languages."""
    if isinstance(schema, str):
        return [path] if schema == "int" else []
    if isinstance(schema, list):  # a union: checked when the value is an int
        return sorted({p for branch in schema for p in _int_paths(branch, path)})
    if isinstance(schema, dict):
        kind = schema.get("type")
        if kind == "record":
            return [p for f in schema.get("fields", [])
                    for p in _int_paths(f["type"], (*path, f["name"]))]
        if kind == "array":
            return _int_paths(schema.get("items"), (*path, "*"))
        if kind == "map":
            return []  # none in the catalog
        if kind == "int" and not schema.get("logicalType"):
            return [path]
        if isinstance(kind, dict | list):
            return _int_paths(kind, path)
    return []


def _int32_problem(value: Any, path: _Path, at: str = "") -> str | None:
    if not path:
        if isinstance(value, int) and not isinstance(value, bool) and \
                not INT32_MIN <= value <= INT32_MAX:
            return f"{at}: {value} is outside the 32-bit range of an Avro int"
        return None
    step, rest = path[0], path[1:]
    if step == "*":
        if isinstance(value, list):
            for i, item in enumerate(value):
                problem = _int32_problem(item, rest, f"{at}.{i}" if at else str(i))
                if problem:
                    return problem
        return None
    if isinstance(value, Mapping) and step in value:
        return _int32_problem(value[step], rest, f"{at}.{step}" if at else step)
    return None


_MARKED: dict[bytes, dict[str, Any]] = {}


def _marked(entry: SchemaEntry) -> dict[str, Any]:
    """``entry``'s schema parsed with fastavro's parsed marker. The catalog's ``parsed``
    has none (``_write_hint=False``), and fastavro parses an unmarked schema again on every
    read and write: about 12 µs an event, more than half of decoding one."""
    marked = _MARKED.get(entry.fingerprint)
    if marked is None:
        marked = _MARKED[entry.fingerprint] = cast(dict[str, Any], parse_schema(entry.schema))
    return marked


_COMPILED: dict[str, Reader | None] = {}


def _compiled(entry: SchemaEntry) -> Reader | None:
    """``entry``'s compiled reader (``_fastread``), built once per process (~2 ms a schema,
    and every engine makes a deserializer); None for a type the fast path does not read.
    Keyed by the whole schema: the fingerprint's canonical form drops logical types."""
    key = entry.schema_str
    if key not in _COMPILED:
        try:
            _COMPILED[key] = compile_reader(entry.schema)
        except TypeError:
            _COMPILED[key] = None
    return _COMPILED[key]


def subject_for(entry: SchemaEntry) -> str:
    # RecordNameStrategy: one input topic carries every event type.
    return entry.full_name


class EventSerializer:
    """Canonical event dict -> framed Avro bytes."""

    def __init__(
        self,
        catalog: SchemaCatalog | None = None,
        registry: SchemaRegistryClient | None = None,
    ) -> None:
        self.catalog = catalog or default_catalog()
        self.registry = registry
        self._headers: dict[tuple[str, int], bytes] = {}
        self._int_paths: dict[tuple[str, int], list[_Path]] = {}

    @property
    def wire_format(self) -> WireFormat:
        return WireFormat.CONFLUENT if self.registry is not None else WireFormat.SINGLE_OBJECT

    def entry_for(self, event: Mapping[str, Any]) -> SchemaEntry:
        envelope = event["envelope"]
        event_type = envelope["event_type"]
        entry = self.catalog.get(event_type, envelope.get("schema_version"))
        if entry is None:
            raise EncodeError(
                f"no schema for event_type={event_type!r} "
                f"version={envelope.get('schema_version')!r}"
            )
        return entry

    def header_for(self, entry: SchemaEntry) -> bytes:
        key = (entry.event_type, entry.version)
        header = self._headers.get(key)
        if header is None:
            if self.registry is None:
                header = SINGLE_OBJECT_MAGIC + entry.fingerprint
            else:
                from confluent_kafka.schema_registry import Schema

                try:
                    schema_id = self.registry.register_schema(
                        subject_for(entry), Schema(entry.schema_str, "AVRO")
                    )
                except Exception as exc:  # the client's own error types
                    if getattr(exc, "http_status_code", None) in (409, 422):
                        raise  # the registry's compatibility gate refused this schema
                    raise registry_failure(exc, f"to register {subject_for(entry)}") from exc
                header = CONFLUENT_MAGIC + int(schema_id).to_bytes(4, "big")
            self._headers[key] = header
        return header

    def __call__(self, event: Mapping[str, Any], ctx: object = None) -> bytes:
        try:
            entry = self.entry_for(event)
        except (KeyError, TypeError, AttributeError) as exc:
            raise EncodeError(f"not a canonical event (no envelope.event_type): {exc!r}") from exc
        key = (entry.event_type, entry.version)
        paths = self._int_paths.get(key)
        if paths is None:
            paths = self._int_paths[key] = _int_paths(entry.parsed)
        for path in paths:
            problem = _int32_problem(event, path)
            if problem:
                raise EncodeError(f"{entry.event_type} v{entry.version}: {problem}")
        out = io.BytesIO()
        out.write(self.header_for(entry))
        try:
            schemaless_writer(out, _marked(entry), event)
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError,
                RecursionError) as exc:
            # OverflowError: an int beyond 64 bits in a long field.
            raise EncodeError(f"{entry.event_type} v{entry.version}: "
                              f"{type(exc).__name__}: {exc}") from exc
        return out.getvalue()


class EventDeserializer:
    """Framed Avro bytes (either framing) -> canonical event dict (newest shape)."""

    def __init__(
        self,
        catalog: SchemaCatalog | None = None,
        registry: SchemaRegistryClient | None = None,
    ) -> None:
        self.catalog = catalog or default_catalog()
        self.registry = registry
        self._by_fingerprint = {e.fingerprint: e for e in self.catalog}
        self._by_schema_id: dict[int, SchemaEntry] = {}
        # Writer -> reader: None when the writer is the newest version (no resolution).
        self._reader: dict[bytes, dict[str, Any] | None] = {}
        # The compiled fast path (``_fastread``), for writers that need no resolution.
        self._fast: dict[bytes, Reader] = {}
        for entry in self.catalog:
            latest = self.catalog.latest(entry.event_type)
            assert latest is not None
            self._reader[entry.fingerprint] = None if latest is entry else _marked(latest)
            if latest is entry:
                reader = _compiled(entry)
                if reader is not None:
                    self._fast[entry.fingerprint] = reader

    def writer_entry(self, data: bytes) -> tuple[SchemaEntry, int]:
        """The writer schema a record names and where its body starts."""
        if data[:2] == SINGLE_OBJECT_MAGIC:
            if len(data) < 10:
                raise MalformedRecordError("single-object header is truncated")
            entry = self._by_fingerprint.get(data[2:10])
            if entry is None:
                fp = data[2:10].hex()
                raise UnknownSchemaError(
                    f"unknown schema fingerprint {fp}: not in the local catalog "
                    "(schema drift: a producer uses a version this worker does not know)",
                    schema_ref=f"fingerprint:{fp}",
                )
            return entry, 10
        if data[:1] == CONFLUENT_MAGIC and len(data) >= 5:
            schema_id = int.from_bytes(data[1:5], "big")
            entry = self._by_schema_id.get(schema_id) or self._resolve_schema_id(schema_id)
            return entry, 5
        head = data[:4].hex() if data else "(empty)"
        raise MalformedRecordError(
            f"not a framed Avro record: starts with {head}, expected C3 01 (single-object) "
            "or 00 (Confluent schema registry)"
        )

    def _resolve_schema_id(self, schema_id: int) -> SchemaEntry:
        ref = f"schema-id:{schema_id}"
        if self.registry is None:
            raise UnknownSchemaError(
                f"schema id {schema_id} uses the Confluent framing but no schema registry "
                "is configured (set SCHEMA_REGISTRY_URL)",
                schema_ref=ref,
            )
        import json

        try:
            registered = self.registry.get_schema(schema_id)
        except Exception as exc:  # the client raises its own error types
            if getattr(exc, "http_status_code", None) != 404:
                raise registry_failure(exc, f"to look up schema id {schema_id}") from exc
            raise UnknownSchemaError(
                f"schema id {schema_id} is not in the schema registry: {exc}", schema_ref=ref
            ) from exc
        fp = crc64_fingerprint(json.loads(registered.schema_str or "null"))
        entry = self._by_fingerprint.get(fp)
        if entry is None:
            raise UnknownSchemaError(
                f"schema id {schema_id} (fingerprint {fp.hex()}) is registered but not in "
                "the local catalog (schema drift)",
                schema_ref=ref,
            )
        self._by_schema_id[schema_id] = entry
        return entry

    def decode(self, data: bytes) -> dict[str, Any]:
        return self.decode_plain(data)[0]

    def decode_plain(self, data: bytes) -> tuple[dict[str, Any], bool]:
        """``decode``, and whether every string of the event is short and printable, which
        ``structural_error(event, ids_clean=True)`` may take for granted (False: not known).

        The compiled reader answers when it reads the record to its last byte with the
        type its schema names; anything else (its own error included) is decoded again by
        fastavro below, whose record or error stands."""
        entry, start = self.writer_entry(data)
        fast = self._fast.get(entry.fingerprint)
        if fast is not None:
            try:
                record, end, clean = fast(data, start)
            except Exception:  # fastavro below decides: its record or its error
                pass
            else:
                if end == len(data) and record["envelope"]["event_type"] == entry.event_type:
                    return record, clean
        body = io.BytesIO(data)
        body.seek(start)
        try:
            record = cast(
                dict[str, Any],
                schemaless_reader(body, _marked(entry), self._reader[entry.fingerprint]),
            )
        except Exception as exc:  # fastavro raises anything from EOFError to UnicodeError
            raise MalformedRecordError(
                f"{entry.event_type} v{entry.version}: body does not decode "
                f"({describe_decode_error(exc)})",
                schema_ref=f"fingerprint:{entry.fingerprint_hex}",
            ) from exc
        if body.tell() != len(data):
            raise MalformedRecordError(
                f"{entry.event_type} v{entry.version}: {len(data) - body.tell()} trailing bytes "
                "after the record",
                schema_ref=f"fingerprint:{entry.fingerprint_hex}",
            )
        labelled = record["envelope"]["event_type"]
        if labelled != entry.event_type:
            raise MislabelledRecordError(
                f"envelope.event_type {str(labelled)[:100]!r} but the body is a "
                f"{entry.event_type} v{entry.version} record: one event labelled as another",
                schema_ref=f"fingerprint:{entry.fingerprint_hex}",
            )
        return record, False

    def __call__(self, data: bytes, ctx: object = None) -> dict[str, Any]:
        return self.decode(data)


def registry_client(config: str | Mapping[str, Any]) -> SchemaRegistryClient:
    """A schema registry client from a URL or a full config (``registry_config()``: the
    URL with basic auth and CA); ``mock://`` URLs give confluent-kafka's in-process double."""
    from confluent_kafka.schema_registry import SchemaRegistryClient

    conf = {"url": config} if isinstance(config, str) else dict(config)
    client: SchemaRegistryClient = SchemaRegistryClient.new_client(conf)
    return client
