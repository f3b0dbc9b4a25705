"""``revline bench --only memory``: memory of the long-running components by history size.

Issue 20 ("Bounded state in long-running components"): after 1M orders each component's
memory is roughly flat, not growing with history. Each component runs in its own child
process, fed a synthetic history through its real state-keeping code, and reports at each
checkpoint (orders of history: ``sizes``) its resident set (VmRSS after a full collection,
and the peak VmHWM so far) and the Python heap of its state objects (a deep
``sys.getsizeof`` walk of what the component keeps between batches).

The history is the generated workload (``revline.tools.workload``: orders 37 s apart, each
a flow of 1-8 events, with its duplicates, out-of-order deliveries, QA faults and poison
records), generated in chunks of ``CHUNK_ORDERS`` orders on one continuous simulated clock,
so the driver holds one chunk at a time. The three children run one after another, each
reading what the one before wrote (files in the run's directory, standing in for topics):

* **worker** — ``revline.streams.app.Worker`` built as ``revline worker`` builds it
  (Faust app, ``orders`` table in the memory store, the engine, the output writer), its
  Kafka clients replaced by in-process stand-ins that acknowledge at once. The inputs go
  through ``Worker.process_batch`` in batches; ``Worker.housekeeping`` runs after every
  batch on the simulated clock (hold timeouts, retention eviction by the last-seen index);
  the tick commands it sends (expire, evict) come back as the ticks agent delivers them.
  The exception and outcome records the output writer encodes go to files for the others.
* **exceptions** — ``revline.streams.exceptions.ExceptionManager`` with its read model
  (``ReadModel`` on SQLite in the run's directory, ``PagedStates``): the worker's exception
  records in batches of 500 as ``run`` reads them, operators' lifecycle events (ack then
  resolve, waive, or nothing: the timer escalates and expires), ``tick`` and ``flush`` on
  the simulated clock. The producer is an in-process stand-in acknowledging at once (the
  delivery reports carry offsets, so the read model's flush path is the production one);
  the audit facts it produces go to a file for the auditor.
* **auditor** — ``revline.streams.audit.Chainer`` with its read model (SQLite, the
  ``HeadCache``): the worker's outcomes and the manager's audit facts in batches of 500
  through ``_chain_batch`` → ``_commit`` → the read-model write, with a transactional
  producer stand-in.

Not covered: librdkafka's own buffers and threads, Faust's consumer and changelog machinery
at run time, the broker, and PostgreSQL (SQLite's page cache is in the child's RSS
instead). Driving the real processes through Kafka for 1M orders would take days on the
2-core machine (the pipeline runs ~200 inputs/s end to end with every component).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import heapq
import json
import os
import random
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, BinaryIO

ProgressFn = Callable[[str, int, int | None], None]

COMPONENTS = ("worker", "exceptions", "auditor")
LABELS = {
    "worker": "worker (order states, holds, last-seen index)",
    "exceptions": "exception manager (paged states)",
    "auditor": "auditor (chain heads)",
}
CHUNK_ORDERS = 5_000  # orders generated at a time (the driver's own memory)
WORKER_BATCH = 500
SOURCE_BATCH = 500  # what the manager and the auditor consume at a time
PARTITIONS = 6  # the default input_partitions
BOOTSTRAP = "127.0.0.1:9"  # nothing listens: the Kafka clients are replaced
SECONDS_BETWEEN_ORDERS = 37  # the workload generator's spacing
FLAT_RATIO = 1.5  # "roughly flat": the largest size's figure within this of the smallest's


@dataclass(frozen=True)
class MemoryBenchOptions:
    sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000)
    seed: int = 20
    components: tuple[str, ...] = COMPONENTS
    # Tests: every bound (worker's max_orders, the manager's state cache, the auditor's head
    # cache) this small, so a short history already runs past them. None: production's.
    cap: int | None = None


@dataclass
class Point:
    """One component at one history size."""

    orders: int
    rss_kb: int
    hwm_kb: int
    state_bytes: int
    kept: dict[str, int] = field(default_factory=dict)  # items held in memory, by name
    stored: dict[str, int] = field(default_factory=dict)  # rows/records outside memory
    seconds: float = 0.0  # since the child started


@dataclass
class ComponentRun:
    name: str
    points: list[Point] = field(default_factory=list)
    baseline_rss_kb: int = 0  # before the first order
    error: str | None = None

    def ratio(self, attr: str) -> float | None:
        if len(self.points) < 2:
            return None
        first, last = getattr(self.points[0], attr), getattr(self.points[-1], attr)
        return last / first if first else None


@dataclass
class MemoryReport:
    sizes: tuple[int, ...]
    runs: list[ComponentRun] = field(default_factory=list)
    retention_days: float = 30.0
    cap: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.runs) and all(
            r.error is None and len(r.points) == len(self.sizes) for r in self.runs)

    @staticmethod
    def header() -> tuple[str, ...]:
        return ("component", "orders", "RSS MiB", "peak RSS MiB", "state heap MiB",
                "held in memory", "seconds")

    def rows(self) -> list[tuple[str, ...]]:
        out: list[tuple[str, ...]] = []
        for run in self.runs:
            if run.error is not None:
                out.append((LABELS[run.name], "–", "–", "–", "–", f"failed: {run.error}", "–"))
                continue
            for p in run.points:
                kept = ", ".join(f"{k} {v:,}" for k, v in p.kept.items())
                out.append((LABELS[run.name], f"{p.orders:,}", _mib(p.rss_kb * 1024),
                            _mib(p.hwm_kb * 1024), _mib(p.state_bytes), kept,
                            f"{p.seconds:,.0f}"))
        return out

    def ratio_lines(self) -> list[str]:
        lines = []
        for run in self.runs:
            if run.error is not None or len(run.points) < 2:
                continue
            first, last = run.points[0], run.points[-1]
            rss, heap = run.ratio("rss_kb"), run.ratio("state_bytes")
            stored = ", ".join(f"{k} {v:,}" for k, v in last.stored.items())
            verdict = ("flat" if rss is not None and rss <= FLAT_RATIO else "grows")
            lines.append(
                f"{run.name}: {last.orders:,} ÷ {first.orders:,} orders — RSS "
                f"{_ratio(rss)}, state heap {_ratio(heap)} ({verdict}; RSS before the first "
                f"order {_mib(run.baseline_rss_kb * 1024)} MiB"
                + (f"; outside memory at {last.orders:,}: {stored}" if stored else "") + ")")
        return lines

    def lines(self) -> list[str]:
        caps = ([] if self.cap is None else [
            f"memory: bounds lowered to {self.cap:,} (max_orders, state and head caches)"])
        return [*self.ratio_lines(), *self.notes, *caps,
                f"memory: the generated workload (orders {SECONDS_BETWEEN_ORDERS} s apart, "
                f"so the worker's {self.retention_days:g}-day retention window holds "
                f"~{int(self.retention_days * 86_400 / SECONDS_BETWEEN_ORDERS):,} orders) "
                "through each component's own state code, one child process each, Kafka "
                "clients replaced by in-process stand-ins, read model on SQLite "
                "(revline/tools/memory_bench.py)"]

    def to_markdown(self) -> list[str]:
        lines = ["| " + " | ".join(self.header()) + " |", "|---|--:|--:|--:|--:|---|--:|"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows()]
        return lines

    def to_rich(self) -> list[Any]:
        from rich.table import Table

        table = Table(title="revline bench — memory by history size")
        for i, name in enumerate(self.header()):
            table.add_column(name, justify="left" if i in (0, 5) else "right")
        for row in self.rows():
            table.add_row(*row)
        return [table]


def _mib(n: float) -> str:
    return f"{n / 1024 / 1024:,.1f}"


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


# -- the parent ------------------------------------------------------------------------------
def run(options: MemoryBenchOptions | None = None, progress: ProgressFn | None = None,
        workdir: Path | None = None) -> MemoryReport:
    """Each component in its own child process, all at once (each follows the files the
    one before it writes); the report has each one's figures at each size."""
    import threading

    from revline.core.settings import Settings

    options = options or MemoryBenchOptions()
    step = progress or (lambda _step, _done, _total: None)
    sizes = tuple(sorted(set(options.sizes)))
    report = MemoryReport(sizes=sizes, retention_days=Settings().dedup_retention_days,
                          cap=options.cap)
    names = [n for n in COMPONENTS if n in options.components]
    label = f"memory: {', '.join(names)} (a process each)"
    with tempfile.TemporaryDirectory(prefix="revline-memory-", dir=workdir) as tmp:
        children = [_Child(name, Path(tmp), sizes, options.seed, options.cap)
                    for name in names]
        threads = [threading.Thread(target=c.collect, daemon=True) for c in children]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            step(label, min((c.done for c in children), default=0), sizes[-1])
            for t in threads:
                t.join(0.5)
                if not t.is_alive() and any(c.result.error for c in children):
                    for c in children:  # a follower would wait for its source for ever
                        c.stop()
        step(label, sizes[-1], sizes[-1])
        report.runs = [c.result for c in children]
    return report


