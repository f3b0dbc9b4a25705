"""Static checks of docker-compose.yml: no Docker engine is needed to run them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    svcs = compose["services"]
    assert isinstance(svcs, dict) and svcs
    return svcs


def _pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    # The tag follows the last ':' after the last '/' (a registry may have a port).
    last = image.rsplit("/", 1)[-1]
    return ":" in last and last.rsplit(":", 1)[1] not in ("", "latest")


def test_expected_services_exist(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) >= {
        "kafka",
        "schema-registry",
        "postgres",
        "prometheus",
        "grafana",
        "revline-worker",
        "revline-sink",
        "revline-exceptions",
        "revline-auditor",
    }


def test_every_image_is_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        if "image" in svc:
            assert _pinned(svc["image"]), f"{name}: image {svc['image']!r} has no pinned tag"


def test_dockerfile_base_images_are_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        if "build" not in svc:
            continue
        context, dockerfile = _build_paths(svc["build"])
        assert context.is_dir(), f"{name}: build context {context} missing"
        assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
        bases = re.findall(r"^FROM\s+(?:--\S+\s+)*(\S+)", dockerfile.read_text(), re.M)
        assert bases, f"{dockerfile} has no FROM"
        for base in bases:
            assert _pinned(base), f"{dockerfile}: base image {base!r} has no pinned tag"


def _build_paths(build: str | dict[str, Any]) -> tuple[Path, Path]:
    if isinstance(build, str):
        context = REPO / build
        return context, context / "Dockerfile"
    context = REPO / build.get("context", ".")
    return context, context / build.get("dockerfile", "Dockerfile")


def _published(port: str | int | dict[str, Any]) -> tuple[str, str] | None:
    """(host port, protocol) for a published port, None if only a container port."""
    if isinstance(port, dict):
        published = port.get("published")
        return (str(published), port.get("protocol", "tcp")) if published else None
    spec, _, proto = str(port).partition("/")
    parts = spec.split(":")
    if len(parts) == 1:
        return None  # docker picks an ephemeral host port
    return parts[-2], proto or "tcp"


def test_published_host_ports_are_unique(services: dict[str, dict[str, Any]]) -> None:
    seen: dict[tuple[str, str], str] = {}
    for name, svc in services.items():
        for port in svc.get("ports", []):
            key = _published(port)
            if key is None:
                continue
            assert key not in seen, f"host port {key} used by {seen[key]} and {name}"
            seen[key] = name
    assert ("9092", "tcp") in seen  # the one host clients rely on


def test_every_mounted_local_path_exists(compose: dict[str, Any]) -> None:
    named = set(compose.get("volumes") or {})
    for name, svc in compose["services"].items():
        for vol in svc.get("volumes", []):
            if isinstance(vol, dict):
                kind, source = vol.get("type", "volume"), vol.get("source", "")
            else:
                source = str(vol).split(":", 1)[0]
                kind = "bind" if source.startswith((".", "/", "~")) else "volume"
            if kind == "bind":
                path = Path(source).expanduser()
                path = path if path.is_absolute() else REPO / path
                assert path.exists(), f"{name}: mounted path {source} does not exist"
            elif kind == "volume" and source:
                assert source in named, f"{name}: volume {source} is not declared"


def test_revline_services_point_at_the_stack(services: dict[str, dict[str, Any]]) -> None:
    for name in ("revline-worker", "revline-sink", "revline-exceptions", "revline-auditor"):
        env = services[name]["environment"]
        assert env["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
        assert env["SCHEMA_REGISTRY_URL"] == "http://schema-registry:8081"
        if name in ("revline-worker", "revline-sink"):
            assert env["REVLINE_LEDGER_DSN"].endswith("@postgres:5432/revline")
        assert set(services[name]["depends_on"]) <= set(services)


def test_metrics_ports_are_the_ones_each_service_reads(
    services: dict[str, dict[str, Any]],
) -> None:
    """Each service serves /metrics on the port its own setting names, and exposes it."""
    from revline.core.settings import Settings

    fields = Settings.model_fields
    for name, variable in (("revline-worker", "REVLINE_METRICS_PORT"),
                           ("revline-sink", "REVLINE_SINK_METRICS_PORT"),
                           ("revline-exceptions", "REVLINE_EXCEPTIONS_METRICS_PORT")):
        assert variable.removeprefix("REVLINE_").lower() in fields, variable
        port = services[name]["environment"][variable]
        assert port in {str(p) for p in services[name]["expose"]}, name
    auditor = services["revline-auditor"]
    command = auditor["command"]
    port = command[command.index("--metrics-port") + 1]
    assert port in {str(p) for p in auditor["expose"]}


def test_prometheus_scrapes_existing_services(services: dict[str, dict[str, Any]]) -> None:
    config = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    targets = {
        target
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    }
    assert {"revline-worker:9100", "revline-sink:9101"} <= targets
    for target in targets:
        host, _, port = target.partition(":")
        if host == "localhost":
            continue
        assert host in services, f"scrape target {target} is not a compose service"
        exposed = {str(p) for p in services[host].get("expose", [])}
        assert port in exposed, f"{host} does not expose {port}"


def test_grafana_datasource_points_at_prometheus() -> None:
    path = REPO / "deploy/grafana/provisioning/datasources/prometheus.yml"
    config = yaml.safe_load(path.read_text())
    (source,) = config["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
