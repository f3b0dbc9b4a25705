"""The Schema Registry path against a real registry: a local Apicurio Registry
(Confluent-compatible API, basic auth on), not confluent-kafka's ``mock://`` double."""

from __future__ import annotations

import json
import shutil
import stat
import uuid
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.schema_registry import Schema
from confluent_kafka.schema_registry.error import SchemaRegistryError

from revline.cli import deserializer_for, main
from revline.core.kafka_config import registry_config
from revline.core.readback import read_topic
from revline.core.settings import Settings
from revline.schemas import (
    DecodeError,
    EventDeserializer,
    EventSerializer,
    SchemaCatalog,
    default_catalog,
)
from revline.schemas import registry_client as make_client
from revline.schemas._catalog import AVRO_ROOT
from revline.schemas._compat import compatibility_problems, example_value
from revline.tools.registry_server import LocalRegistry
from revline.tools.workload import WorkloadOptions, generate
from tests.registry_fixture import local_registry

__all__ = ["local_registry"]  # the session fixture, imported to be found here

SUBJECT = "revline.events.OrderCancelled"  # record-name strategy: the record's full name


@pytest.fixture
def registry_env(local_registry: LocalRegistry, monkeypatch: pytest.MonkeyPatch
                 ) -> dict[str, str]:
    """The process's settings point at the test registry (URL and basic auth)."""
    env = local_registry.env()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def _client(local_registry: LocalRegistry, **override: str) -> Any:
    return make_client({**local_registry.client_config(), **override})


def _event(catalog: SchemaCatalog, event_type: str, version: int | None = None
           ) -> dict[str, Any]:
    entry = catalog.get(event_type, version) if version else catalog.latest(event_type)
    assert entry is not None
    event = example_value(entry.schema)
    event["envelope"]["event_type"] = event_type
    event["envelope"]["schema_version"] = entry.version
    return dict(event)


def _catalog_with_v2(tmp_path: Path, change: str) -> SchemaCatalog:
    """The real catalog plus an OrderCancelled v2: ``add-optional`` (compatible both ways),
    ``add-required`` (not backward) or ``drop-reason`` (backward only)."""
    root = tmp_path / change
    shutil.copytree(AVRO_ROOT, root)
    (root / "v2").mkdir()
    for shared in ("Envelope.avsc", "Line.avsc"):
        shutil.copy(root / "v1" / shared, root / "v2" / shared)
    schema = json.loads((root / "v1" / "OrderCancelled.avsc").read_text())
    if change == "add-optional":
        schema["fields"].append({"name": "cancelled_by", "type": ["null", "string"],
                                 "default": None})
    elif change == "add-required":
        schema["fields"].append({"name": "cancelled_by", "type": "string"})
    else:
        schema["fields"] = [f for f in schema["fields"] if f["name"] != "reason"]
    (root / "v2" / "OrderCancelled.avsc").write_text(json.dumps(schema))
    return SchemaCatalog.load(root)


def test_the_registry_runs_keeps_its_schemas_across_a_restart_and_stops_cleanly(
    local_registry: LocalRegistry,
) -> None:
    url = local_registry.status()
    assert url is not None and url.endswith("/apis/ccompat/v7") and url.startswith(
        "http://127.0.0.1:")
    client = _client(local_registry)
    assert client.get_compatibility() == "FULL"  # Revline's policy, not Apicurio's NONE
    subject = f"lifecycle-{uuid.uuid4().hex[:8]}"
    entry = default_catalog().latest("order_cancelled")
    assert entry is not None
    schema_id = client.register_schema(subject, Schema(entry.schema_str, "AVRO"))

    pid = int(local_registry.pid_file.read_text())
    assert local_registry.stop() is True
    assert local_registry.status() is None and not local_registry.pid_file.exists()
    assert not Path(f"/proc/{pid}").exists()  # exited and reaped: no zombie left
    assert local_registry.stop() is False
    assert local_registry.start(timeout=120) == url  # same port, same storage
    # A new client: nothing cached. Ids stay valid for records already in Kafka.
    again = _client(local_registry).get_schema(schema_id)
    assert json.loads(again.schema_str) == json.loads(entry.schema_str)
    assert local_registry.start() == url  # already running: no second JVM
    assert int(local_registry.pid_file.read_text()) != pid

    # The password is only in the owner-only files, never in the registry's log.
    password = (local_registry.user_info or "").partition(":")[2]
    assert len(password) >= 20
    assert password not in local_registry.log_file.read_text()
    for private in (local_registry.client_env, local_registry.config_file,
                    local_registry.password_file):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private