class _Child:
    def __init__(self, name: str, workdir: Path, sizes: tuple[int, ...], seed: int,
                 cap: int | None) -> None:
        self.result = ComponentRun(name)
        self.done = 0
        cmd = [sys.executable, "-m", "revline.tools.memory_bench", name, str(workdir),
               ",".join(map(str, sizes)), "--seed", str(seed),
               *(["--cap", str(cap)] if cap is not None else [])]
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        for key in [k for k in env if k.startswith("REVLINE_")]:
            del env[key]  # the child's settings are the defaults, whatever the caller set
        self.err_path = workdir / f"{name}.stderr"
        with self.err_path.open("wb") as err:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                                         env=env)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()

    def collect(self) -> None:
        result, proc = self.result, self.proc
        assert proc.stdout is not None
        with proc:
            for line in proc.stdout:
                try:
                    msg = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if "progress" in msg:
                    self.done = int(msg["progress"])
                elif "baseline_rss_kb" in msg:
                    result.baseline_rss_kb = int(msg["baseline_rss_kb"])
                elif "point" in msg:
                    result.points.append(Point(**msg["point"]))
        if proc.returncode != 0:
            tail = self.err_path.read_text(errors="replace").strip().splitlines()[-3:]
            result.error = f"exit {proc.returncode}: {' / '.join(tail)[:500]}"


