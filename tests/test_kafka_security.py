"""Security settings for every client: the mapping to librdkafka, Faust (aiokafka) and the
Schema Registry client, their validation, secrets kept out of every message, librdkafka's
log through Python logging, and a scan that no client is built around the builder."""

from __future__ import annotations

import ast
import datetime as dt
import logging
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from revline.core.errors import ConfigurationError
from revline.core.kafka_config import (
    client_config,
    consumer_config,
    faust_broker_credentials,
    producer_config,
    redacted,
    registry_config,
    ssl_context,
    validate,
)
from revline.core.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "pa55-W0rd-never-shown"
SECRET_USER_INFO = "registry-key:registry-SECRET-never-shown"

_SECURITY_VARS = (
    "KAFKA_SECURITY_PROTOCOL", "KAFKA_SASL_MECHANISM", "KAFKA_SASL_USERNAME",
    "KAFKA_SASL_PASSWORD", "KAFKA_SASL_PASSWORD_FILE", "KAFKA_SSL_CA_LOCATION",
    "KAFKA_SSL_CERTIFICATE_LOCATION", "KAFKA_SSL_KEY_LOCATION", "KAFKA_SSL_KEY_PASSWORD",
    "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO", "SCHEMA_REGISTRY_SSL_CA_LOCATION",
    "SCHEMA_REGISTRY_URL", "KAFKA_BOOTSTRAP_SERVERS",
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _SECURITY_VARS:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(f"REVLINE_{name}", raising=False)
    monkeypatch.delenv("REVLINE_KAFKA_CONFIG_FILE", raising=False)


def settings(monkeypatch: pytest.MonkeyPatch, **env: str | Path) -> Settings:
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    s = Settings()
    validate(s)  # as the command line does once it has read the settings
    return s


# -- a private CA and certificates (PEM), as a self-managed cluster has ----------------
def _key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key: Any, issuer: str, issuer_key: Any, *, ca: bool) -> Any:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False), critical=True)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """ca.pem; client.pem with client.key (plain) and client-enc.key (password PASSWORD)."""
    from cryptography.hazmat.primitives import serialization

    d = tmp_path_factory.mktemp("pki")
    ca_key = _key()
    ca = _cert("Revline test CA", ca_key, "Revline test CA", ca_key, ca=True)
    client_key = _key()
    client = _cert("revline", client_key, "Revline test CA", ca_key, ca=False)
    pem = serialization.Encoding.PEM
    (d / "ca.pem").write_bytes(ca.public_bytes(pem))
    (d / "client.pem").write_bytes(client.public_bytes(pem))
    (d / "client.key").write_bytes(client_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (d / "client-enc.key").write_bytes(client_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(PASSWORD.encode())))
    return {name: d / name for name in ("ca.pem", "client.pem", "client.key", "client-enc.key")}


# -- each variable -> its librdkafka property ------------------------------------------
def test_plaintext_by_default_adds_only_the_logger(monkeypatch: pytest.MonkeyPatch) -> None:
    config = client_config("consumer", "b:9092", {"group.id": "g"},
                           settings=settings(monkeypatch), component="sinks")
    assert config.pop("logger").name == "revline.sinks.kafka"
    assert config == {"bootstrap.servers": "b:9092", "group.id": "g"}


def test_each_variable_maps_to_its_property(monkeypatch: pytest.MonkeyPatch,
                                            pki: dict[str, Path]) -> None:
    s = settings(monkeypatch, KAFKA_SECURITY_PROTOCOL="sasl_ssl",
                 KAFKA_SASL_MECHANISM="scram-sha-512", KAFKA_SASL_USERNAME="revline",
                 KAFKA_SASL_PASSWORD=PASSWORD, KAFKA_SSL_CA_LOCATION=pki["ca.pem"],
                 KAFKA_SSL_CERTIFICATE_LOCATION=pki["client.pem"],
                 KAFKA_SSL_KEY_LOCATION=pki["client-enc.key"], KAFKA_SSL_KEY_PASSWORD=PASSWORD)
    config = client_config("producer", "b:9093", settings=s)
    assert {k: v for k, v in config.items() if k != "logger"} == {
        "bootstrap.servers": "b:9093",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "revline",
        "sasl.password": PASSWORD,
        "ssl.ca.location": str(pki["ca.pem"]),
        "ssl.certificate.location": str(pki["client.pem"]),
        "ssl.key.location": str(pki["client-enc.key"]),
        "ssl.key.password": PASSWORD,
    }


