"""The compatibility policy: consecutive versions of a record must read each other.

Version N+1's readers must read data written with version N (backward) and
version N's readers must read data written with N+1 (forward), by Avro schema
resolution. Checked by the test suite on the real catalog.
"""

from __future__ import annotations

import io
import itertools
from datetime import UTC, datetime
from typing import Any

from fastavro import schemaless_reader, schemaless_writer

from revline.schemas._catalog import SchemaCatalog, SchemaEntry

_EXAMPLE_TIME = datetime(2026, 11, 2, 9, 30, tzinfo=UTC)


def example_value(schema: Any, named: dict[str, Any] | None = None) -> Any:
    """A value of ``schema`` exercising every field (the non-null branch of unions)."""
    named = {} if named is None else named
    if isinstance(schema, str):
        primitive = {"null": None, "boolean": True, "int": 3, "long": 42, "float": 1.5,
                     "double": 2.5, "bytes": b"\x01", "string": "example"}
        if schema in primitive:
            return primitive[schema]
        return example_value(named[schema], named)
    if isinstance(schema, list):
        branch = next((s for s in schema if s != "null"), "null")
        return example_value(branch, named)
    kind = schema["type"]
    if schema.get("logicalType") == "timestamp-millis":
        return _EXAMPLE_TIME
    if kind == "record":
        full = schema["name"] if "." in schema["name"] else (
            f"{schema.get('namespace', 'revline.events')}.{schema['name']}"
        )
        named[full] = schema
        named[schema["name"]] = schema
        return {f["name"]: example_value(f["type"], named) for f in schema["fields"]}
    if kind == "enum":
        named[schema["name"]] = schema
        return schema["symbols"][0]
    if kind == "array":
        return [example_value(schema["items"], named)]
    if kind == "map":
        return {"k": example_value(schema["values"], named)}
    return example_value(kind, named)


def _resolves(writer: SchemaEntry, reader: SchemaEntry) -> str | None:
    buffer = io.BytesIO()
    schemaless_writer(buffer, writer.parsed, example_value(writer.schema))
    buffer.seek(0)
    try:
        schemaless_reader(buffer, writer.parsed, reader.parsed)
    except Exception as exc:  # fastavro's SchemaResolutionError and friends
        return (
            f"{writer.event_type}: v{reader.version} readers cannot read v{writer.version} data "
            f"({type(exc).__name__}: {exc})"
        )
    return None


def compatibility_problems(catalog: SchemaCatalog) -> list[str]:
    problems: list[str] = []
    for event_type in catalog.event_types():
        versions = catalog.versions(event_type)
        for old, new in itertools.pairwise(versions):
            a, b = catalog.get(event_type, old), catalog.get(event_type, new)
            assert a is not None and b is not None
            for writer, reader in ((a, b), (b, a)):
                problem = _resolves(writer, reader)
                if problem:
                    problems.append(problem)
    return problems