# -- measuring -------------------------------------------------------------------------------
def _status_kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # not Linux: the peak


def deep_size(*roots: Any) -> int:
    """Bytes of ``roots`` and everything their containers and Revline objects hold (each
    object once; other objects count their own size only)."""
    seen: set[int] = set()
    todo = list(roots)
    total = 0
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        if isinstance(obj, dict):
            todo.extend(obj.keys())
            todo.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset, deque)):
            todo.extend(obj)
        elif type(obj).__module__.startswith("revline."):  # the components' own objects
            if hasattr(obj, "__dict__"):
                todo.append(vars(obj))
            todo.extend(getattr(obj, s) for s in getattr(obj, "__slots__", ())
                        if hasattr(obj, s))
    return total


class _Emitter:
    def __init__(self) -> None:
        self.started = time.monotonic()
        self._last_progress = 0.0

    def send(self, **msg: Any) -> None:
        sys.stdout.write(json.dumps(msg) + "\n")
        sys.stdout.flush()

    def progress(self, orders: int) -> None:
        if time.monotonic() - self._last_progress > 1.0:
            self._last_progress = time.monotonic()
            self.send(progress=orders)

    def point(self, orders: int, roots: Sequence[Any], kept: dict[str, int],
              stored: dict[str, int] | None = None) -> None:
        gc.collect()
        self.send(point={
            "orders": orders, "rss_kb": _status_kb("VmRSS"), "hwm_kb": _status_kb("VmHWM"),
            "state_bytes": deep_size(*roots), "kept": kept, "stored": stored or {},
            "seconds": time.monotonic() - self.started})


# -- topics as files -------------------------------------------------------------------------
_RECORD, _MARK = b"R", b"M"
_HEAD = struct.Struct("<cBqII")  # tag, partition, timestamp/orders, key length, value length