def test_settings_presets_carry_the_security_too(monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings(monkeypatch, KAFKA_SECURITY_PROTOCOL="SASL_PLAINTEXT",
                 KAFKA_SASL_MECHANISM="PLAIN", KAFKA_SASL_USERNAME="u",
                 KAFKA_SASL_PASSWORD=PASSWORD)
    producer = producer_config(s, "b:1", component="worker")
    consumer = consumer_config(s, "b:1", "grp")
    for config in (producer, consumer):
        assert config["sasl.password"] == PASSWORD
        assert config["security.protocol"] == "SASL_PLAINTEXT"
    assert producer["enable.idempotence"] is True and producer["acks"] == "all"
    assert consumer["isolation.level"] == "read_committed" and consumer["group.id"] == "grp"
    assert producer["logger"].name == "revline.worker.kafka"


def test_helpers_without_settings_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    settings(monkeypatch, KAFKA_SECURITY_PROTOCOL="SASL_SSL", KAFKA_SASL_MECHANISM="PLAIN",
             KAFKA_SASL_USERNAME="key", KAFKA_SASL_PASSWORD=PASSWORD)
    assert client_config("admin", "b:1")["sasl.username"] == "key"


def test_password_file_is_read_at_each_client_start(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")
    s = settings(monkeypatch, KAFKA_SECURITY_PROTOCOL="SASL_SSL",
                 KAFKA_SASL_MECHANISM="SCRAM-SHA-256", KAFKA_SASL_USERNAME="u",
                 KAFKA_SASL_PASSWORD_FILE=secret)
    assert client_config("admin", "b:1", settings=s)["sasl.password"] == PASSWORD
    secret.write_text("rotated")
    assert client_config("admin", "b:1", settings=s)["sasl.password"] == "rotated"


def test_properties_file_is_merged_under_the_variables(monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    props = tmp_path / "client.properties"
    props.write_text(
        "# Confluent-style client.properties\n"
        "bootstrap.servers=pkc-1.example:9092\n"
        "security.protocol=SASL_SSL\n"
        "sasl.mechanisms=PLAIN\n"
        "sasl.username=file-user\n"
        "sasl.password=file-password\n"
        "session.timeout.ms=45000\n"
        "producer.linger.ms=20\n"
        "consumer.fetch.max.bytes=1048576\n"
        "schema.registry.url=https://sr.example\n"
        "basic.auth.credentials.source=USER_INFO\n"
        "basic.auth.user.info=file-key:file-secret\n"
        "\n! another comment\n"
    )
    s = settings(monkeypatch, REVLINE_KAFKA_CONFIG_FILE=props,
                 KAFKA_BOOTSTRAP_SERVERS="pkc-1.example:9092",
                 SCHEMA_REGISTRY_URL="https://sr.example", KAFKA_SASL_USERNAME="env-user")
    producer = producer_config(s, "pkc-1.example:9092")
    consumer = client_config("consumer", "pkc-1.example:9092", {"group.id": "g"}, settings=s)
    for config in (producer, consumer):
        assert config["security.protocol"] == "SASL_SSL"
        assert config["sasl.mechanism"] == "PLAIN" and "sasl.mechanisms" not in config
        assert config["sasl.username"] == "env-user"  # the variable wins over the file
        assert config["sasl.password"] == "file-password"
        assert config["session.timeout.ms"] == "45000"
        assert not any(k.startswith(("schema.registry", "basic.auth")) for k in config)
    assert producer["linger.ms"] == "20"  # the file's tuning over Revline's default
    assert "linger.ms" not in consumer and consumer["fetch.max.bytes"] == "1048576"
    assert "fetch.max.bytes" not in producer
    assert registry_config(s) == {"url": "https://sr.example",
                                  "basic.auth.user.info": "file-key:file-secret"}


@pytest.mark.parametrize("line", ["acks=1", "enable.idempotence=false",
                                  "isolation.level=read_uncommitted", "group.id=x",
                                  "producer.transactional.id=t"])
def test_properties_file_may_not_void_the_guarantees(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path, line: str) -> None:
    props = tmp_path / "p.properties"
    props.write_text(line + "\n")
    with pytest.raises(ConfigurationError, match="Revline sets itself"):
        settings(monkeypatch, REVLINE_KAFKA_CONFIG_FILE=props)


def test_properties_file_errors_name_the_line_not_its_text(monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: Path) -> None:
    props = tmp_path / "p.properties"
    props.write_text(f"security.protocol=SASL_SSL\nsasl.password {PASSWORD}\n")
    with pytest.raises(ConfigurationError) as caught:
        settings(monkeypatch, REVLINE_KAFKA_CONFIG_FILE=props)
    assert "line 2" in str(caught.value) and PASSWORD not in str(caught.value)
    with pytest.raises(ConfigurationError, match="does not exist"):
        settings(monkeypatch, REVLINE_KAFKA_CONFIG_FILE=tmp_path / "missing.properties")
    props.write_text("bootstrap.servers=elsewhere:9092\n")
    with pytest.raises(ConfigurationError, match="KAFKA_BOOTSTRAP_SERVERS"):
        settings(monkeypatch, REVLINE_KAFKA_CONFIG_FILE=props)


def test_call_sites_cannot_set_security_themselves(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="belong to the settings"):
        client_config("admin", "b:1", {"security.protocol": "PLAINTEXT"},
                      settings=settings(monkeypatch))


# -- validation: one error naming the variable -----------------------------------------
@pytest.mark.parametrize(("env", "named"), [
    ({"KAFKA_SASL_MECHANISM": "GSSAPI"}, "KAFKA_SASL_MECHANISM=GSSAPI is not supported"),
    ({"KAFKA_SECURITY_PROTOCOL": "TLS"}, "KAFKA_SECURITY_PROTOCOL=TLS is not supported"),
    ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "KAFKA_SASL_MECHANISM is required"),
    ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "PLAIN",
      "KAFKA_SASL_PASSWORD": PASSWORD}, "KAFKA_SASL_USERNAME is required"),
    ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "PLAIN",
      "KAFKA_SASL_USERNAME": "u"}, "KAFKA_SASL_PASSWORD or KAFKA_SASL_PASSWORD_FILE is required"),
    ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "PLAIN",
      "KAFKA_SASL_USERNAME": "u", "KAFKA_SASL_PASSWORD_FILE": "/nonexistent/password"},
     "KAFKA_SASL_PASSWORD_FILE /nonexistent/password does not exist"),
    ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "PLAIN",
      "KAFKA_SASL_USERNAME": "u", "KAFKA_SASL_PASSWORD": PASSWORD,
      "KAFKA_SASL_PASSWORD_FILE": "/etc/hostname"}, "both set"),
    ({"KAFKA_SASL_USERNAME": "u", "KAFKA_SASL_PASSWORD": PASSWORD},
     "KAFKA_SASL_USERNAME is set but KAFKA_SECURITY_PROTOCOL is PLAINTEXT"),
    ({"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CA_LOCATION": "/nonexistent/ca.pem"},
     "KAFKA_SSL_CA_LOCATION /nonexistent/ca.pem does not exist"),
    ({"KAFKA_SSL_CA_LOCATION": "/etc/hostname"}, "KAFKA_SSL_CA_LOCATION is set but"),
    ({"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CERTIFICATE_LOCATION": "/etc/hostname"},
     "go together"),
    ({"SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO": SECRET_USER_INFO},
     "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO is set but SCHEMA_REGISTRY_URL is not"),
    ({"SCHEMA_REGISTRY_URL": "https://sr", "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO": PASSWORD},
     "must be <key>:<secret>"),
])
def test_invalid_settings_fail_with_one_clear_error(monkeypatch: pytest.MonkeyPatch,
                                                    env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        settings(monkeypatch, **env)
    message = str(caught.value)
    assert named in message
    assert PASSWORD not in message and "SECRET" not in message


def test_cli_reports_a_bad_setting_as_one_line(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from revline.cli import main

    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", PASSWORD)
    assert main(["broker", "status"]) == 2
    err = capsys.readouterr().err
    assert "KAFKA_SASL_USERNAME is required" in err and PASSWORD not in err
    assert len(err.strip().splitlines()) <= 2


# -- secrets never shown ---------------------------------------------------------------
def test_secrets_are_not_in_repr_dump_or_help(monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from revline.cli import main

    s = settings(monkeypatch, KAFKA_BOOTSTRAP_SERVERS="b:1", KAFKA_SECURITY_PROTOCOL="SASL_SSL",
                 KAFKA_SASL_MECHANISM="PLAIN", KAFKA_SASL_USERNAME="u",
                 KAFKA_SASL_PASSWORD=PASSWORD, KAFKA_SSL_KEY_PASSWORD=PASSWORD,
                 SCHEMA_REGISTRY_URL="https://sr",
                 SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO=SECRET_USER_INFO)
    shown = [repr(s), str(s), s.model_dump_json(), str(s.model_dump())]
    shown.append(str(redacted(client_config("producer", "b:1", settings=s))))
    shown.append(str(redacted(registry_config(s) or {})))
    credentials = faust_broker_credentials(s)
    shown.append(repr(credentials))
    for text in shown:
        assert PASSWORD not in text and "SECRET" not in text, text
    for argv in (["--help"], ["run", "--help"], ["worker", "--help"], ["sink", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        out = capsys.readouterr()
        assert PASSWORD not in out.out + out.err and "SECRET" not in out.out + out.err


# -- Faust (aiokafka) ------------------------------------------------------------------
def _aiokafka(credentials: Any) -> dict[str, Any]:
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    return dict(credentials_to_aiokafka_auth(credentials))


def test_faust_gets_sasl_ssl_with_a_context_trusting_the_ca(monkeypatch: pytest.MonkeyPatch,
                                                            pki: dict[str, Path]) -> None:
    s = settings(monkeypatch, KAFKA_SECURITY_PROTOCOL="SASL_SSL",
                 KAFKA_SASL_MECHANISM="SCRAM-SHA-512", KAFKA_SASL_USERNAME="revline",
                 KAFKA_SASL_PASSWORD=PASSWORD, KAFKA_SSL_CA_LOCATION=pki["ca.pem"])
    auth = _aiokafka(faust_broker_credentials(s))
    assert auth["security_protocol"] == "SASL_SSL"
    assert auth["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (auth["sasl_plain_username"], auth["sasl_plain_password"]) == ("revline", PASSWORD)
    context = auth["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    assert "Revline test CA" in str(context.get_ca_certs())


def test_faust_gets_mutual_tls(monkeypatch: pytest.MonkeyPatch, pki: dict[str, Path]) -> None:
    s = settings(monkeypatch, KAFKA_SECURITY_PROTOCOL="SSL", KAFKA_SSL_CA_LOCATION=pki["ca.pem"],
                 KAFKA_SSL_CERTIFICATE_LOCATION=pki["client.pem"],
                 KAFKA_SSL_KEY_LOCATION=pki["client-enc.key"], KAFKA_SSL_KEY_PASSWORD=PASSWORD)
    auth = _aiokafka(faust_broker_credentials(s))
    assert auth["security_protocol"] == "SSL"
    assert isinstance(auth["ssl_context"], ssl.SSLContext)
    # A wrong key password is a clear error, without the password.
    monkeypatch.setenv("KAFKA_SSL_KEY_PASSWORD", "wrong")
    with pytest.raises(ConfigurationError, match="KAFKA_SSL_KEY_PASSWORD") as caught:
        faust_broker_credentials(Settings())
    assert "wrong" not in str(caught.value).replace("wrong?", "")


def test_faust_plaintext_and_unsupported(monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path) -> None:
    assert faust_broker_credentials(settings(monkeypatch)) is None
    props = tmp_path / "oauth.properties"
    props.write_text("security.protocol=SASL_SSL\nsasl.mechanism=OAUTHBEARER\n"
                     "sasl.oauthbearer.method=oidc\n")
    s = settings(monkeypatch, REVLINE_KAFKA_CONFIG_FILE=props)
    assert client_config("admin", "b:1", settings=s)["sasl.mechanism"] == "OAUTHBEARER"
    with pytest.raises(ConfigurationError, match="Faust"):
        faust_broker_credentials(s)


def test_ssl_context_follows_librdkafka_switches(pki: dict[str, Path]) -> None:
    ca = str(pki["ca.pem"])
    assert not ssl_context({"ssl.ca.location": ca,
                            "ssl.endpoint.identification.algorithm": "none"}).check_hostname
    off = ssl_context({"enable.ssl.certificate.verification": "false"})
    assert off.verify_mode == ssl.CERT_NONE


def test_the_worker_app_is_built_with_the_credentials(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path,
                                                      pki: dict[str, Path]) -> None:
    from revline.core.metrics import Metrics
    from revline.streams.app import Worker

    s = settings(monkeypatch, KAFKA_SECURITY_PROTOCOL="SASL_SSL",
                 KAFKA_SASL_MECHANISM="SCRAM-SHA-512", KAFKA_SASL_USERNAME="revline",
                 KAFKA_SASL_PASSWORD=PASSWORD, KAFKA_SSL_CA_LOCATION=pki["ca.pem"],
                 REVLINE_STATE_DIR=tmp_path, REVLINE_METRICS_PORT="0")
    worker = Worker(s, "127.0.0.1:1", Metrics())
    credentials = worker.app.conf.broker_credentials
    assert _aiokafka(credentials)["sasl_plain_password"] == PASSWORD


# -- Schema Registry -------------------------------------------------------------------
def test_registry_config_and_client(monkeypatch: pytest.MonkeyPatch,
                                    pki: dict[str, Path]) -> None:
    from revline.schemas import registry_client

    assert registry_config(settings(monkeypatch)) is None
    s = settings(monkeypatch, SCHEMA_REGISTRY_URL="https://sr.example:8081",
                 SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO=SECRET_USER_INFO,
                 SCHEMA_REGISTRY_SSL_CA_LOCATION=pki["ca.pem"])
    config = registry_config(s)
    assert config == {"url": "https://sr.example:8081",
                      "basic.auth.user.info": SECRET_USER_INFO,
                      "ssl.ca.location": str(pki["ca.pem"])}
    client = registry_client(config)
    rest = client._rest_client
    assert rest.auth == tuple(SECRET_USER_INFO.split(":", 1))
    assert isinstance(rest.verify, ssl.SSLContext)


# -- librdkafka's log through Python logging (issue 19) ---------------------------------
def test_librdkafka_log_goes_to_the_components_logger(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        capfd: pytest.CaptureFixture[str]) -> None:
    from confluent_kafka import Producer

    caplog.set_level(logging.INFO, logger="revline.sinks.kafka")
    producer = Producer(client_config("producer", "127.0.0.1:1", settings=settings(monkeypatch),
                                      component="sinks"))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not caplog.records:
        producer.poll(0.2)
    assert any(r.name == "revline.sinks.kafka" and "127.0.0.1:1" in r.getMessage()
               for r in caplog.records)
    assert "%3|" not in capfd.readouterr().err  # no raw librdkafka line on stderr


# -- no client bypasses the builder ----------------------------------------------------
CLIENTS = {"Producer", "Consumer", "AdminClient", "SchemaRegistryClient"}
BUILDERS = {"client_config", "producer_config", "consumer_config", "registry_config"}
SCANNED = ("revline", "streams", "sinks", "schemas", "processors")


def _name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _assignments(scope: ast.AST, name: str) -> list[ast.expr]:
    values: list[ast.expr] = []
    for node in ast.walk(scope):
        if isinstance(node, ast.Assign):
            if any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
                values.append(node.value)
        elif (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
              and node.target.id == name and node.value is not None):
            values.append(node.value)
    return values


def _built(expr: ast.expr, scope: ast.AST, seen: frozenset[str] = frozenset()) -> bool:
    """Whether ``expr`` is the builder's output (or that output plus the call site's keys)."""
    if isinstance(expr, ast.Call):
        return _name(expr.func) in BUILDERS
    if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.BitOr):
        return _built(expr.left, scope, seen)
    if isinstance(expr, ast.Dict):  # {**builder(...), "on_delivery": ...}
        return bool(expr.keys) and expr.keys[0] is None and _built(expr.values[0], scope, seen)
    if isinstance(expr, ast.Name) and expr.id not in seen:
        values = _assignments(scope, expr.id)
        return bool(values) and all(_built(v, scope, seen | {expr.id}) for v in values)
    if (isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Name)
            and expr.value.id == "self" and f"self.{expr.attr}" not in seen):
        # A config kept on the instance (a replaced producer reuses it): every
        # ``self.<attr> = ...`` in the class must be the builder's output.
        methods = _methods_of_class_around(scope)
        found = [(v, m) for m in methods for v in _self_assignments(m, expr.attr)]
        return bool(found) and all(
            _built(v, m, seen | {f"self.{expr.attr}"}) for v, m in found)
    return False


_PARENT: dict[ast.AST, ast.AST] = {}  # filled by client_calls: node -> its parent


def _methods_of_class_around(scope: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    node: ast.AST | None = scope
    while node is not None and not isinstance(node, ast.ClassDef):
        node = _PARENT.get(node)
    if node is None:
        return []
    return [m for m in node.body if isinstance(m, ast.FunctionDef | ast.AsyncFunctionDef)]


def _self_assignments(method: ast.AST, attr: str) -> list[ast.expr]:
    return [node.value for node in ast.walk(method) if isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Attribute) and t.attr == attr
                    and isinstance(t.value, ast.Name) and t.value.id == "self"
                    for t in node.targets)]


def client_calls() -> Iterator[tuple[str, ast.Call, ast.AST]]:
    """Every call in the scanned packages, with its nearest enclosing function (or module)."""
    for package in SCANNED:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            parent: dict[ast.AST, ast.AST] = {}
            for node in ast.walk(tree):
                for child in ast.iter_child_nodes(node):
                    parent[child] = node
            _PARENT.update(parent)
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call):
                    continue
                scope: ast.AST = node
                while scope in parent and not isinstance(
                        scope, ast.FunctionDef | ast.AsyncFunctionDef):
                    scope = parent[scope]
                yield f"{path.relative_to(ROOT)}:{node.lineno}", node, scope


def test_every_client_is_built_by_the_builder() -> None:
    found: list[str] = []
    bypassing: list[str] = []
    for where, call, scope in client_calls():
        name = _name(call.func)
        if name == "new_client" and _name(getattr(call.func, "value", call.func)) == \
                "SchemaRegistryClient":
            found.append(where)
            continue  # schemas.registry_client: its callers are checked below
        if name == "registry_client":
            found.append(where)
            if not call.args or not _built(call.args[0], scope):
                bypassing.append(f"{where}: registry_client(...) not from registry_config()")
        elif name == "App" and _name(getattr(call.func, "value", call.func)) == "faust":
            found.append(where)
            credentials = [k for k in call.keywords if k.arg == "broker_credentials"]
            if not credentials or not (isinstance(credentials[0].value, ast.Call) and _name(
                    credentials[0].value.func) == "faust_broker_credentials"):
                bypassing.append(f"{where}: faust.App without faust_broker_credentials()")
        elif name in CLIENTS:
            found.append(where)
            if not call.args or not _built(call.args[0], scope):
                bypassing.append(f"{where}: {name}(...) config not from the builder")
    assert len(found) > 30, found  # the scan sees the clients (it would pass vacuously)
    assert not bypassing, "\n".join(bypassing)


def test_the_scan_catches_a_client_built_by_hand() -> None:
    tree = ast.parse(
        "def f(bootstrap, settings):\n"
        "    a = Producer({'bootstrap.servers': bootstrap})\n"
        "    config = {'bootstrap.servers': bootstrap}\n"
        "    b = Consumer(config)\n"
        "    good = producer_config(settings, bootstrap)\n"
        "    good.update({'linger.ms': 1})\n"
        "    c = Producer(good)\n"
        "    d = Consumer({**consumer_config(settings, bootstrap, 'g'), 'x': 1})\n"
        "    e = AdminClient(client_config('admin', bootstrap) | {'log_level': 3})\n")
    scope = tree.body[0]
    calls = [n for n in ast.walk(scope) if isinstance(n, ast.Call) and _name(n.func) in CLIENTS]
    verdicts = [_built(c.args[0], scope) for c in sorted(calls, key=lambda c: c.lineno)]
    assert verdicts == [False, False, True, True, True]


def test_the_scan_follows_a_config_kept_on_the_instance() -> None:
    tree = ast.parse(
        "class Good:\n"
        "    def __init__(self, settings, bootstrap):\n"
        "        conf = producer_config(settings, bootstrap)\n"
        "        self._conf = conf\n"
        "    def replace(self):\n"
        "        self.producer = Producer(self._conf)\n"
        "class Bad:\n"
        "    def __init__(self, settings, bootstrap):\n"
        "        self._conf = producer_config(settings, bootstrap)\n"
        "    def reset(self, bootstrap):\n"
        "        self._conf = {'bootstrap.servers': bootstrap}\n"
        "    def replace(self):\n"
        "        self.producer = Producer(self._conf)\n")
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            _PARENT[child] = node
    verdicts = []
    for cls in tree.body:
        assert isinstance(cls, ast.ClassDef)
        replace = cls.body[-1]
        call = next(n for n in ast.walk(replace) if isinstance(n, ast.Call))
        verdicts.append(_built(call.args[0], replace))
    assert verdicts == [True, False]