@pytest.mark.kafka
def test_cli_publish_frames_with_registry_ids_and_the_decoder_reads_them_back(
    registry_env: dict[str, str], local_registry: LocalRegistry, kafka_bootstrap: str,
    new_topic: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap)
    topic = new_topic("registry")
    workload = generate(WorkloadOptions(orders=40, seed=3, poison=0.0, duplicates=0.0))
    events = [r.event for r in workload.records if r.event is not None]
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(workload.json_lines()) + "\n")

    assert main(["publish", str(path), "--topic", topic]) == 0, capsys.readouterr().err
    landed = list(read_topic(kafka_bootstrap, topic))
    assert len(landed) == len(events)

    # Confluent framing: 00 + the id the registry holds under the record-name subject.
    client = _client(local_registry)
    ids = {}
    for entry in default_catalog():
        if any(e["envelope"]["event_type"] == entry.event_type for e in events):
            ids[client.get_latest_version(entry.full_name).schema_id] = entry.event_type
    for msg in landed:
        value = msg.value()
        assert value[:1] == b"\x00"
        assert int.from_bytes(value[1:5], "big") in ids

    # The decoder the sink and readback use, built from the same settings; a fresh client
    # that has to fetch every id from the registry.
    decoder = deserializer_for(Settings())
    assert isinstance(decoder, EventDeserializer) and decoder.registry is not None
    by_id = {e["envelope"]["event_id"]: e for e in events}
    assert len(by_id) == len(events)
    decoded = [decoder.decode(m.value()) for m in landed]
    assert sorted(e["envelope"]["event_id"] for e in decoded) == sorted(by_id)
    for event in decoded:
        assert event == by_id[event["envelope"]["event_id"]]


def test_the_compatibility_gate_refuses_an_incompatible_change(
    local_registry: LocalRegistry, tmp_path: Path,
) -> None:
    client = _client(local_registry)
    v1 = default_catalog().get("order_cancelled", 1)
    assert v1 is not None
    # Through the serializer: v1 registers under its record-name subject.
    v1_data = EventSerializer(registry=client)(_event(default_catalog(), "order_cancelled", 1))
    v1_id = int.from_bytes(v1_data[1:5], "big")

    # A required field without a default breaks backward compatibility. The project's
    # own gate and the registry's agree, and the serializer cannot register it.
    required = _catalog_with_v2(tmp_path, "add-required")
    assert compatibility_problems(required)
    v2 = required.get("order_cancelled", 2)
    assert v2 is not None
    assert client.test_compatibility(SUBJECT, Schema(v2.schema_str, "AVRO")) is False
    with pytest.raises(SchemaRegistryError) as refused:
        EventSerializer(required, registry=client)(_event(required, "order_cancelled", 2))
    assert refused.value.http_status_code == 409
    assert "Incompatible" in str(refused.value)
    assert client.get_latest_version(SUBJECT).schema_id == v1_id  # nothing registered

    # Per-subject config (PUT /config/{subject}) on a subject of its own: dropping a
    # field without a default is backward- but not forward-compatible, so BACKWARD lets
    # it through and FULL (Revline's policy) refuses it, as schemas/_compat.py does.
    dropped = _catalog_with_v2(tmp_path, "drop-reason").get("order_cancelled", 2)
    assert dropped is not None
    assert compatibility_problems(_catalog_with_v2(tmp_path / "x", "drop-reason"))
    subject = f"{SUBJECT}-{uuid.uuid4().hex[:8]}"
    client.register_schema(subject, Schema(v1.schema_str, "AVRO"))
    client.set_compatibility(subject, "FULL")
    assert client.get_compatibility(subject) == "FULL"
    assert client.test_compatibility(subject, Schema(dropped.schema_str, "AVRO")) is False
    client.set_compatibility(subject, "BACKWARD")
    assert client.get_compatibility(subject) == "BACKWARD"
    assert client.test_compatibility(subject, Schema(dropped.schema_str, "AVRO")) is True

    # A compatible evolution (an optional field with a default) is accepted under FULL,
    # and v1 records read through the registry resolve to the v2 shape.
    optional = _catalog_with_v2(tmp_path, "add-optional")
    assert compatibility_problems(optional) == []
    client.set_compatibility(subject, "FULL")
    v2_ok = optional.get("order_cancelled", 2)
    assert v2_ok is not None
    assert client.test_compatibility(subject, Schema(v2_ok.schema_str, "AVRO")) is True
    v2_id = client.register_schema(subject, Schema(v2_ok.schema_str, "AVRO"))
    assert v2_id != v1_id
    decoded = EventDeserializer(optional, registry=_client(local_registry)).decode(v1_data)
    assert decoded["cancelled_by"] is None and decoded["reason"] == "example"