class _TopicFile:
    """Records (partition, key, value, timestamp) and marks (orders so far, clock) in order;
    readers may follow it while it is written (up to the last mark, until ``.done``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f: BinaryIO = path.open("wb")

    def append(self, partition: int, key: bytes, value: bytes, timestamp_ms: int) -> None:
        self._f.write(_HEAD.pack(_RECORD, partition, timestamp_ms, len(key), len(value)))
        self._f.write(key)
        self._f.write(value)

    def mark(self, orders: int, clock_ms: int) -> None:
        self._f.write(_HEAD.pack(_MARK, 0, orders, 0, 8))
        self._f.write(struct.pack("<q", clock_ms))
        self._f.flush()

    def close(self) -> None:
        self._f.close()
        _done(self.path).touch()


def _done(path: Path) -> Path:
    return path.with_name(path.name + ".done")


Item = tuple[bytes, int, int, bytes, bytes]  # tag, partition or 0, ts or orders, key, value


def _read_topic(path: Path, wait_s: float = 0.2) -> Iterator[Item]:
    """The file's items, following it until its writer has closed it (``.done``)."""
    while not path.exists():
        time.sleep(wait_s)
    with path.open("rb") as f:
        while True:
            finished = _done(path).exists()  # before the read: then a short read is the end
            at = f.tell()
            head = f.read(_HEAD.size)
            if len(head) == _HEAD.size:
                tag, partition, number, klen, vlen = _HEAD.unpack(head)
                key = f.read(klen)
                value = f.read(vlen)
                if len(key) == klen and len(value) == vlen:
                    yield tag, partition, number, key, value
                    continue
            if finished:
                return
            f.seek(at)  # written in part: wait for the rest
            time.sleep(wait_s)


def _segments(path: Path) -> Iterator[tuple[list[Item], int, int]]:
    """(records, orders so far, clock) up to each mark."""
    records: list[Item] = []
    for item in _read_topic(path):
        if item[0] == _MARK:
            yield records, item[2], struct.unpack("<q", item[4])[0]
            records = []
        else:
            records.append(item)


def partition_of(key: bytes | None) -> int:
    return zlib.crc32(key or b"") % PARTITIONS


class _Msg:
    """What the components read of a confluent-kafka Message."""

    __slots__ = ("_headers", "_key", "_offset", "_partition", "_topic", "_ts", "_value")

    def __init__(self, topic: str, partition: int, offset: int, key: bytes | None,
                 value: bytes | None, timestamp_ms: int = 0,
                 headers: list[tuple[str, bytes]] | None = None) -> None:
        self._topic, self._partition, self._offset = topic, partition, offset
        self._key, self._value, self._ts, self._headers = key, value, timestamp_ms, headers

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def headers(self) -> list[tuple[str, bytes]] | None:
        return self._headers

    def timestamp(self) -> tuple[int, int]:
        return (1, self._ts)


class _Producer:
    """A producer whose records are acknowledged at the next flush (offsets per partition);
    ``sink(topic, partition, key, value)`` sees each one."""

    def __init__(self, sink: Callable[[str, int, bytes, bytes | None], None] | None = None,
                 on_delivery: Callable[..., None] | None = None) -> None:
        self.sink = sink
        self.default_delivery = on_delivery
        self.offsets: dict[tuple[str, int], int] = {}
        self.pending: list[tuple[Callable[..., None], _Msg]] = []

    def produce(self, topic: str, value: bytes | None = None, key: bytes | None = None,
                partition: int | None = None, on_delivery: Callable[..., None] | None = None,
                **_: Any) -> None:
        p = partition_of(key) if partition is None or partition < 0 else partition
        offset = self.offsets.get((topic, p), 0)
        self.offsets[topic, p] = offset + 1
        if self.sink is not None:
            self.sink(topic, p, key or b"", value)
        callback = on_delivery or self.default_delivery
        if callback is not None:
            self.pending.append((callback, _Msg(topic, p, offset, key, value)))

    def poll(self, _timeout: float = 0) -> int:
        return 0

    def flush(self, _timeout: float = 0) -> int:
        pending, self.pending = self.pending, []
        for callback, msg in pending:
            callback(None, msg)
        return 0

    # the auditor's transactional calls
    def begin_transaction(self) -> None:
        return None

    def send_offsets_to_transaction(self, *_: Any) -> None:
        return None

    def commit_transaction(self, *_: Any) -> None:
        return None


# -- the worker ------------------------------------------------------------------------------
Chunk = list[tuple[bytes | None, bytes, int]]


