"""One builder for every Kafka and Schema Registry client's configuration.

Every confluent-kafka ``Producer``, ``Consumer`` and ``AdminClient`` Revline makes takes
its config from :func:`client_config`; the worker's Faust app (aiokafka) takes
:func:`faust_broker_credentials`; the Schema Registry client takes
:func:`registry_config`. So a secured cluster's settings reach every client, and none
can be missed (``tests/test_kafka_security.py`` scans the code for clients built any
other way).

What goes into a confluent-kafka client's config, later entries winning:

1. ``bootstrap.servers`` and what the call site sets (group, idempotence, tuning);
2. ``REVLINE_KAFKA_CONFIG_FILE``: librdkafka ``key=value`` properties for anything
   else (``producer.``/``consumer.``/``admin.`` before a key: that kind of client only).
   It may not change what Revline sets for correctness (``OWNED_KEYS``);
3. the ``KAFKA_SECURITY_PROTOCOL``/``KAFKA_SASL_*``/``KAFKA_SSL_*`` settings;
4. ``logger``: librdkafka's own log goes through Python logging, to
   ``revline.<component>.kafka``, instead of raw ``%4|…`` lines on stderr.

Secrets (``sasl.password``, key passwords, registry user info) are ``SecretStr`` in
``Settings`` and appear in no message Revline writes: errors name the variable, never
its value. Use :func:`redacted` before logging a config.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from revline.core.errors import ConfigurationError
from revline.core.settings import SASL_MECHANISMS, SECURITY_PROTOCOLS, Settings

if TYPE_CHECKING:
    from faust.types.auth import CredentialsT

Role = Literal["producer", "consumer", "admin"]
ROLES: tuple[Role, ...] = ("producer", "consumer", "admin")


#: Set by Revline's call sites for exactly-once and ordering; the properties file may
#: not change them (a file's ``acks=1`` would silently void the guarantees).
OWNED_KEYS = frozenset({
    "group.id", "group.instance.id", "transactional.id", "enable.idempotence", "acks",
    "request.required.acks", "enable.auto.commit", "enable.auto.offset.store",
    "isolation.level", "auto.offset.reset", "enable.partition.eof", "partitioner",
    "bootstrap.servers", "metadata.broker.list", "logger",
})

#: Keys whose values are secrets: :func:`redacted` masks them.
SECRET_KEYS = frozenset({
    "sasl.password", "ssl.key.password", "ssl.keystore.password", "ssl.key.pem",
    "sasl.oauthbearer.client.secret", "sasl.oauthbearer.config", "basic.auth.user.info",
    "bearer.auth.client.secret",
})

#: librdkafka keys the Faust (aiokafka) client cannot follow: a file using them works for
#: confluent-kafka clients, but the worker refuses to start rather than connect without.
_FAUST_UNSUPPORTED = ("ssl.certificate.pem", "ssl.key.pem", "ssl.keystore.location",
                      "sasl.oauthbearer.", "sasl.kerberos.")

# Registry properties in a Confluent-style client.properties file.
_REGISTRY_PREFIX = "schema.registry."
_REGISTRY_KEYS = ("basic.auth.user.info", "basic.auth.credentials.source")

_PASSWORD_VARS = "KAFKA_SASL_PASSWORD or KAFKA_SASL_PASSWORD_FILE"


@dataclass(frozen=True)
class FileProperties:
    """``REVLINE_KAFKA_CONFIG_FILE`` split by what it is for."""

    common: dict[str, str] = field(default_factory=dict)
    by_role: dict[str, dict[str, str]] = field(default_factory=dict)
    registry: dict[str, str] = field(default_factory=dict)


def read_properties(path: Path) -> dict[str, str]:
    """A Java-style properties file: ``key=value`` lines, ``#``/``!`` comments.

    Errors name the file and line, never the line's text (it may hold a secret)."""
    where = f"REVLINE_KAFKA_CONFIG_FILE {path}"
    if path.exists() and not path.is_file():  # a FIFO with no writer: read would never end
        raise ConfigurationError(f"{where} is not a regular file (give a properties file)")
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigurationError(f"{where} does not exist") from None
    except OSError as exc:
        raise ConfigurationError(f"{where} cannot be read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigurationError(f"{where} is not UTF-8 text (give a key=value properties "
                                 "file)") from None
    properties: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", "!")):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise ConfigurationError(f"{where}, line {number}: not a key=value property")
        properties[key.strip()] = value.strip()
    return properties


def load_file_properties(settings: Settings) -> FileProperties:
    path = settings.kafka_config_file
    if path is None:
        return FileProperties()
    where = f"REVLINE_KAFKA_CONFIG_FILE {path}"
    result = FileProperties(by_role={role: {} for role in ROLES})
    for key, value in read_properties(path).items():
        if key.startswith(_REGISTRY_PREFIX) or key in _REGISTRY_KEYS:
            name = key.removeprefix(_REGISTRY_PREFIX)
            if name == "url":
                if value != (settings.schema_registry_url or ""):
                    raise ConfigurationError(
                        f"{where} sets schema.registry.url: set SCHEMA_REGISTRY_URL to it "
                        "instead (and remove it from the file)")
                continue
            result.registry[name] = value
            continue
        role, _, rest = key.partition(".")
        target = result.common
        if role in ROLES and rest:
            key, target = rest, result.by_role[role]
        if key in ("bootstrap.servers", "metadata.broker.list"):
            if value != (settings.kafka_bootstrap_servers or ""):
                raise ConfigurationError(
                    f"{where} sets bootstrap.servers={value}: set KAFKA_BOOTSTRAP_SERVERS to "
                    "it instead (and remove it from the file)")
            continue
        if key in OWNED_KEYS:
            raise ConfigurationError(
                f"{where} sets {key}, which Revline sets itself for its delivery guarantees; "
                "remove it from the file")
        if key == "sasl.mechanisms":  # librdkafka's alias: one spelling, so env can win
            key = "sasl.mechanism"
        target[key] = value
    return result


def _read_password_file(path: Path) -> str:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigurationError(f"KAFKA_SASL_PASSWORD_FILE {path} does not exist") from None
    except OSError as exc:
        raise ConfigurationError(
            f"KAFKA_SASL_PASSWORD_FILE {path} cannot be read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigurationError(f"KAFKA_SASL_PASSWORD_FILE {path} is not UTF-8 text") from None
    password = text.rstrip("\r\n")
    if not password:
        raise ConfigurationError(f"KAFKA_SASL_PASSWORD_FILE {path} is empty")
    return password


def _existing(path: Path | str, variable: str) -> str:
    if not Path(path).exists():
        raise ConfigurationError(f"{variable} {path} does not exist")
    return str(path)


def env_security(settings: Settings) -> dict[str, str]:
    """The librdkafka properties of the ``KAFKA_*`` security settings (password read)."""
    props: dict[str, str] = {}
    if settings.kafka_security_protocol:
        props["security.protocol"] = settings.kafka_security_protocol
    if settings.kafka_sasl_mechanism:
        props["sasl.mechanism"] = settings.kafka_sasl_mechanism
    if settings.kafka_sasl_username:
        props["sasl.username"] = settings.kafka_sasl_username
    password = settings.kafka_sasl_password
    if settings.kafka_sasl_password_file is not None:
        props["sasl.password"] = _read_password_file(settings.kafka_sasl_password_file)
    elif password is not None and password.get_secret_value():
        props["sasl.password"] = password.get_secret_value()
    ca = settings.kafka_ssl_ca_location
    if ca:
        props["ssl.ca.location"] = ca if ca == "probe" else _existing(ca, "KAFKA_SSL_CA_LOCATION")
    if settings.kafka_ssl_certificate_location is not None:
        props["ssl.certificate.location"] = _existing(
            settings.kafka_ssl_certificate_location, "KAFKA_SSL_CERTIFICATE_LOCATION")
    if settings.kafka_ssl_key_location is not None:
        props["ssl.key.location"] = _existing(settings.kafka_ssl_key_location,
                                              "KAFKA_SSL_KEY_LOCATION")
    if settings.kafka_ssl_key_password is not None:
        props["ssl.key.password"] = settings.kafka_ssl_key_password.get_secret_value()
    return props


def security(settings: Settings, files: FileProperties | None = None) -> dict[str, str]:
    """The security view every client shares: the file's properties under the env's,
    checked as a whole (what a SASL or SSL connection needs is there)."""
    files = files if files is not None else load_file_properties(settings)
    merged = {**files.common, **env_security(settings)}
    from_file = settings.kafka_security_protocol is None and "security.protocol" in files.common
    _check(merged, explicit=not from_file)
    return merged


def _check(props: Mapping[str, str], *, explicit: bool) -> None:
    protocol = props.get("security.protocol", "PLAINTEXT").upper()
    where = "KAFKA_SECURITY_PROTOCOL" if explicit else "security.protocol"
    if protocol not in SECURITY_PROTOCOLS:
        raise ConfigurationError(
            f"{where}={protocol} is not one of {', '.join(SECURITY_PROTOCOLS)}")
    sasl = protocol.startswith("SASL_")
    mechanism = props.get("sasl.mechanism", "").upper()
    if sasl:
        if not mechanism:
            raise ConfigurationError(
                f"KAFKA_SASL_MECHANISM is required with {where}={protocol} "
                f"({', '.join(SASL_MECHANISMS)})")
        if mechanism in SASL_MECHANISMS:
            if not props.get("sasl.username"):
                raise ConfigurationError(
                    f"KAFKA_SASL_USERNAME is required with KAFKA_SASL_MECHANISM={mechanism}")
            if not props.get("sasl.password"):
                raise ConfigurationError(
                    f"{_PASSWORD_VARS} is required with KAFKA_SASL_MECHANISM={mechanism}")
    else:
        for key, variable in (("sasl.mechanism", "KAFKA_SASL_MECHANISM"),
                              ("sasl.username", "KAFKA_SASL_USERNAME"),
                              ("sasl.password", _PASSWORD_VARS)):
            if props.get(key):
                raise ConfigurationError(
                    f"{variable} is set but {where} is {protocol}: set "
                    "KAFKA_SECURITY_PROTOCOL=SASL_SSL (or SASL_PLAINTEXT) to use it")
    if not protocol.endswith("SSL"):
        for key, variable in (("ssl.ca.location", "KAFKA_SSL_CA_LOCATION"),
                              ("ssl.certificate.location", "KAFKA_SSL_CERTIFICATE_LOCATION"),
                              ("ssl.key.location", "KAFKA_SSL_KEY_LOCATION")):
            if props.get(key):
                raise ConfigurationError(
                    f"{variable} is set but {where} is {protocol}: set "
                    "KAFKA_SECURITY_PROTOCOL=SSL or SASL_SSL to use it")
    if bool(props.get("ssl.certificate.location")) != bool(props.get("ssl.key.location")):
        raise ConfigurationError(
            "KAFKA_SSL_CERTIFICATE_LOCATION and KAFKA_SSL_KEY_LOCATION go together "
            "(a client certificate and its private key, for mutual TLS)")


def validate(settings: Settings) -> None:
    """Every Kafka and registry security setting checked once, when settings are read."""
    files = load_file_properties(settings)
    security(settings, files)
    registry_config(settings, files)


def _logger(component: str) -> logging.Logger:
    return logging.getLogger(f"revline.{component}.kafka" if component else "revline.kafka")


def client_config(role: Role, bootstrap: str, extra: Mapping[str, Any] | None = None, *,
                  settings: Settings | None = None, component: str = "",
                  own_security: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The config of a confluent-kafka ``Producer``/``Consumer``/``AdminClient``.

    ``extra``: what the call site sets (group, idempotence, tuning). ``settings``: default
    the process's environment, for helpers that are given only a bootstrap address.
    ``component``: whose logger gets librdkafka's log (``revline.<component>.kafka``).
    ``own_security``: for a broker Revline started itself (``revline broker``), whose
    listener it knows: these properties instead of the settings and the file.
    """
    config: dict[str, Any] = {"bootstrap.servers": bootstrap, **(extra or {})}
    clash = sorted(k for k in config if k.startswith(("sasl.", "ssl.", "security.")))
    if clash:  # a call site must not bypass the settings
        raise ValueError(f"client_config: security keys belong to the settings: {clash}")
    if own_security is not None:
        config.update(own_security)
    else:
        settings = settings if settings is not None else _environment_settings()
        files = load_file_properties(settings)
        config.update(files.common)
        config.update(files.by_role.get(role, {}))
        config.update(security(settings, files))
    config["logger"] = _logger(component)
    return config


def _environment_settings() -> Settings:
    return Settings()


def producer_config(settings: Settings, bootstrap: str, *, component: str = "") -> dict[str, Any]:
    """An idempotent, acks=all producer: retries never duplicate or reorder."""
    return client_config("producer", bootstrap, {
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": settings.producer_linger_ms,
        "batch.size": settings.producer_batch_size,
        "compression.type": settings.producer_compression,
        # Java-compatible partitioning, so every client keys an order to one partition.
        "partitioner": "murmur2_random",
        "log_level": 3,  # retried warnings (e.g. coordinator loading) are not news
    }, settings=settings, component=component)


def consumer_config(settings: Settings, bootstrap: str, group_id: str, *,
                    component: str = "") -> dict[str, Any]:
    """A read_committed consumer that commits only what the call site says it has done."""
    return client_config("consumer", bootstrap, {
        "group.id": group_id,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "isolation.level": "read_committed",
    }, settings=settings, component=component)


def redacted(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` fit to log: secrets masked, the logger object named."""
    shown: dict[str, Any] = {}
    for key, value in config.items():
        if key in SECRET_KEYS or key.endswith((".password", ".secret")):
            shown[key] = "***"
        elif isinstance(value, logging.Logger):
            shown[key] = value.name
        else:
            shown[key] = value
    return shown


# -- Faust (aiokafka) ---------------------------------------------------------------------
def ssl_context(props: Mapping[str, str]) -> ssl.SSLContext:
    """A client ``SSLContext`` that trusts and presents what librdkafka would."""
    ca = props.get("ssl.ca.location")
    if ca and ca != "probe":
        context = (ssl.create_default_context(capath=ca) if Path(ca).is_dir()
                   else ssl.create_default_context(cafile=ca))
    else:
        context = ssl.create_default_context()
    if props.get("ssl.ca.pem"):
        context.load_verify_locations(cadata=props["ssl.ca.pem"])
    if props.get("enable.ssl.certificate.verification", "true").lower() == "false":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif props.get("ssl.endpoint.identification.algorithm", "https").lower() == "none":
        context.check_hostname = False
    cert = props.get("ssl.certificate.location")
    if cert:
        try:
            context.load_cert_chain(cert, props.get("ssl.key.location"),
                                    props.get("ssl.key.password"))
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or type(exc).__name__
            raise ConfigurationError(
                "KAFKA_SSL_CERTIFICATE_LOCATION/KAFKA_SSL_KEY_LOCATION: cannot load the "
                f"client certificate and key ({reason}; is KAFKA_SSL_KEY_PASSWORD right?)"
            ) from None
    return context


def faust_broker_credentials(settings: Settings | None = None) -> CredentialsT | None:
    """``broker_credentials`` for ``faust.App``: the same security as every other client,
    or None for PLAINTEXT."""
    from faust.auth import SASLCredentials, SSLCredentials

    settings = settings if settings is not None else _environment_settings()
    props = security(settings)
    unsupported = sorted(k for k in props if k.startswith(_FAUST_UNSUPPORTED))
    if unsupported:
        raise ConfigurationError(
            f"REVLINE_KAFKA_CONFIG_FILE sets {', '.join(unsupported)}, which the worker's "
            "Faust client (aiokafka) cannot use: use the KAFKA_SSL_* locations and "
            f"KAFKA_SASL_MECHANISM {'/'.join(SASL_MECHANISMS)} instead")
    protocol = props.get("security.protocol", "PLAINTEXT").upper()
    context = ssl_context(props) if protocol.endswith("SSL") else None
    if protocol.startswith("SASL_"):
        mechanism = props["sasl.mechanism"].upper()
        if mechanism not in SASL_MECHANISMS:
            raise ConfigurationError(
                f"sasl.mechanism={mechanism}: the worker's Faust client supports "
                f"{', '.join(SASL_MECHANISMS)} only")
        return SASLCredentials(username=props["sasl.username"],
                               password=props["sasl.password"],
                               ssl_context=context, mechanism=mechanism)
    if context is not None:
        return SSLCredentials(context)
    return None


# -- Schema Registry ----------------------------------------------------------------------
def registry_config(settings: Settings | None = None,
                    files: FileProperties | None = None) -> dict[str, Any] | None:
    """The Schema Registry client's config, or None when no registry is configured."""
    settings = settings if settings is not None else _environment_settings()
    files = files if files is not None else load_file_properties(settings)
    url = settings.schema_registry_url
    user_info = settings.schema_registry_basic_auth_user_info
    ca = settings.schema_registry_ssl_ca_location
    if not url:
        if user_info is not None or ca is not None:
            name = ("SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO" if user_info is not None
                    else "SCHEMA_REGISTRY_SSL_CA_LOCATION")
            raise ConfigurationError(f"{name} is set but SCHEMA_REGISTRY_URL is not")
        return None
    config: dict[str, Any] = {"url": url}
    for key, value in files.registry.items():
        if key == "basic.auth.credentials.source":
            if value.upper() not in ("USER_INFO", "URL"):
                raise ConfigurationError(
                    f"REVLINE_KAFKA_CONFIG_FILE: basic.auth.credentials.source={value}: "
                    "only USER_INFO (or URL) is supported")
            continue
        config[key] = value
    if user_info is not None:
        config["basic.auth.user.info"] = user_info.get_secret_value()
    if "basic.auth.user.info" in config:
        username, sep, _ = str(config["basic.auth.user.info"]).partition(":")
        if not sep or not username:
            raise ConfigurationError(
                "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO must be <key>:<secret> "
                "(the value is not shown)")
    if ca is not None:
        config["ssl.ca.location"] = _existing(ca, "SCHEMA_REGISTRY_SSL_CA_LOCATION")
    return config


# -- fail fast on refused credentials, or on a broker that is not there ------------------
#: How long a one-shot command waits for a first answer from Kafka (``require_answer``).
REACHABLE_TIMEOUT_S = 10.0
#: An unreachable verdict waits this long after the first "all brokers down": a TLS or
#: SASL failure, which says more, arrives right after it.
_DOWN_GRACE_S = 1.0


def check_credentials(bootstrap: str, *, settings: Settings | None = None,
                      timeout_s: float = 15.0, require_answer: bool = False) -> None:
    """Fail within seconds, naming the settings, when the brokers refuse the credentials
    or the TLS handshake (librdkafka would retry them forever and start-up would wait out
    REVLINE_STARTUP_TIMEOUT_S for a "transport failure").

    Returns once a metadata request succeeds. Without an answer: ``require_answer`` (a
    one-shot command, which has nothing to wait for) raises InfrastructureError in one
    line as soon as every broker refused the connection, or after ``timeout_s``; else
    (a long-running component: start-up's retry waits out a cold cluster) it returns,
    and on a PLAINTEXT cluster does not even ask.
    """
    import time

    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient

    from revline.core.errors import InfrastructureError

    settings = settings if settings is not None else _environment_settings()
    plaintext = security(settings).get("security.protocol", "PLAINTEXT").upper() == "PLAINTEXT"
    errors: list[KafkaError] = []
    # log_level 0: the errors come through error_cb and end as one line, not as librdkafka's
    # FAIL line per reconnect on stderr. Built even when nothing is asked: librdkafka checks
    # the configuration (CA file, properties file) when a client is made, and says so here
    # in one line rather than as a raw error in whichever component makes one first.
    with config_refusals(settings):
        admin = AdminClient(client_config(
            "admin", bootstrap, {"error_cb": errors.append, "log_level": 0}, settings=settings))
    if plaintext and not require_answer:
        return
    started = time.monotonic()
    deadline = started + timeout_s
    down_since: float | None = None
    while time.monotonic() < deadline:
        try:
            admin.list_topics(timeout=0.5)
            return
        except KafkaException:
            admin.poll(0.1)
        for error in errors:
            if error.code() == KafkaError._AUTHENTICATION:
                raise ConfigurationError(
                    f"Kafka at {bootstrap} refused the credentials ({error.str()}): check "
                    f"KAFKA_SASL_USERNAME, {_PASSWORD_VARS} and KAFKA_SASL_MECHANISM")
            if error.code() == KafkaError._SSL:
                raise ConfigurationError(
                    f"TLS with Kafka at {bootstrap} failed ({error.str()}): check "
                    "KAFKA_SSL_CA_LOCATION (the CA that signed the brokers' certificates) "
                    "and the client certificate settings")
        if require_answer and down_since is None and any(
                e.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._RESOLVE) for e in errors):
            down_since = time.monotonic()
        if down_since is not None and time.monotonic() - down_since >= _DOWN_GRACE_S:
            raise InfrastructureError(
                f"Kafka at {bootstrap} is unreachable ({_why_unreachable(errors)}): start it, "
                "or set KAFKA_BOOTSTRAP_SERVERS to a running cluster")
    if require_answer:
        raise InfrastructureError(
            f"Kafka at {bootstrap} did not answer within {timeout_s:.0f} s "
            f"({_why_unreachable(errors)}): is it up, and is KAFKA_BOOTSTRAP_SERVERS right?")


def _why_unreachable(errors: list[Any]) -> str:
    """The most telling error: a connection's own (refused, no such host), else the last."""
    from confluent_kafka import KafkaError

    for error in reversed(errors):
        if error.code() in (KafkaError._TRANSPORT, KafkaError._RESOLVE):
            return _first_line(_strip_broker(error.str()))
    return _first_line(errors[-1].str()) if errors else "no answer"


def _strip_broker(text: str) -> str:
    # "127.0.0.1:1/bootstrap: Connect to ipv4#127.0.0.1:1 failed: ..." names the broker
    # twice; the message names it already.
    head, sep, rest = text.partition(": ")
    return rest if sep and "/" in head and " " not in head else text


def _first_line(text: str) -> str:
    return " ".join(text.split())[:300]


@contextlib.contextmanager
def config_refusals(settings: Settings | None = None) -> Iterator[None]:
    """Around a client's construction: librdkafka refusing its config (a CA file that is
    not a certificate, an unknown property from REVLINE_KAFKA_CONFIG_FILE) said in one
    line naming the setting or the file, not as its raw KafkaException. (The client is
    still built in the caller, where tests/test_kafka_security.py sees it built from
    client_config.)"""
    from confluent_kafka import KafkaException

    try:
        yield
    except (KafkaException, ValueError, TypeError) as exc:
        raise ConfigurationError(
            _refused_config(exc.args[0] if exc.args else exc, settings)) from exc


def _refused_config(reason: object, settings: Settings | None = None) -> str:
    import re

    text = getattr(reason, "str", None)  # a KafkaError: its own text, not its repr
    why = _first_line(str(text() if callable(text) else reason))
    quoted = re.search(r'property:? "([^"]+)"', why)
    path = settings.kafka_config_file if settings is not None else None
    if quoted and path is not None:
        files = load_file_properties(settings) if settings is not None else FileProperties()
        named = {quoted.group(1), quoted.group(1).partition(".")[2]}
        in_file = set(files.common).union(*files.by_role.values())
        if named & in_file:
            return (f"REVLINE_KAFKA_CONFIG_FILE {path}: librdkafka refuses "
                    f"{quoted.group(1)} ({why}); fix or remove that line")
    lowered = why.lower()
    for key, variable in (("ssl.ca.location", "KAFKA_SSL_CA_LOCATION"),
                          ("ssl.certificate.location", "KAFKA_SSL_CERTIFICATE_LOCATION"),
                          ("ssl.key.location", "KAFKA_SSL_KEY_LOCATION"),
                          ("ssl.key", "KAFKA_SSL_KEY_LOCATION or KAFKA_SSL_KEY_PASSWORD")):
        if key in lowered:
            return f"{variable}: librdkafka refused it ({why}); give a readable PEM file"
    return (f"the Kafka client configuration was refused ({why}): check "
            "REVLINE_KAFKA_CONFIG_FILE's properties and the KAFKA_* settings")
