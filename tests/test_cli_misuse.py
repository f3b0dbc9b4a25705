"""Misusing the CLI, for real: each case runs `revline` in a subprocess, as a person would,
against a broker that is not there (127.0.0.1:1), and expects one `error:` line, a non-zero
exit and no traceback; quickly, and before any wait that the misuse makes pointless.

No broker is started: a command that got as far as the broker would say "unreachable",
which is how these tests tell "checked first" from "checked after connecting"."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from revline.core.settings import DATA_DIR

UNREACHABLE = "127.0.0.1:1"


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KAFKA_", "REVLINE_", "SCHEMA_REGISTRY_"))}
    env.update({"KAFKA_BOOTSTRAP_SERVERS": UNREACHABLE, "REVLINE_STATE_DIR": str(tmp_path / "st"),
                "COLUMNS": "200", "PYTHONIOENCODING": "utf-8"})
    env.update(extra)
    return env


def revline(tmp_path: Path, *args: str, timeout: float = 60,
            **extra: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "revline.cli", *args], cwd=tmp_path,
                          env=_env(tmp_path, **extra), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, check=False)
    return done, time.monotonic() - started


def one_error(done: subprocess.CompletedProcess[str]) -> str:
    """The one `error:` line of a failed command (notes such as "read model unavailable"
    may come before it; librdkafka's per-reconnect lines may not)."""
    assert done.returncode != 0, done
    err = done.stderr
    assert "Traceback" not in err + done.stdout, err
    assert "FAIL" not in err and "[rdkafka#" not in err, err[:2000]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert len(err.splitlines()) <= 3, err
    return errors[0]


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    out = {
        "events": tmp_path / "events.jsonl",
        "manifest": tmp_path / "manifest.json",
        "binary": tmp_path / "binary.yaml",
        "deep": tmp_path / "deep.yaml",
        "scalar_checks": tmp_path / "scalar.yaml",
        "scalar_products": tmp_path / "products.yaml",
        "nan_rules": tmp_path / "nan.yaml",
        "inf_rules": tmp_path / "inf.yaml",
        "good_rules": tmp_path / "good.yaml",
        "fifo": tmp_path / "fifo",
    }
    out["events"].write_text("{}\n")
    out["manifest"].write_text('{"inputs": []}')
    out["binary"].write_bytes(bytes(range(128, 256)) * 3)
    out["deep"].write_text("[" * 50_000 + "]" * 50_000)
    out["scalar_checks"].write_text("version: x\nchecks: 5\n")
    out["scalar_products"].write_text("version: x\nproducts: 5\n")
    live = yaml.safe_load((DATA_DIR / "rules.yaml").read_text())
    out["good_rules"].write_text(yaml.safe_dump({**live, "version": "misuse-1"}))
    out["nan_rules"].write_text(yaml.safe_dump({**live, "version": "misuse-2",
                                                "hold_timeout_seconds": math.nan}))
    out["inf_rules"].write_text(yaml.safe_dump({**live, "version": "misuse-3",
                                                "hold_timeout_seconds": math.inf}))
    os.mkfifo(out["fifo"])
    return out


# -- 1, 2: an unreachable broker is one line, within seconds -----------------------------
ONE_SHOT = [
    ("holds",),
    ("readback", "--manifest", "{manifest}"),
    ("exceptions", "list"),
    ("exceptions", "show", "EX-1"),
    ("exceptions", "ack", "EX-1", "--actor", "me"),
    ("redrive", "--source", "deadletter", "--all"),
    ("rules", "backtest", "--rules", "{good_rules}", "--since", "1d"),
    ("override", "--order", "O-1", "--target-key", "O-1:k", "--check", "policy.price",
     "--reason-code", "R", "--actor", "me", "--expires-in", "1h"),
    ("report",),
    ("audit", "verify"),
    ("reconcile",),
    ("shadow", "parity", "--ledger", "sqlite:///shadow.db"),
    ("publish", "{events}"),
    ("reference", "load"),
    ("generate", "--orders", "2", "--out", "w", "--publish"),
    # One-shot jobs that start a local broker when none is configured: a configured one
    # that is not there is one line, before a workload or an ERP database is built.
    ("demo", "--orders", "3", "--erp", "memory"),
    ("bench", "--events", "100"),
]


@pytest.mark.parametrize("command", ONE_SHOT, ids=lambda c: " ".join(c[:2]))
def test_an_unreachable_broker_is_one_line_within_seconds(
        command: tuple[str, ...], files: dict[str, Path], tmp_path: Path) -> None:
    args = [a.format(**{k: str(v) for k, v in files.items()}) for a in command]
    done, took = revline(tmp_path, *args)
    line = one_error(done)
    assert done.returncode == 2
    assert f"Kafka at {UNREACHABLE} is unreachable" in line, line
    assert took < 15, took


def test_generate_publish_writes_nothing_when_the_broker_is_away(tmp_path: Path) -> None:
    done, _ = revline(tmp_path, "generate", "--orders", "2", "--out", "w", "--publish")
    one_error(done)
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("command", [
    ("publish", "missing.jsonl"),
    ("reference", "load", "--file", "missing.yaml"),
    ("readback", "--manifest", "missing.json"),
    ("exceptions", "resolve", "EX-1", "--actor", "me", "--reason-code", "R",
     "--corrected-event", "missing.json"),
])
def test_a_missing_file_is_said_before_the_broker_is_asked(
        command: tuple[str, ...], tmp_path: Path) -> None:
    done, took = revline(tmp_path, *command)
    line = one_error(done)
    assert "missing." in line and "does not exist" in line and "Kafka" not in line, line
    assert took < 10, took


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
@pytest.mark.parametrize("command", [("sink",), ("auditor",), ("exceptions", "run")])
def test_a_signal_ends_a_component_waiting_for_the_broker_at_once(
        command: tuple[str, ...], sig: signal.Signals, tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "revline.cli", *command], cwd=tmp_path,
                            env=_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(4)  # well into its start-up wait for the broker
        assert proc.poll() is None, proc.communicate()
        sent = time.monotonic()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert took < 6, took
    assert "Traceback" not in err, err
    if sig == signal.SIGINT:  # Ctrl-C: one line, 130
        assert proc.returncode == 130, err
        assert err.strip().splitlines()[-1] == "interrupted", err
    else:  # a supervisor's SIGTERM: stopped as asked
        assert proc.returncode == 0, err


# -- 3: a file's bytes or shape ----------------------------------------------------------
@pytest.mark.parametrize(("command", "expected"), [
    (("rules", "validate", "{binary}"), "{binary} is not UTF-8 text"),
    (("rules", "validate", "{good_rules}", "--ownership", "{binary}"),
     "--ownership {binary} is not UTF-8 text"),
    (("reference", "load", "--file", "{binary}"), "--file {binary} is not UTF-8 text"),
    (("rules", "validate", "{deep}"), "{deep} is nested too deeply"),
    (("rules", "validate", "{good_rules}", "--ownership", "{deep}"),
     "--ownership {deep} is nested too deeply"),
    (("rules", "validate", "{scalar_checks}"), "{scalar_checks}"),
    (("rules", "validate", "{good_rules}", "--ownership", "{scalar_checks}"),
     "--ownership {scalar_checks}"),
    (("reference", "load", "--file", "{scalar_products}"), "--file {scalar_products}"),
    (("rules", "validate", "{nan_rules}"), "hold_timeout_seconds is nan"),
    (("rules", "validate", "{inf_rules}"), "hold_timeout_seconds is inf"),
    (("rules", "backtest", "--rules", "{nan_rules}", "--input", "{events}"),
     "hold_timeout_seconds is nan"),
])
def test_a_bad_file_is_one_line_naming_it(command: tuple[str, ...], expected: str,
                                          files: dict[str, Path], tmp_path: Path) -> None:
    names = {k: str(v) for k, v in files.items()}
    done, _ = revline(tmp_path, *(a.format(**names) for a in command))
    line = one_error(done)
    assert expected.format(**names) in line, line
    assert "Kafka" not in line, line


def test_a_bad_ca_file_names_the_setting(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    done, took = revline(tmp_path, "holds", KAFKA_SECURITY_PROTOCOL="SSL",
                         KAFKA_SSL_CA_LOCATION=str(tmp_path / "ca.pem"))
    line = one_error(done)
    assert "KAFKA_SSL_CA_LOCATION" in line and "KafkaError{" not in line, line
    assert took < 15, took


@pytest.mark.parametrize(("content", "expected"), [
    (b"no.such.property=1\n", "librdkafka refuses no.such.property"),
    (b"socket.timeout.ms=soon\n", "librdkafka refuses socket.timeout.ms"),
    (bytes(range(128, 256)), "is not UTF-8 text"),
])
def test_a_bad_properties_file_names_the_file(content: bytes, expected: str,
                                              tmp_path: Path) -> None:
    path = tmp_path / "client.properties"
    path.write_bytes(content)
    done, _ = revline(tmp_path, "holds", REVLINE_KAFKA_CONFIG_FILE=str(path))
    line = one_error(done)
    assert f"REVLINE_KAFKA_CONFIG_FILE {path}" in line and expected in line, line


# -- 4: a FIFO is refused, not waited on ---------------------------------------------------
@pytest.mark.parametrize("command", [
    ("publish", "{fifo}"),
    ("readback", "--manifest", "{fifo}"),
    ("reference", "load", "--file", "{fifo}"),
    ("rules", "validate", "{fifo}"),
    ("rules", "backtest", "--rules", "{good_rules}", "--input", "{fifo}"),
    ("holds",),  # REVLINE_KAFKA_CONFIG_FILE is the FIFO
])
def test_a_fifo_is_refused_not_waited_on(command: tuple[str, ...], files: dict[str, Path],
                                         tmp_path: Path) -> None:
    names = {k: str(v) for k, v in files.items()}
    extra = {"REVLINE_KAFKA_CONFIG_FILE": names["fifo"]} if command == ("holds",) else {}
    done, took = revline(tmp_path, *(a.format(**names) for a in command), timeout=30,
                         **extra)
    line = one_error(done)
    assert "not a regular file" in line and str(files["fifo"]) in line, line
    assert took < 10, took


def test_publish_still_reads_stdin(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "revline.cli", "publish", "-"], cwd=tmp_path,
                          env=_env(tmp_path), input="", capture_output=True, text=True,
                          timeout=60, check=False)
    assert "unreachable" in one_error(done)  # got past the file check to the broker


# -- 5, 6: values checked before the cluster or the broker ---------------------------------
@pytest.mark.parametrize(("command", "env", "expected"), [
    (("chaos", "--orders", "0"), {}, "--orders: 0 is out of range"),
    (("chaos", "--rate", "nan"), {}, "--rate: nan is out of range"),
    (("chaos", "--rate", "0"), {}, "--rate: 0 is out of range"),
    (("chaos", "--worker-kills", "-1"), {}, "--worker-kills: -1 is out of range"),
    (("auditor", "--instance", "bad name!"), {}, "--instance: 'bad name!'"),
    (("exceptions", "run", "--instance", "bad name!"), {}, "--instance: 'bad name!'"),
    (("shadow", "run", "--instance", "bad name!", "--ledger", "sqlite:///s.db"), {},
     "--instance: 'bad name!'"),
    (("holds", "--limit", "-1"), {}, "--limit: -1 is out of range"),
    (("reconcile", "--limit", "-1"), {}, "--limit: -1 is out of range"),
    (("shadow", "parity", "--limit", "-1"), {}, "--limit: -1 is out of range"),
    (("worker",), {"REVLINE_STORE": "bogus"}, "REVLINE_STORE='bogus'"),
    (("sink",), {"REVLINE_ERP": "bogus"}, "REVLINE_ERP='bogus'"),
    (("shadow", "run", "--ledger", "sqlite:///s.db"), {"REVLINE_SHADOW_ERP": "bogus"},
     "REVLINE_SHADOW_ERP='bogus'"),
])
def test_a_bad_value_is_refused_before_the_broker(
        command: tuple[str, ...], env: dict[str, str], expected: str, tmp_path: Path) -> None:
    done, took = revline(tmp_path, *command, timeout=30, **env)
    line = one_error(done)
    assert done.returncode == 2
    assert expected in line and "Kafka" not in line, line
    assert took < 10, took
    assert not (tmp_path / ".revline").exists()  # chaos started no cluster


# -- 7: a terminal that cannot show "→" ----------------------------------------------------
def test_an_ascii_terminal_gets_ascii_not_a_crash(tmp_path: Path) -> None:
    done, _ = revline(tmp_path, "generate", "--orders", "2", "--out", "w",
                      PYTHONIOENCODING="ascii")
    assert done.returncode == 0, done.stderr
    assert "-> w" in done.stdout and "Traceback" not in done.stderr, done
    live = yaml.safe_load((DATA_DIR / "rules.yaml").read_text())
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({**live, "version": "ascii-1"}))
    done, _ = revline(tmp_path, "rules", "validate", "r.yaml", PYTHONIOENCODING="ascii")
    assert done.returncode == 0, done.stderr
    assert "->" in done.stdout, done.stdout


@pytest.mark.parametrize(("command", "variable"), [
    (("worker",), "REVLINE_RULES_FILE"),
    (("exceptions", "run"), "REVLINE_OWNERSHIP_FILE"),
])
def test_a_component_names_its_bad_rules_file_before_the_broker(
        command: tuple[str, ...], variable: str, files: dict[str, Path],
        tmp_path: Path) -> None:
    done, took = revline(tmp_path, *command, timeout=30, **{variable: str(files["binary"])})
    line = one_error(done)
    assert f"{variable} {files['binary']} is not UTF-8 text" in line, line
    assert took < 10, took