def _workload_chunks(sizes: Sequence[int], seed: int) -> Iterator[tuple[int, Chunk]]:
    """(orders so far, [(key, value, event time ms)]) per chunk: one continuous history,
    cut at every size."""
    from revline.tools.workload import EPOCH, WorkloadOptions, encoded, generate

    done = 0
    clock = 0
    total = max(sizes)
    while done < total:
        n = min(CHUNK_ORDERS, min(s for s in sizes if s > done) - done)
        start = EPOCH + timedelta(seconds=done * SECONDS_BETWEEN_ORDERS)
        work = generate(WorkloadOptions(orders=n, seed=seed * 100_003 + done,
                                        run_id=f"m{done}", start=start))
        out: Chunk = []
        for r, value, at in encoded(work.records, clock):
            out.append((r.key.encode() if r.key else None, value, at))
            clock = at
        del work
        done += n
        yield done, out


def child_worker(workdir: Path, sizes: Sequence[int], seed: int, emit: _Emitter,
                 cap: int | None = None) -> None:
    from confluent_kafka import TopicPartition

    from revline.core.metrics import Metrics
    from revline.core.settings import DATA_DIR, Settings
    from revline.processors import load_yaml
    from revline.streams import app as app_module
    from revline.streams._reference import reference_records

    bounds: dict[str, Any] = {} if cap is None else {"max_orders": cap}
    settings = Settings(state_dir=workdir / "worker-state", input_partitions=PARTITIONS,
                        batch_size=WORKER_BATCH, **bounds)
    clock = [0]
    app_module._now_ms = lambda: clock[0]  # simulated time
    worker = app_module.Worker(settings, BOOTSTRAP, Metrics())
    for consumer in (worker.consumer, worker.reference_consumer):
        consumer.close()
    exceptions = _TopicFile(workdir / "exceptions.bin")
    outcomes = _TopicFile(workdir / "outcomes.bin")

    def sink(topic: str, partition: int, key: bytes, value: bytes | None) -> None:
        if value is None:
            return
        if topic == settings.exceptions_topic:
            exceptions.append(partition, key, value, clock[0])
        elif topic == settings.outcomes_topic:
            outcomes.append(partition, key, value, clock[0])

    worker.writer._producer = _Producer(sink)  # type: ignore[assignment]
    ticks: list[tuple[int, bytes, bytes]] = []

    class Ticker:
        def produce(self, _topic: str, key: bytes, value: bytes, partition: int) -> None:
            ticks.append((partition, key, value))

        def flush(self, _timeout: float = 0) -> int:
            return 0

    positions: dict[int, int] = {}

    class InputConsumer:
        def commit(self, **_: Any) -> None:
            return None

        def get_watermark_offsets(self, tp: TopicPartition, **_: Any) -> tuple[int, int]:
            return 0, positions.get(tp.partition, 0)

        def position(self, tps: list[TopicPartition]) -> list[TopicPartition]:
            return [TopicPartition(tp.topic, tp.partition, positions.get(tp.partition, 0))
                    for tp in tps]

    worker.ticker = Ticker()  # type: ignore[assignment]
    worker.consumer = InputConsumer()  # type: ignore[assignment]
    for key, value in reference_records(load_yaml(DATA_DIR / "reference.yaml")):
        worker.reference[key] = value
    worker.assigned = set(range(PARTITIONS))
    worker._last_retention_ms = 0
    topic = settings.input_topic
    wanted = sorted(sizes)
    store = worker.orders.data

    def roots() -> list[Any]:
        return [getattr(store, "data", store), getattr(store, "_key_partition", {}),
                worker.holding, worker.tick_sent, worker.due_end, worker.last_seen.at,
                worker.last_seen._heap, worker.next_offset]

    emit.send(baseline_rss_kb=_status_kb("VmRSS"))

    async def feed() -> None:
        for orders, chunk in _workload_chunks(wanted, seed):
            for start in range(0, len(chunk), WORKER_BATCH):
                batch = []
                for key, value, when in chunk[start:start + WORKER_BATCH]:
                    p = partition_of(key)
                    offset = positions.get(p, 0)
                    positions[p] = offset + 1
                    batch.append(_Msg(topic, p, offset, key, value, when,
                                      [("revline-source-line", b"0")]))
                    clock[0] = max(clock[0], when + 1_000)
                commands, ticks[:] = list(ticks), []
                await worker.process_batch(batch, commands)  # type: ignore[arg-type]
                worker.housekeeping()
            emit.progress(orders)
            outcomes.mark(orders, clock[0])
            exceptions.mark(orders, clock[0])
            if orders in wanted:
                emit.point(orders, roots(), {
                    "orders": len(worker.last_seen), "holding": len(worker.holding),
                    "tick_sent": len(worker.tick_sent)})
            del chunk

    asyncio.run(feed())
    outcomes.close()
    exceptions.close()


