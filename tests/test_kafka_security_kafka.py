"""Revline on the secured 3-node cluster (``revline broker start --nodes 3 --secure``:
SASL_SSL, SCRAM-SHA-512, a private CA, ACLs), configured only by the cluster's
``client.env`` through Revline's own settings: the whole pipeline runs (publish, worker,
sink, auditor, exception manager, audit verify, replay, redrive), its password appears in
no log, output or metrics text, and a wrong password or CA fails within seconds."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from revline.core.settings import DATA_DIR
from revline.operations.verify import compare_with_manifest, finals_by_input
from revline.tools.broker import LocalCluster, cluster_home, read_env_file
from revline.tools.isolated import IsolatedPipeline
from revline.tools.workload import WorkloadOptions, generate
from tests.conftest import SHARED_JARS, STATE_DIR
from tests.test_replay_kafka import ledger_url  # noqa: F401 - the ledger fixture (PostgreSQL)

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def _cli(env: dict[str, str], *args: str,
         timeout: float = 120) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "revline.cli", *args], env=env,
                         capture_output=True, text=True, timeout=timeout)
    return run, time.monotonic() - started


def _base_env(state: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KAFKA_", "REVLINE_", "SCHEMA_REGISTRY_"))}
    return env | {"REVLINE_STATE_DIR": str(state), "COLUMNS": "200"}


@pytest.fixture(scope="module")
def secured() -> Iterator[tuple[LocalCluster, dict[str, str], str]]:
    """The cluster, its client settings (as ``client.env`` gives them) and the password."""
    state = STATE_DIR / f"test-security-{os.getpid()}"
    shutil.rmtree(state, ignore_errors=True)
    (state / "kafka").mkdir(parents=True)
    (state / "kafka" / "lib").symlink_to(SHARED_JARS.absolute())
    run, _ = _cli(_base_env(state), "broker", "start", "--nodes", "3", "--secure", timeout=300)
    cluster = LocalCluster(cluster_home(state / "kafka"), jars_dir=SHARED_JARS)
    try:
        assert run.returncode == 0, run.stdout + run.stderr
        client = read_env_file(cluster.client_env)
        password = Path(client["KAFKA_SASL_PASSWORD_FILE"]).read_text().strip()
        assert len(password) >= 16
        yield cluster, client, password
    finally:
        _cli(_base_env(state), "broker", "stop")
        shutil.rmtree(state, ignore_errors=True)


def test_a_wrong_password_or_ca_fails_within_seconds(
        secured: tuple[LocalCluster, dict[str, str], str], tmp_path: Path) -> None:
    _, client, password = secured
    wrong = tmp_path / "wrong-password"
    wrong.write_text("not-the-password\n")
    env = _base_env(tmp_path) | client | {"KAFKA_SASL_PASSWORD_FILE": str(wrong)}
    run, took = _cli(env, "reference", "load")
    assert run.returncode == 2, run.stdout + run.stderr
    assert "refused the credentials" in run.stderr and "KAFKA_SASL_USERNAME" in run.stderr
    assert took < 20, took
    assert "not-the-password" not in run.stdout + run.stderr
    # The same with the password itself in the environment: never echoed.
    env = _base_env(tmp_path) | client | {
        "KAFKA_SSL_CA_LOCATION": "/etc/ssl/certs/ca-certificates.crt"}
    run, took = _cli(env, "reference", "load")
    assert run.returncode == 2 and "KAFKA_SSL_CA_LOCATION" in run.stderr, run.stderr
    assert took < 20, took
    assert password not in run.stdout + run.stderr


def test_the_pipeline_runs_secured_and_never_shows_the_password(
        secured: tuple[LocalCluster, dict[str, str], str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, ledger_url: str) -> None:  # noqa: F811
    _, client, password = secured
    # The password in the environment too (not only its file), where a leak is likeliest.
    client = {k: v for k, v in client.items() if k != "KAFKA_SASL_PASSWORD_FILE"}
    client["KAFKA_SASL_PASSWORD"] = password
    for name, value in client.items():  # this process's helpers read the environment
        monkeypatch.setenv(name, value)
    rules = yaml.safe_load((DATA_DIR / "rules.yaml").read_text())
    rules["hold_timeout_seconds"] = 3
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
    extra = dict(client) | {"REVLINE_ERP": "memory", "REVLINE_LEDGER_DSN": ledger_url}
    # Topics, groups and transactional ids under the prefix the cluster's ACLs allow.
    pipeline = IsolatedPipeline(client["KAFKA_BOOTSTRAP_SERVERS"], tmp_path, prefix="revline",
                                rules_file=tmp_path / "rules.yaml", extra_env=extra)
    workload = generate(WorkloadOptions(orders=30, seed=21))
    outputs: list[str] = []

    def cli(*args: str, ok: tuple[int, ...] = (0, 1)) -> subprocess.CompletedProcess[str]:
        run = subprocess.run([sys.executable, "-m", "revline.cli", *args], env=pipeline.env,
                             capture_output=True, text=True, timeout=180)
        outputs.append(run.stdout + run.stderr)
        assert run.returncode in ok, f"revline {' '.join(args)}: {run.stdout}{run.stderr}"
        return run

    cli("reference", "load")
    for command in (("worker",), ("sink",), ("auditor", "--metrics-port", "0"),
                    ("exceptions", "run")):
        pipeline.start(*command)
    try:
        pipeline.publish(workload)
        outcomes = pipeline.wait_for(
            lambda o: len(finals_by_input(o)) >= len(workload.records), 240,
            "a final outcome for every input")
        assert compare_with_manifest(workload.manifest(), outcomes) == []
        time.sleep(5)  # the auditor chains the last facts
        cli("audit", "verify")
        cli("exceptions", "list")
        for argv in (("--help",), ("run", "--help"), ("worker", "--help")):
            cli(*argv)
        metrics = ""
        for log in tmp_path.glob("*.log"):
            for port in re.findall(r"http://127\.0\.0\.1:(\d+)/metrics", log.read_text()):
                metrics += urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "revline" in metrics
    finally:
        pipeline.stop_all()
    # Replay (the sink's group, stopped now) and re-drive, on the secured cluster too.
    # (The stopped sink's static membership lasts its session timeout: until then, refused.)
    deadline = time.monotonic() + 60
    while True:
        replay = cli("replay", "--group", f"{pipeline.env['REVLINE_APP_ID']}-sink",
                     "--to-offset", "earliest", "--actor", "test", ok=(0, 1, 2))
        if replay.returncode != 2 or "live member" not in replay.stderr \
                or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert replay.returncode == 0, replay.stdout + replay.stderr
    cli("redrive", "--source", "deadletter", "--all", "--dry-run")
    logs = {p.name: p.read_text(errors="replace") for p in tmp_path.rglob("*.log")}
    assert logs, "no process logs"
    for name, text in [*logs.items(), ("cli output", "\n".join(outputs)), ("metrics", metrics)]:
        assert password not in text, f"the password appears in {name}"
