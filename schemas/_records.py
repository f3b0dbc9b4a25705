"""Avro records the pipeline itself writes: outcomes and exceptions.

Framed with Avro single-object encoding like the canonical events.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any, cast

from fastavro import schemaless_reader, schemaless_writer
from fastavro.schema import parse_schema

from revline.schemas._catalog import crc64_fingerprint
from revline.schemas._codec import (
    SINGLE_OBJECT_MAGIC,
    MalformedRecordError,
    describe_decode_error,
)
from revline.schemas._fastwrite import compile_encoder

PIPELINE_ROOT = Path(__file__).parent / "avro" / "pipeline"


class RecordCodec:
    def __init__(self, name: str) -> None:
        schema = json.loads((PIPELINE_ROOT / f"{name}.avsc").read_text())
        self.name = name
        self.parsed = cast(dict[str, Any], parse_schema(schema, _write_hint=False))
        self.header = SINGLE_OBJECT_MAGIC + crc64_fingerprint(schema)
        try:
            self._fast: Callable[[dict[str, Any]], bytes] | None = compile_encoder(schema)
        except TypeError:
            self._fast = None

    def encode(self, record: dict[str, Any]) -> bytes:
        if self._fast is not None:
            return self.header + self._fast(record)
        out = io.BytesIO()
        out.write(self.header)
        schemaless_writer(out, self.parsed, record)
        return out.getvalue()

    def decode(self, data: bytes) -> dict[str, Any]:
        if data[:10] != self.header:
            raise MalformedRecordError(f"not a {self.name} record (header {data[:10].hex()})")
        # Whatever the bytes, a DecodeError the readers (report, index rebuild, exception
        # manager) already route, never fastavro's own EOFError or UnicodeDecodeError.
        body = io.BytesIO(data)
        body.seek(10)
        try:
            record = schemaless_reader(body, self.parsed, None)
        except Exception as exc:
            raise MalformedRecordError(
                f"{self.name} record does not decode ({describe_decode_error(exc)})"
            ) from exc
        if body.tell() != len(data):
            raise MalformedRecordError(
                f"{self.name} record has {len(data) - body.tell()} trailing bytes")
        return cast(dict[str, Any], record)


@cache
def outcome_codec() -> RecordCodec:
    return RecordCodec("Outcome")


@cache
def exception_codec() -> RecordCodec:
    return RecordCodec("ExceptionRecord")