# -- the exception manager -------------------------------------------------------------------
def _read_model(workdir: Path, name: str) -> Any:
    from revline.sinks.read_model import ReadModel

    return ReadModel(f"sqlite:///{(workdir / f'{name}.db').absolute()}")


def _lifecycle(exception_id: str, opened_ms: int, owner: str, rng: random.Random,
               ) -> list[tuple[int, dict[str, Any]]]:
    """What operators do with an exception: mostly ack then resolve, some waive, some
    nothing (the manager's timer escalates, then expires it)."""
    roll = rng.random()
    at = opened_ms + rng.randint(5, 120) * 60_000
    if roll < 0.6:
        done = at + rng.randint(1, 48) * 3_600_000
        return [(at, {"event_id": f"ack:{exception_id}", "type": "ack",
                      "exception_id": exception_id, "actor": owner, "at_ms": at}),
                (done, {"event_id": f"resolve:{exception_id}", "type": "resolve",
                        "exception_id": exception_id, "actor": owner, "at_ms": done,
                        "reason_code": "FIXED_UPSTREAM", "note": "corrected at the source"})]
    if roll < 0.75:
        return [(at, {"event_id": f"waive:{exception_id}", "type": "waive",
                      "exception_id": exception_id, "actor": owner, "at_ms": at,
                      "reason_code": "IMMATERIAL"})]
    return []


def child_exceptions(workdir: Path, sizes: Sequence[int], seed: int, emit: _Emitter,
                 cap: int | None = None) -> None:
    import orjson

    from revline.core.metrics import ExceptionMetrics
    from revline.core.settings import DATA_DIR, Settings
    from revline.processors.ownership import load_ownership
    from revline.schemas import exception_codec
    from revline.streams import exceptions as exceptions_module
    from revline.streams.exceptions import ExceptionManager

    if cap is not None:
        exceptions_module.STATE_CACHE_SIZE = cap  # read when the manager is built

    settings = Settings(state_dir=workdir / "exceptions-state")
    model = _read_model(workdir, "exceptions")
    facts = _TopicFile(workdir / "facts.bin")

    def sink(topic: str, partition: int, key: bytes, value: bytes | None) -> None:
        if topic == settings.audit_facts_topic and value is not None:
            facts.append(partition, key, value, clock[0])

    clock = [0]
    producer = _Producer(sink)
    manager = ExceptionManager(settings, BOOTSTRAP, load_ownership(DATA_DIR / "ownership.yaml"),
                               ExceptionMetrics(), clock=lambda: clock[0],
                               producer=producer,  # type: ignore[arg-type]
                               read_model=model)
    producer.default_delivery = manager._on_delivery
    codec = exception_codec()
    rng = random.Random(seed)
    due: list[tuple[int, int, dict[str, Any]]] = []  # (at, tie, lifecycle event)
    tie = 0
    interval = int(settings.exception_check_interval_s * 1000)
    last_tick = 0
    opened = 0
    wanted = set(sizes)
    emit.send(baseline_rss_kb=_status_kb("VmRSS"))

    def advance(now: int) -> None:
        nonlocal last_tick
        clock[0] = max(clock[0], now)
        while due and due[0][0] <= clock[0]:
            _, _, event = heapq.heappop(due)
            manager.on_lifecycle_event(orjson.dumps(event))
        if clock[0] - last_tick >= interval:
            manager.tick(clock[0], observe=False)
            last_tick = clock[0]
        manager.flush()

    for records, orders, mark_clock in _segments(workdir / "exceptions.bin"):
        for start in range(0, len(records), SOURCE_BATCH):
            batch = records[start:start + SOURCE_BATCH]
            for _tag, _p, when, _key, value in batch:
                clock[0] = max(clock[0], when)
                record = codec.decode(value)
                new = record["exception_id"] not in manager.states
                manager.on_exception_record(value)
                if new:
                    opened += 1
                    state = manager.states.get(record["exception_id"])
                    owner = state["owner"] if state else "ops"
                    for at, event in _lifecycle(record["exception_id"], when, owner, rng):
                        tie += 1
                        heapq.heappush(due, (at, tie, event))
            advance(clock[0])
        advance(mark_clock)
        manager.observe(clock[0])
        facts.mark(orders, clock[0])
        emit.progress(orders)
        if orders in wanted:
            states = manager.states
            lru = getattr(states, "_lru", {})
            emit.point(orders, [lru, states.pending, manager.early, manager._state_offsets], {
                "cached states": len(lru), "early events": len(manager.early)},
                {"exceptions opened": opened, "state rows": model.state_count(),
                 "scheduled operator events": len(due)})
    facts.close()
    model.close()