@pytest.mark.kafka
def test_basic_auth_from_the_settings_and_a_wrong_password_is_a_clear_error(
    registry_env: dict[str, str], local_registry: LocalRegistry, tmp_path: Path,
    kafka_bootstrap: str, new_topic: Any,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    # registry_config() builds the client's basic auth from the settings.
    config = registry_config(Settings())
    assert config == local_registry.client_config()
    assert config["basic.auth.user.info"] == registry_env["SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO"]
    event = _event(default_catalog(), "payment_captured")
    data = EventSerializer(registry=make_client(config))(event)
    assert EventDeserializer(registry=make_client(config)).decode(data) == event

    # Without credentials, or with a wrong password, the registry answers 401.
    for conf in ({"url": config["url"]},
                 {**config, "basic.auth.user.info": "revline:wrong-password"}):
        with pytest.raises(SchemaRegistryError) as refused:
            make_client(conf).get_subjects()
        assert refused.value.http_status_code == 401

    # The CLI with a wrong password: one error line, no traceback, the password unshown.
    monkeypatch.setenv("SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO", "revline:wrong-password")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap)
    topic = new_topic("registry-auth")
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(event, default=str) + "\n")
    code = main(["publish", str(path), "--topic", topic])
    err = capsys.readouterr().err
    assert code != 0
    assert "Traceback" not in err and "wrong-password" not in err
    assert "401" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.kafka
def test_a_refused_registry_password_names_the_setting(
    registry_env: dict[str, str], kafka_bootstrap: str, new_topic: Any, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO", "revline:wrong-password")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap)
    path = tmp_path / "one.jsonl"
    event = _event(default_catalog(), "payment_captured")
    path.write_text(json.dumps(event, default=str) + "\n")
    assert main(["publish", str(path), "--topic", new_topic("registry-auth")]) != 0
    assert "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO" in capsys.readouterr().err


def test_a_decoder_with_a_wrong_password_does_not_dead_letter_good_records(
    local_registry: LocalRegistry,
) -> None:
    event = _event(default_catalog(), "order_booked")
    data = EventSerializer(registry=_client(local_registry))(event)
    bad = _client(local_registry, **{"basic.auth.user.info": "revline:wrong-password"})
    with pytest.raises(Exception) as failed:
        EventDeserializer(registry=bad).decode(data)
    assert not isinstance(failed.value, DecodeError), failed.value


@pytest.mark.kafka
def test_the_worker_decodes_confluent_framed_records_with_the_registry(
    registry_env: dict[str, str], local_registry: LocalRegistry, kafka_bootstrap: str,
) -> None:
    from confluent_kafka import Consumer

    from revline.core.metrics import Metrics
    from revline.streams.app import Worker

    event = _event(default_catalog(), "invoice_issued")
    data = EventSerializer(registry=_client(local_registry))(event)
    worker = Worker(Settings(), kafka_bootstrap, Metrics())
    try:
        assert worker.engine.deserializer.decode(data) == event
    finally:
        for client in vars(worker).values():
            if isinstance(client, Consumer):
                client.close()
