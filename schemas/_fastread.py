"""A compiled Avro binary decoder for the canonical events (the decode fast path).

fastavro's reader spends about 12 µs on a 250-byte event, the largest single cost of
judging one in process (the worker and ``revline rules backtest`` both pay it). This
decoder is generated once per schema as straight-line Python over the bytes (no file
object, no per-field dispatch) and builds the same dict fastavro does: same keys in the
same order, same values and types (``timestamp-millis`` as fastavro computes it).

It is only a fast path. It supports what the event schemas use (boolean, int, long,
string, enum, arrays, records, ``[null, T]`` unions, ``timestamp-millis``) and raises
``TypeError`` at compile time for anything else. At run time it raises on anything
unusual (a varint past 64 bits, an ``int`` outside 32 bits, a negative length or block
count, a boolean byte other than 0 or 1, bytes missing): the caller then decodes with
fastavro, whose result or error is what counts. So it only ever answers where fastavro
answers the same; equality with fastavro is a test.

Each string is also looked at as it is read: the decoder says whether every one is at
most ``SHORT_BYTES`` bytes and printable (``str.isprintable``: no control character, no
surrogate). Such an event cannot break the identifier rules of ``_structure``; False only
means "not shown", and the full rules judge it.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from revline.schemas._structure import SHORT as SHORT_BYTES

# (record, end position, every string short and printable)
Reader = Callable[[bytes, int], tuple[dict[str, Any], int, bool]]

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class _Gen:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.constants: dict[str, Any] = {}
        self.names: dict[str, dict[str, Any]] = {}
        self.counter = 0

    def var(self, stem: str) -> str:
        self.counter += 1
        return f"{stem}{self.counter}"

    def emit(self, indent: int, text: str) -> None:
        self.lines.append("    " * indent + text)

    def long(self, indent: int, target: str) -> None:
        # A zigzag varint, inline: a call per field costs more than the field.
        self.emit(indent, "b = data[pos]")
        self.emit(indent, "pos += 1")
        self.emit(indent, "if b < 128:")
        self.emit(indent + 1, f"{target} = (b >> 1) ^ -(b & 1)")
        self.emit(indent, "else:")
        self.emit(indent + 1, "n = b & 127")
        self.emit(indent + 1, "shift = 7")
        self.emit(indent + 1, "while True:")  # ends: the bytes do (IndexError)
        self.emit(indent + 2, "b = data[pos]")
        self.emit(indent + 2, "pos += 1")
        self.emit(indent + 2, "n |= (b & 127) << shift")
        self.emit(indent + 2, "if b < 128:")
        self.emit(indent + 3, "break")
        self.emit(indent + 2, "shift += 7")
        self.emit(indent + 1, "if shift > 63 or n >> 64:")
        self.emit(indent + 2, "raise ValueError('varint beyond 64 bits')")
        self.emit(indent + 1, f"{target} = (n >> 1) ^ -(n & 1)")

    def value(self, schema: Any, indent: int, namespace: str) -> str:
        """Emit code reading one value of ``schema``; return the variable holding it."""
        if isinstance(schema, list):
            return self.union(schema, indent, namespace)
        if isinstance(schema, str):
            if schema in ("int", "long", "string", "boolean"):
                return self.primitive(schema, indent)
            full = schema if "." in schema else f"{namespace}.{schema}"
            if full not in self.names:
                raise TypeError(f"unknown named type {schema!r}")
            return self.value(self.names[full], indent, namespace)
        kind = schema.get("type")
        logical = schema.get("logicalType")
        if kind == "record":
            return self.record(schema, indent, namespace)
        if kind == "enum":
            name = self.register(schema, namespace)
            symbols = self.var("SYMBOLS")
            self.constants[symbols] = tuple(schema["symbols"])
            target = self.var("v")
            self.long(indent, target)
            self.emit(indent, f"if {target} < 0:")
            self.emit(indent + 1, f"raise ValueError('negative enum index in {name}')")
            self.emit(indent, f"{target} = {symbols}[{target}]")
            return target
        if kind == "array":
            return self.array(schema, indent, namespace)
        if kind == "long" and logical == "timestamp-millis":
            # fastavro: epoch + timedelta(microseconds=ms * 1000), the same datetime (UTC);
            # milliseconds as timedelta's 4th argument is half the cost of its call.
            target = self.primitive("long", indent)
            self.emit(indent, f"{target} = _EPOCH + _timedelta(0, 0, 0, {target})")
            return target
        if isinstance(kind, str) and not logical and not (set(schema) - {"type", "doc"}):
            return self.value(kind, indent, namespace)
        raise TypeError(f"type {schema!r} not supported")

    def register(self, schema: dict[str, Any], namespace: str) -> str:
        name = schema["name"]
        full = name if "." in name else f"{schema.get('namespace', namespace)}.{name}"
        self.names[full] = schema
        return full

    def primitive(self, kind: str, indent: int) -> str:
        target = self.var("v")
        if kind == "boolean":
            self.emit(indent, "b = data[pos]")
            self.emit(indent, "pos += 1")
            self.emit(indent, "if b > 1:")
            self.emit(indent + 1, "raise ValueError('boolean byte is not 0 or 1')")
            self.emit(indent, f"{target} = b == 1")
            return target
        self.long(indent, target)
        if kind == "int":
            self.emit(indent, f"if not {_INT32_MIN} <= {target} <= {_INT32_MAX}:")
            self.emit(indent + 1, "raise ValueError('int beyond 32 bits')")
        elif kind == "string":
            length, end = target, self.var("end")
            target = self.var("s")
            self.emit(indent, f"{end} = pos + {length}")
            # A length past the end reads short; the caller's end == len(data) catches it.
            self.emit(indent, f"if {length} < 0:")
            self.emit(indent + 1, "raise ValueError('negative string length')")
            self.emit(indent, f"{target} = data[pos:{end}].decode()")
            self.emit(indent, f"pos = {end}")
            # Bytes bound the characters from above: a conservative test of the length.
            self.emit(indent, f"if {length} > {SHORT_BYTES} or not {target}.isprintable():")
            self.emit(indent + 1, "clean = False")
        return target

    def union(self, branches: list[Any], indent: int, namespace: str) -> str:
        if len(branches) != 2 or branches[0] != "null":
            raise TypeError("only [null, T] unions are supported")
        target = self.var("v")
        self.emit(indent, "b = data[pos]")
        self.emit(indent, "pos += 1")
        self.emit(indent, "if b == 0:")
        self.emit(indent + 1, f"{target} = None")
        self.emit(indent, "elif b == 2:")
        inner = self.value(branches[1], indent + 1, namespace)
        self.emit(indent + 1, f"{target} = {inner}")
        self.emit(indent, "else:")
        self.emit(indent + 1, "raise ValueError('union branch out of range')")
        return target

    def array(self, schema: dict[str, Any], indent: int, namespace: str) -> str:
        target, count = self.var("items"), self.var("count")
        self.emit(indent, f"{target} = []")
        self.long(indent, count)
        self.emit(indent, f"while {count}:")
        self.emit(indent + 1, f"if {count} < 0:")
        self.emit(indent + 2, "raise ValueError('block with a byte size')")
        self.emit(indent + 1, f"for _ in range({count}):")
        item = self.value(schema["items"], indent + 2, namespace)
        self.emit(indent + 2, f"{target}.append({item})")
        self.long(indent + 1, count)
        return target

    def record(self, schema: dict[str, Any], indent: int, namespace: str) -> str:
        full = self.register(schema, namespace)
        inner = full.rpartition(".")[0]
        parts = []
        for f in schema["fields"]:
            got = self.value(f["type"], indent, inner)
            parts.append(f"{f['name']!r}: {got}")
        target = self.var("r")
        self.emit(indent, f"{target} = {{{', '.join(parts)}}}")
        return target


def compile_reader(schema: dict[str, Any]) -> Reader:
    """A reader of records of ``schema`` (self-contained: named types defined before use)."""
    gen = _Gen()
    gen.emit(1, "clean = True")
    result = gen.value(schema, 1, schema.get("namespace", ""))
    gen.emit(1, f"return {result}, pos, clean")
    source = "def read(data, pos):\n" + "\n".join(gen.lines) + "\n"
    namespace: dict[str, Any] = {"_EPOCH": _EPOCH, "_timedelta": timedelta,
                                 **gen.constants}
    exec(compile(source, f"<fastread {schema.get('name')}>", "exec"), namespace)
    reader: Reader = namespace["read"]
    return reader


__all__ = ["SHORT_BYTES", "Reader", "compile_reader"]