# -- the auditor -----------------------------------------------------------------------------
def child_auditor(workdir: Path, sizes: Sequence[int], seed: int, emit: _Emitter,
                 cap: int | None = None) -> None:
    import sqlalchemy as sa

    from revline.core.settings import Settings
    from revline.sinks.ledger._schema import audit_heads, audit_records
    from revline.streams.audit import HEAD_CACHE_SIZE, Chainer

    settings = Settings(state_dir=workdir / "auditor-state", input_partitions=PARTITIONS)
    model = _read_model(workdir, "auditor")
    chainer = Chainer(settings, BOOTSTRAP, read_model=model,
                      head_cache_size=HEAD_CACHE_SIZE if cap is None else cap)
    chainer.consumer.close()
    producer = _Producer()

    class GroupConsumer:
        def consumer_group_metadata(self) -> None:
            return None

    chainer.producer = producer  # type: ignore[assignment]
    chainer.consumer = GroupConsumer()  # type: ignore[assignment]
    wanted = set(sizes)
    offsets: dict[tuple[str, int], int] = {}
    emit.send(baseline_rss_kb=_status_kb("VmRSS"))

    def messages(topic: str, records: list[Item]) -> Iterator[_Msg]:
        for _tag, p, when, key, value in records:
            offset = offsets.get((topic, p), 0)
            offsets[topic, p] = offset + 1
            yield _Msg(topic, p, offset, key or None, value, when)

    outcome_segments = _segments(workdir / "outcomes.bin")
    for facts, orders, _ in _segments(workdir / "facts.bin"):
        outcomes, outcome_orders, _ = next(outcome_segments)
        assert outcome_orders == orders, (outcome_orders, orders)
        for topic, records in ((settings.outcomes_topic, outcomes),
                               (settings.audit_facts_topic, facts)):
            msgs = list(messages(topic, records))
            for start in range(0, len(msgs), SOURCE_BATCH):
                chainer._chain_batch(msgs[start:start + SOURCE_BATCH])  # type: ignore[arg-type]
        emit.progress(orders)
        if orders in wanted:
            with model.read() as conn:
                chains = conn.execute(sa.select(sa.func.count()).select_from(audit_heads)
                                      ).scalar_one()
                chained = conn.execute(sa.select(sa.func.count()).select_from(audit_records)
                                       ).scalar_one()
            emit.point(orders, [chainer.heads._lru], {"cached heads": len(chainer.heads)},
                       {"chains": int(chains), "audit records": int(chained)})
    model.close()


CHILDREN: dict[str, Callable[[Path, Sequence[int], int, _Emitter, int | None], None]] = {
    "worker": child_worker, "exceptions": child_exceptions, "auditor": child_auditor}


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m revline.tools.memory_bench")
    parser.add_argument("component", choices=COMPONENTS)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("sizes")
    parser.add_argument("--seed", type=int, default=20)
    parser.add_argument("--cap", type=int)
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.CRITICAL)
    sizes = sorted({int(s) for s in args.sizes.split(",")})
    CHILDREN[args.component](args.workdir, sizes, args.seed, _Emitter(), args.cap)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
