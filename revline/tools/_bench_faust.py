"""A bare Faust per-event passthrough: the baseline ``revline bench`` holds the pipeline to.

Configured by the environment, because the benchmark runs it as a worker
subprocess (``python -m revline.tools._bench_faust worker --without-web -l warn``) with a unique app
id per run. Settings mirror the pipeline's Faust app where they apply (memory
store, web server off, acks=all, earliest reset) so the comparison is fair.
"""

from __future__ import annotations

import os
from typing import Any

import faust

from revline.core.kafka_config import faust_broker_credentials


def _env(name: str) -> str:
    return os.environ[f"REVLINE_BENCH_{name}"]


app = faust.App(
    _env("APP_ID"),
    broker=f"kafka://{_env('BOOTSTRAP')}",
    broker_credentials=faust_broker_credentials(),
    store="memory://",
    datadir=_env("DATADIR"),
    # The `worker` command turns the web server back on unless given --without-web;
    # if it still starts, it must not listen beyond this machine.
    web_enabled=False,
    web_bind="127.0.0.1",
    # No leader election topic: one worker, and one topic less to create per run.
    topic_disable_leader=True,
    topic_partitions=int(_env("PARTITIONS")),
    consumer_auto_offset_reset="earliest",
    producer_acks=-1,
    producer_linger_ms=5,
    stream_wait_empty=False,
)
source = app.topic(
    _env("INPUT"), key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
)
sink = app.topic(
    _env("OUTPUT"), key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
)


async def passthrough(stream: Any) -> None:
    async for event in stream.events():
        await sink.send(key=event.key, value=event.value)


# Registered by call, not decorator: faust is untyped and mypy --strict rejects
# untyped decorators.
app.agent(source, name="passthrough")(passthrough)

if __name__ == "__main__":
    app.main()
