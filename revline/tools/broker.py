"""A local single-node Apache Kafka broker (KRaft, combined mode) for development and tests.

No Docker and no Kafka package exist here, so the broker runs from Maven jars
(``broker_dist/pom.xml``) with the system ``java``. The broker is detached in its
own session so it outlives the CLI that started it; its state lives in ``home``:

    home/lib/             jars (or a shared ``jars_dir``), fetched once by Maven
    home/server.properties, home/log4j2.properties
    home/data/            the broker's storage: kept across stop/start/restart, wiped
                          only by ``start(fresh=True)`` or ``reset()``
    home/broker.log       broker log (previous run kept as broker.log.prev)
    home/broker.out       JVM stdout/stderr (crashes before logging is up)
    home/format.log       log of the storage format step
    home/broker.pid, home/bootstrap
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from revline.core.errors import InfrastructureError

POM = Path(__file__).parent / "broker_dist" / "pom.xml"
READY_LINE = "Kafka Server started"
MIN_JAVA = 17
_MARKER = ".revline-kafka-version"
_HOST = "127.0.0.1"


def default_home(cwd: Path | None = None) -> Path:
    """``<git root or cwd>/.revline/kafka``: one broker per checkout, already git-ignored."""
    here = (cwd or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / ".git").exists():
            return d / ".revline" / "kafka"
    return here / ".revline" / "kafka"


def kafka_version(pom: Path = POM) -> str:
    m = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", pom.read_text())
    if m is None:
        raise InfrastructureError(f"{pom} has no <kafka.version> property")
    return m.group(1).strip()


class LocalBroker:
    """Manages one broker whose state lives in ``home``.

    ``jars_dir`` lets several homes (e.g. per-test-session brokers) share one jar
    download; by default jars go to ``home/lib``.
    """

    def __init__(self, home: Path, *, jars_dir: Path | None = None) -> None:
        self.home = Path(home).absolute()
        self.lib = Path(jars_dir).absolute() if jars_dir is not None else self.home / "lib"
        self.log_file = self.home / "broker.log"
        self.out_file = self.home / "broker.out"
        self.pid_file = self.home / "broker.pid"
        self.bootstrap_file = self.home / "bootstrap"
        self.properties_file = self.home / "server.properties"
        self.log4j_file = self.home / "log4j2.properties"
        self.data_dir = self.home / "data"
        # Only set when this process launched the JVM, so we can reap it.
        self._proc: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ jars

    def ensure_jars(self) -> Path:
        """Fetch the broker jars with Maven unless the marker shows they are current."""
        expected = self._marker_text()
        marker = self.lib / _MARKER
        if _read(marker) == expected:
            return self.lib
        mvn = _require_tool(
            "mvn", "Maven is needed once to fetch the Kafka jars: apt-get install -y maven"
        )
        self.lib.parent.mkdir(parents=True, exist_ok=True)
        # The jar dir may be shared by concurrent test sessions and the CLI.
        with _locked(self.lib.with_name(self.lib.name + ".lock")):
            if _read(marker) == expected:
                return self.lib
            # Download beside the target and swap, so a failed or interrupted
            # fetch never leaves a half-filled lib that looks usable.
            staging = self.lib.with_name(f"{self.lib.name}.tmp-{os.getpid()}")
            shutil.rmtree(staging, ignore_errors=True)
            cmd = [
                mvn, "-q", "-B", "-f", str(POM),
                "dependency:copy-dependencies",
                "-DincludeScope=runtime",
                f"-DoutputDirectory={staging}",
            ]  # fmt: skip
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode != 0 or not any(staging.glob("kafka_*.jar")):
                shutil.rmtree(staging, ignore_errors=True)
                out = _strip_ansi(res.stdout + res.stderr).strip()
                raise InfrastructureError(
                    f"Maven could not fetch the Kafka jars (exit {res.returncode}); "
                    f"it needs access to Maven Central.\n{_tail_text(out, 30)}"
                )
            (staging / _MARKER).write_text(expected)
            shutil.rmtree(self.lib, ignore_errors=True)
            staging.rename(self.lib)
        return self.lib

    def _marker_text(self) -> str:
        # The pom digest also catches changed logging deps, not just the Kafka version.
        digest = hashlib.sha256(POM.read_bytes()).hexdigest()[:16]
        return f"kafka={kafka_version()} pom={digest}\n"

    # ------------------------------------------------------------- lifecycle

    @property
    def bootstrap(self) -> str | None:
        """The address recorded by the last start (not checked for liveness; see status())."""
        text = _read(self.bootstrap_file)
        return text.strip() if text else None

    def status(self) -> str | None:
        """The bootstrap address if our broker process is alive and its port answers."""
        pid = self._live_pid()
        addr = self.bootstrap
        if pid is None or addr is None:
            return None
        host, _, port = addr.rpartition(":")
        return addr if _port_open(host, int(port)) else None

    @property
    def formatted(self) -> bool:
        """Storage (and its cluster id) exists from an earlier start."""
        return (self.data_dir / "meta.properties").is_file() and self.properties_file.is_file()

    def start(self, timeout: float = 60, *, fresh: bool = False) -> str:
        """Start the broker and wait until it serves metadata.

        Storage, cluster id and ports are kept from the last start, so topics, records,
        committed offsets and the audit trail survive a stop/start and running clients
        reconnect to the same address; ``fresh=True`` wipes them and picks new ports.
        Returns ``"127.0.0.1:PORT"``. If a broker of this home already runs, returns
        its address instead of starting a second one.
        """
        self.home.mkdir(parents=True, exist_ok=True)
        with _locked(self.home / ".lock"):
            running = self.status()
            if running is not None:
                return running
            if self._live_pid() is not None:
                # Alive but not answering: a wedged broker we own; replace it.
                self._stop_locked(timeout=10)
            java = _require_java()
            lib = self.ensure_jars()
            kept = None if fresh or not self.formatted else self._configured_ports()
            if kept is None:
                port, cport = _free_ports(2)
                self._write_config(port, cport)
                self._format(java, lib)
            else:
                port, cport = kept
                for taken in (p for p in kept if _port_open(_HOST, p)):
                    raise InfrastructureError(
                        f"port {taken} of the local broker's storage in {self.home} is taken "
                        "by another process; free it, or start on new storage and ports "
                        "with `revline broker start --fresh` (this deletes every topic)"
                    )
                self._write_config(port, cport)  # same ports; picks up changed settings
            addr = f"{_HOST}:{port}"

            if self.log_file.exists():
                self.log_file.replace(self.log_file.with_name("broker.log.prev"))
            cmd = [
                java, "-Xms256m", "-Xmx512m",
                "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={self.log4j_file}",
                f"-Drevline.kafka.log={self.log_file}",
                "-cp", f"{lib}/*",
                "kafka.Kafka", str(self.properties_file),
            ]  # fmt: skip
            with self.out_file.open("wb") as out:
                self._proc = subprocess.Popen(
                    cmd,
                    cwd=self.home,  # hs_err_pid*.log files land here, not in the caller's cwd
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # survives the CLI exiting and its Ctrl-C
                )
            self.pid_file.write_text(f"{self._proc.pid}\n")
            self.bootstrap_file.write_text(addr + "\n")
            try:
                self._wait_ready(addr, time.monotonic() + timeout)
            except BaseException:
                # Never leave a half-started broker behind (also on Ctrl-C).
                self._stop_locked(timeout=10)
                raise
            return addr

    def reset(self) -> bool:
        """Stop the broker if it runs and delete its storage; True if there was any."""
        if not self.home.is_dir():
            return False
        with _locked(self.home / ".lock"):
            self._stop_locked(timeout=30)
            existed = self.data_dir.exists()
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.properties_file.unlink(missing_ok=True)
            return existed

    def _configured_ports(self) -> tuple[int, int] | None:
        """(port, controller port) from the kept server.properties, or None."""
        text = _read(self.properties_file) or ""
        m = re.search(r"^listeners=PLAINTEXT://[^:]+:(\d+),CONTROLLER://[^:]+:(\d+)$", text,
                      re.MULTILINE)
        return (int(m.group(1)), int(m.group(2))) if m else None

    def stop(self, timeout: float = 30) -> bool:
        """SIGTERM (controlled shutdown), SIGKILL after ``timeout``. True if one was running."""
        if not self.home.is_dir():
            return False
        with _locked(self.home / ".lock"):
            return self._stop_locked(timeout)

    def _stop_locked(self, timeout: float) -> bool:
        pid = self._live_pid()
        if pid is None:
            return False
        terminate(pid, self._alive, timeout, "Kafka broker")
        self._cleanup_run_files()
        return True

    def _alive(self, pid: int) -> bool:
        # Reap our own child through Popen so it knows the JVM ended.
        if self._proc is not None and self._proc.pid == pid:
            return self._proc.poll() is None
        return _pid_alive(pid)

    def _cleanup_run_files(self) -> None:
        self.pid_file.unlink(missing_ok=True)
        self.bootstrap_file.unlink(missing_ok=True)
        self._proc = None

    def _live_pid(self) -> int | None:
        """The pid from the pid file if that process is alive *and* is our broker.

        Checking the command line guards against pid reuse after a reboot: we must
        never report, or signal, an unrelated process. Stale files are removed.
        """
        text = _read(self.pid_file)
        if text is None:
            return None
        try:
            pid = int(text.strip())
        except ValueError:
            pid = -1
        if pid > 0 and self._alive(pid):
            cmdline = _cmdline(pid)
            if cmdline is None or (
                "kafka.Kafka" in cmdline and str(self.properties_file) in cmdline
            ):
                return pid
        self._cleanup_run_files()
        return None

    # ------------------------------------------------------------ internals

    def _write_config(self, port: int, cport: int) -> None:
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": f"{_HOST}:{cport}",
            "listeners": f"PLAINTEXT://{_HOST}:{port},CONTROLLER://{_HOST}:{cport}",
            "advertised.listeners": f"PLAINTEXT://{_HOST}:{port},CONTROLLER://{_HOST}:{cport}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "num.partitions": "3",
            "auto.create.topics.enable": "true",
            # A single node: every replication factor and ISR must be 1, or
            # consumer groups and transactions wait forever for replicas.
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            # Fewer internal partitions = faster first group/transaction use.
            "offsets.topic.num.partitions": "3",
            "transaction.state.log.num.partitions": "3",
            # Tests join groups constantly; the default 3 s delay would add up.
            "group.initial.rebalance.delay.ms": "0",
        }
        self.properties_file.write_text(
            "".join(f"{k}={_prop_escape(v)}\n" for k, v in props.items())
        )
        self._write_log4j()

    def _write_log4j(self) -> None:
        self.log4j_file.write_text(
            "status = warn\n"
            "appender.file.type = File\n"
            "appender.file.name = FILE\n"
            # Set per JVM by -Drevline.kafka.log so the format tool cannot clobber broker.log.
            "appender.file.fileName = ${sys:revline.kafka.log}\n"
            "appender.file.layout.type = PatternLayout\n"
            "appender.file.layout.pattern = [%d] %p %m (%c)%n\n"
            "rootLogger.level = INFO\n"
            "rootLogger.appenderRef.file.ref = FILE\n"
            # The state-change and request loggers are chatty and rarely useful here.
            "logger.statechange.name = state.change.logger\n"
            "logger.statechange.level = WARN\n"
            "logger.request.name = kafka.request.logger\n"
            "logger.request.level = WARN\n"
        )

    def _format(self, java: str, lib: Path) -> None:
        # New storage under a new cluster id (a formatted dir refuses a second format).
        shutil.rmtree(self.data_dir, ignore_errors=True)
        cmd = [
            java, "-Xmx256m",
            f"-Dlog4j2.configurationFile={self.log4j_file}",
            f"-Drevline.kafka.log={self.home / 'format.log'}",
            "-cp", f"{lib}/*",
            "kafka.tools.StorageTool", "format", "--standalone",
            f"--cluster-id={_cluster_id()}",
            "-c", str(self.properties_file),
        ]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=self.home)
        if res.returncode != 0:
            raise InfrastructureError(
                f"Formatting Kafka storage failed (exit {res.returncode}):\n"
                f"{_tail_text(res.stdout + res.stderr, 30)}"
            )

    def _wait_ready(self, addr: str, deadline: float) -> None:
        from confluent_kafka.admin import AdminClient  # heavy import; only needed here

        from revline.core.kafka_config import client_config

        started = False
        while time.monotonic() < deadline:
            assert self._proc is not None
            code = self._proc.poll()
            if code is not None:
                raise InfrastructureError(
                    f"Kafka broker exited with code {code} during startup.\n{self._log_tail()}"
                )
            if not started:
                started = READY_LINE in (_read(self.log_file) or "")
            if started:
                left = max(0.5, min(5.0, deadline - time.monotonic()))
                try:
                    # The log line says the server is up; a metadata round-trip
                    # proves a real client can use it.
                    # This PLAINTEXT broker's own listener, not the settings' security.
                    admin = AdminClient(client_config("admin", addr, own_security={}))
                    admin.list_topics(timeout=left)
                    return
                except Exception:  # KafkaException on timeout; retry until deadline
                    pass
            time.sleep(0.2)
        raise InfrastructureError(
            f"Kafka broker at {addr} not ready within the timeout.\n{self._log_tail()}"
        )

    def _log_tail(self, n: int = 30) -> str:
        text = f"--- last {n} lines of {self.log_file} ---\n"
        text += _tail_text(_read(self.log_file) or "(empty)", n)
        out = (_read(self.out_file) or "").strip()
        if out:
            text += f"\n--- {self.out_file} ---\n{_tail_text(out, n)}"
        return text


# ------------------------------------------------------------------ local cluster

CLIENT_USER = "revline"
INTRUDER_USER = "intruder"
ADMIN_USER = "revline-admin"  # inter-broker and ACL administration; a super user
SCRAM_MECHANISM = "SCRAM-SHA-512"
# Topic stems (after "<prefix>.") the intruder may read but never write.
PROTECTED_STEMS = ("audit", "exception", "validated", "outcomes")
_CLUSTER_FILE = "cluster.json"
_NODE_CN = "revline-node-{}"


def cluster_home(broker_home: Path) -> Path:
    """The local cluster's home beside the single broker's: ``.revline/kafka-cluster``."""
    return broker_home.with_name(broker_home.name + "-cluster")


@dataclass(frozen=True)
class NodeStatus:
    node_id: int
    port: int
    pid: int | None
    alive: bool  # the process runs and its client port answers
    leaders: int | None  # partitions it leads (None: metadata not available)


class _ClusterNode(LocalBroker):
    """One combined controller+broker of a LocalCluster; reuses LocalBroker's pid handling."""

    def __init__(self, cluster_home: Path, node_id: int, jars_dir: Path) -> None:
        super().__init__(cluster_home / f"node-{node_id}", jars_dir=jars_dir)
        self.node_id = node_id

    def launch(self, java: str, lib: Path, port: int) -> None:
        if self.log_file.exists():
            self.log_file.replace(self.log_file.with_name("broker.log.prev"))
        cmd = [
            # Three JVMs share a small machine: C1 only and the serial collector start in
            # about half the time (measured: 21 s instead of 35 s for a new secure cluster
            # on 2 busy cores), at some cost in peak throughput.
            java, "-Xms128m", "-Xmx384m", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.log4j_file}",
            f"-Drevline.kafka.log={self.log_file}",
            "-cp", f"{lib}/*",
            "kafka.Kafka", str(self.properties_file),
        ]  # fmt: skip
        with self.out_file.open("wb") as out:
            self._proc = subprocess.Popen(
                cmd, cwd=self.home, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        self.pid_file.write_text(f"{self._proc.pid}\n")
        self.bootstrap_file.write_text(f"{_HOST}:{port}\n")
        # Until exec, /proc shows Python's command line: wait so _live_pid knows it.
        until = time.monotonic() + 5
        while time.monotonic() < until and self._proc.poll() is None:
            cmdline = _cmdline(self._proc.pid)
            if cmdline is None or "kafka.Kafka" in cmdline:
                break
            time.sleep(0.01)

    def started(self) -> bool:
        """The log says the server started; raises if the JVM exited."""
        # Our own child: ask Popen (right after fork /proc still shows Python's command
        # line, which _live_pid would take for a stranger's process).
        alive = self._proc.poll() is None if self._proc is not None else (
            self._live_pid() is not None)
        if not alive:
            raise InfrastructureError(
                f"Kafka node {self.node_id} exited during startup.\n{self._log_tail()}"
            )
        return READY_LINE in (_read(self.log_file) or "")

    def signal_stop(self) -> int | None:
        pid = self._live_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        return pid


class LocalCluster:
    """N combined controller+broker KRaft nodes on 127.0.0.1, optionally secured.

    State in ``home`` (storage, ports, certificates and passwords kept across
    stop/start; ``fresh=True`` or ``reset()`` wipe them):

        home/cluster.json            nodes, secure, ports, ACL prefixes
        home/node-N/                 server.properties (0600), data/, broker.log, broker.pid
        home/tls/ca.pem              the CA clients trust (its key: ca.key, 0600)
        home/tls/node-N.pem          node N's key + certificate chain (0600)
        home/secrets/USER.password   SCRAM passwords (0600), never printed
        home/client.env              client settings for Revline (``set -a; . client.env``)
        home/intruder.env            the same for the ``intruder`` principal (tests, demos)

    Secure: clients and brokers use SASL_SSL with SCRAM-SHA-512 (users created at
    format time); the controller listener uses TLS with client certificates
    (KRaft controllers cannot use SCRAM). ``StandardAuthorizer`` with ACLs: ``revline``
    may do everything on topics, groups and transactional ids starting with one of
    ``prefixes``; ``intruder`` may read them and write only ``<prefix>.events…``, and
    is explicitly denied writes to the audit, exception, validated and outcome topics.
    """

    def __init__(self, home: Path, *, nodes: int | None = None, secure: bool | None = None,
                 jars_dir: Path | None = None, prefixes: tuple[str, ...] | None = None) -> None:
        self.home = Path(home).absolute()
        self.lib = Path(jars_dir).absolute() if jars_dir is not None else self.home / "lib"
        self.meta_file = self.home / _CLUSTER_FILE
        self.client_env = self.home / "client.env"
        self.intruder_env = self.home / "intruder.env"
        self.tls_dir = self.home / "tls"
        self.secrets_dir = self.home / "secrets"
        self.ca_file = self.tls_dir / "ca.pem"
        meta = self._meta()
        self._wanted_nodes = nodes
        self._wanted_secure = secure
        self.nodes = nodes if nodes is not None else int(meta.get("nodes", 3))
        self.secure = secure if secure is not None else bool(meta.get("secure", False))
        self.prefixes = prefixes or tuple(meta.get("prefixes", ("revline",)))
        if self.nodes < 1:
            raise InfrastructureError("a cluster needs at least one node")

    # ------------------------------------------------------------- queries

    def node(self, node_id: int) -> _ClusterNode:
        if not 1 <= node_id <= self.nodes:
            raise InfrastructureError(f"no node {node_id} (nodes 1..{self.nodes})")
        return _ClusterNode(self.home, node_id, self.lib)

    def node_ids(self) -> list[int]:
        return list(range(1, self.nodes + 1))

    def _meta(self) -> dict[str, Any]:
        text = _read(self.meta_file)
        if not text:
            return {}
        try:
            data = json.loads(text)
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    @property
    def formatted(self) -> bool:
        meta = self._meta()
        return bool(meta.get("ports")) and all(
            (self.home / f"node-{i}" / "data" / "meta.properties").is_file()
            for i in range(1, int(meta.get("nodes", 0)) + 1)
        )

    def ports(self) -> dict[int, tuple[int, int]]:
        """node id -> (client port, controller port), as recorded at format time."""
        raw = self._meta().get("ports", {})
        return {int(k): (int(v[0]), int(v[1])) for k, v in raw.items()}

    @property
    def bootstrap(self) -> str | None:
        ports = self.ports()
        return ",".join(f"{_HOST}:{ports[i][0]}" for i in sorted(ports)) or None

    def password_file(self, user: str) -> Path:
        return self.secrets_dir / f"{user}.password"

    def client_config(self, user: str = CLIENT_USER) -> dict[str, Any]:
        """librdkafka settings to reach this cluster as ``user`` (reads its password file)."""
        bootstrap = self.bootstrap
        if bootstrap is None:
            raise InfrastructureError(f"no local cluster formatted in {self.home}")
        config: dict[str, Any] = {"bootstrap.servers": bootstrap}
        if self.secure:
            config.update({
                "security.protocol": "SASL_SSL",
                "sasl.mechanism": SCRAM_MECHANISM,
                "sasl.username": user,
                "sasl.password": (_read(self.password_file(user)) or "").strip(),
                "ssl.ca.location": str(self.ca_file),
            })
        return config

    def status(self) -> list[NodeStatus]:
        """Every node: port, pid, alive, and how many partitions it leads (if reachable)."""
        ports = self.ports()
        rows: list[tuple[int, int, int | None, bool]] = []
        for i in self.node_ids():
            port = ports.get(i, (0, 0))[0]
            pid = self.node(i)._live_pid()
            rows.append((i, port, pid, pid is not None and port > 0 and _port_open(_HOST, port)))
        leaders: dict[int, int] | None = None
        if any(alive for *_, alive in rows):
            leaders = self._leader_counts()
        return [NodeStatus(i, port, pid, alive,
                           None if leaders is None else leaders.get(i, 0))
                for i, port, pid, alive in rows]

    def running(self) -> str | None:
        """The bootstrap list if every node runs and answers."""
        rows = self.status_quick()
        return self.bootstrap if rows and all(rows) else None

    def status_quick(self) -> list[bool]:
        ports = self.ports()
        return [self.node(i)._live_pid() is not None and i in ports
                and _port_open(_HOST, ports[i][0]) for i in self.node_ids()]

    def _leader_counts(self) -> dict[int, int] | None:
        from confluent_kafka.admin import AdminClient

        try:
            admin_user = ADMIN_USER if self.secure else CLIENT_USER
            md = AdminClient({**self.client_config(admin_user), "log_level": 0}).list_topics(
                timeout=5)
        except Exception:  # status must answer even when metadata does not
            return None
        counts: dict[int, int] = {}
        for topic in md.topics.values():
            for part in topic.partitions.values():
                if part.leader >= 0:
                    counts[part.leader] = counts.get(part.leader, 0) + 1
        return counts

    def leader_of(self, topic: str, partition: int, timeout: float = 10) -> int:
        from confluent_kafka.admin import AdminClient

        admin_user = ADMIN_USER if self.secure else CLIENT_USER
        md = AdminClient(self.client_config(admin_user)).list_topics(topic, timeout=timeout)
        leader: int = md.topics[topic].partitions[partition].leader
        return leader

    # ----------------------------------------------------------- lifecycle

    def start(self, timeout: float = 180, *, fresh: bool = False) -> str:
        """Start every node that is not running and wait until the cluster serves clients.

        Returns the bootstrap list ``127.0.0.1:P1,127.0.0.1:P2,…``.
        """
        self.home.mkdir(parents=True, exist_ok=True)
        with _locked(self.home / ".lock"):
            meta = self._meta()
            if not fresh and self.formatted:
                mismatch = [
                    f"{k} {meta.get(k)} (asked: {want})"
                    for k, want in (("nodes", self._wanted_nodes), ("secure", self._wanted_secure))
                    if want is not None and meta.get(k) != want
                ]
                if mismatch:
                    raise InfrastructureError(
                        f"the local cluster in {self.home} has {', '.join(mismatch)}; start "
                        "it as it is, or replace it with --fresh (this deletes every topic)"
                    )
            java = _require_java()
            lib = LocalBroker(self.home, jars_dir=self.lib).ensure_jars()
            new = fresh or not self.formatted
            if new:
                self._stop_locked(timeout=30)
                self._create(java, lib)
            else:
                self._write_configs()  # same ports; picks up changed settings
            started = self._start_nodes(java, lib, self.node_ids(),
                                        time.monotonic() + timeout)
            if self.secure and (new or started):
                self._create_acls()
            if new:
                self._warm_up(time.monotonic() + timeout)
            self._write_env_files()
            return self.bootstrap or ""

    def start_node(self, node_id: int, timeout: float = 120) -> None:
        """(Re)start one node, e.g. after ``kill(node_id)``, and wait until it has started."""
        with _locked(self.home / ".lock"):
            java = _require_java()
            lib = LocalBroker(self.home, jars_dir=self.lib).ensure_jars()
            self._start_nodes(java, lib, [node_id], time.monotonic() + timeout)

    def kill(self, node_id: int) -> None:
        """SIGKILL one node (a crash: no controlled shutdown, no flush)."""
        node = self.node(node_id)
        pid = node._live_pid()
        if pid is None:
            raise InfrastructureError(f"Kafka node {node_id} is not running")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if not wait_exit(pid, node._alive, 10):
            raise InfrastructureError(f"Kafka node {node_id} (pid {pid}) survived SIGKILL")
        node._cleanup_run_files()

    def stop(self, timeout: float = 60) -> bool:
        """SIGTERM every node at once (controlled shutdown), SIGKILL after ``timeout``."""
        if not self.home.is_dir():
            return False
        with _locked(self.home / ".lock"):
            return self._stop_locked(timeout)

    def reset(self) -> bool:
        """Stop every node and delete the cluster's storage, certificates and passwords."""
        if not self.home.is_dir():
            return False
        with _locked(self.home / ".lock"):
            self._stop_locked(timeout=30)
            existed = self.meta_file.exists()
            self._wipe()
            return existed

    def _stop_locked(self, timeout: float) -> bool:
        nodes = [self.node(i) for i in self.node_ids()]
        pids = {n.node_id: n.signal_stop() for n in nodes}
        deadline = time.monotonic() + timeout
        for n in nodes:
            pid = pids[n.node_id]
            if pid is None:
                continue
            if not wait_exit(pid, n._alive, max(0.1, deadline - time.monotonic())):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                if not wait_exit(pid, n._alive, 10):
                    raise InfrastructureError(f"Kafka node {n.node_id} pid {pid} survived SIGKILL")
            n._cleanup_run_files()
        return any(pid is not None for pid in pids.values())

    def _wipe(self) -> None:
        for i in range(1, max(self.nodes, int(self._meta().get("nodes", 0))) + 1):
            shutil.rmtree(self.home / f"node-{i}", ignore_errors=True)
        for path in (self.tls_dir, self.secrets_dir):
            shutil.rmtree(path, ignore_errors=True)
        for path in (self.meta_file, self.client_env, self.intruder_env):
            path.unlink(missing_ok=True)

    # ------------------------------------------------------------ internals

    def _create(self, java: str, lib: Path) -> None:
        """New storage, ports, certificates and passwords; every node formatted alike."""
        self._wipe()
        ports = _free_ports(2 * self.nodes)
        meta = {
            "nodes": self.nodes,
            "secure": self.secure,
            "prefixes": list(self.prefixes),
            "ports": {str(i): [ports[2 * (i - 1)], ports[2 * (i - 1) + 1]]
                      for i in self.node_ids()},
        }
        self.meta_file.write_text(json.dumps(meta, indent=2) + "\n")
        if self.secure:
            self.secrets_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            for user in (ADMIN_USER, CLIENT_USER, INTRUDER_USER):
                _write_private(self.password_file(user), secrets.token_urlsafe(24))
            _write_tls(self.tls_dir, self.node_ids())
        self._write_configs()
        cluster_id = _cluster_id()
        scram: list[str] = []
        if self.secure:
            for user in (ADMIN_USER, CLIENT_USER, INTRUDER_USER):
                password = (_read(self.password_file(user)) or "").strip()
                scram += ["--add-scram", f"{SCRAM_MECHANISM}=[name={user},password={password}]"]
        procs = []
        for i in self.node_ids():
            node = self.node(i)
            cmd = [
                java, "-Xmx256m", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC",
                f"-Dlog4j2.configurationFile={node.log4j_file}",
                f"-Drevline.kafka.log={node.home / 'format.log'}",
                "-cp", f"{lib}/*",
                "kafka.tools.StorageTool", "format",
                f"--cluster-id={cluster_id}", "-c", str(node.properties_file), *scram,
            ]  # fmt: skip
            procs.append((i, subprocess.Popen(cmd, cwd=node.home, stdin=subprocess.DEVNULL,
                                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)))
        failures = []
        for i, proc in procs:
            out, _ = proc.communicate()
            if proc.returncode != 0:
                failures.append(f"node {i} (exit {proc.returncode}):\n"
                                f"{_tail_text(out.decode(errors='replace'), 20)}")
        if failures:
            raise InfrastructureError("Formatting Kafka storage failed: " + "\n".join(failures))

    def _write_configs(self) -> None:
        ports = self.ports()
        n = self.nodes
        rf, isr = min(n, 3), (2 if n >= 3 else 1)
        voters = ",".join(f"{i}@{_HOST}:{ports[i][1]}" for i in self.node_ids())
        admin_password = (_read(self.password_file(ADMIN_USER)) or "").strip()
        for i in self.node_ids():
            node = self.node(i)
            node.home.mkdir(parents=True, exist_ok=True)
            port, cport = ports[i]
            props = {
                "process.roles": "broker,controller",
                "node.id": str(i),
                "controller.quorum.voters": voters,
                "controller.listener.names": "CONTROLLER",
                "log.dirs": str(node.data_dir),
                "num.partitions": "3",
                "auto.create.topics.enable": "true",
                "default.replication.factor": str(rf),
                "min.insync.replicas": str(isr),
                "offsets.topic.replication.factor": str(rf),
                "transaction.state.log.replication.factor": str(rf),
                "transaction.state.log.min.isr": str(isr),
                "share.coordinator.state.topic.replication.factor": str(rf),
                "share.coordinator.state.topic.min.isr": str(isr),
                "offsets.topic.num.partitions": "3",
                "transaction.state.log.num.partitions": "3",
                "group.initial.rebalance.delay.ms": "0",
                "unclean.leader.election.enable": "false",
                # A killed node is fenced (its partitions move) after this, not 9 s.
                "broker.session.timeout.ms": "6000",
                "broker.heartbeat.interval.ms": "1000",
            }
            if self.secure:
                names = ";".join(f"User:{_NODE_CN.format(j)}" for j in self.node_ids())
                props.update({
                    "listeners": f"SASL_SSL://{_HOST}:{port},CONTROLLER://{_HOST}:{cport}",
                    "advertised.listeners": f"SASL_SSL://{_HOST}:{port}",
                    "listener.security.protocol.map": "CONTROLLER:SSL,SASL_SSL:SASL_SSL",
                    "inter.broker.listener.name": "SASL_SSL",
                    "sasl.enabled.mechanisms": SCRAM_MECHANISM,
                    "sasl.mechanism.inter.broker.protocol": SCRAM_MECHANISM,
                    "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config":
                        "org.apache.kafka.common.security.scram.ScramLoginModule required "
                        f'username="{ADMIN_USER}" password="{admin_password}";',
                    "ssl.keystore.type": "PEM",
                    "ssl.keystore.location": str(self.tls_dir / f"node-{i}.pem"),
                    "ssl.truststore.type": "PEM",
                    "ssl.truststore.location": str(self.ca_file),
                    # Controllers authenticate each other and the brokers by certificate.
                    "listener.name.controller.ssl.client.auth": "required",
                    "ssl.principal.mapping.rules": "RULE:^CN=([^,]+)(,.*)?$/$1/,DEFAULT",
                    "authorizer.class.name":
                        "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
                    "super.users": f"User:{ADMIN_USER};{names}",
                    "allow.everyone.if.no.acl.found": "false",
                })
            else:
                props.update({
                    "listeners": f"PLAINTEXT://{_HOST}:{port},CONTROLLER://{_HOST}:{cport}",
                    "advertised.listeners": f"PLAINTEXT://{_HOST}:{port}",
                    "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
                    "inter.broker.listener.name": "PLAINTEXT",
                })
            _write_private(node.properties_file,
                           "".join(f"{k}={_prop_escape(v)}\n" for k, v in props.items()))
            node._write_log4j()

    def _start_nodes(self, java: str, lib: Path, ids: list[int], deadline: float) -> bool:
        """Launch the given nodes that are not running; wait until the cluster answers."""
        ports = self.ports()
        launched: list[_ClusterNode] = []
        for i in ids:
            node = self.node(i)
            if node._live_pid() is not None:
                continue
            port, cport = ports[i]
            for taken in (p for p in (port, cport) if _port_open(_HOST, p)):
                raise InfrastructureError(
                    f"port {taken} of node {i} of the local cluster in {self.home} is taken "
                    "by another process; free it, or start on new storage and ports with "
                    "--fresh (this deletes every topic)"
                )
            node.launch(java, lib, port)
            launched.append(node)
        try:
            self._wait_ready(launched, deadline)
        except BaseException:
            for node in launched:  # never leave half-started nodes behind
                node._stop_locked(timeout=10)
            raise
        return bool(launched)

    def _wait_ready(self, launched: list[_ClusterNode], deadline: float) -> None:
        from confluent_kafka.admin import AdminClient

        pending = list(launched)
        while pending and time.monotonic() < deadline:
            pending = [n for n in pending if not n.started()]
            if pending:
                time.sleep(0.2)
        if pending:
            raise InfrastructureError(
                f"Kafka node {pending[0].node_id} did not start within the timeout.\n"
                f"{pending[0]._log_tail()}"
            )
        # Every broker registered and serving metadata, as a real client sees it.
        admin_user = ADMIN_USER if self.secure else CLIENT_USER
        admin = AdminClient({**self.client_config(admin_user), "log_level": 0})
        seen = 0
        while time.monotonic() < deadline:
            left = max(0.5, min(5.0, deadline - time.monotonic()))
            try:
                seen = len(admin.list_topics(timeout=left).brokers)
                if seen == self.nodes:
                    return
            except Exception:  # KafkaException on timeout; retry until the deadline
                pass
            for n in launched:
                n.started()  # raises if a node died meanwhile
            time.sleep(0.2)
        raise InfrastructureError(
            f"the local cluster at {self.bootstrap} shows {seen} of {self.nodes} brokers "
            f"after the timeout.\n{self.node(self.nodes)._log_tail()}"
        )

    def _warm_up(self, deadline: float) -> None:
        """Create the offsets and transaction-state topics (RF 3 on 3 nodes) now.

        Kafka creates them on the first group or transactional request; on a new
        cluster of a busy machine that took over 10 s, during which a client that polls
        for its group coordinator can hit a librdkafka assertion (seen with 2.16).
        """
        from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

        admin_user = ADMIN_USER if self.secure else CLIENT_USER
        base = {**self.client_config(admin_user), "log_level": 0}
        consumer = Consumer({**base, "group.id": "revline-cluster-warm-up"})
        try:
            while True:
                try:
                    consumer.committed([TopicPartition("revline-cluster-warm-up", 0)],
                                       timeout=max(1.0, min(10.0, deadline - time.monotonic())))
                    break
                except KafkaException:
                    if time.monotonic() > deadline:
                        raise InfrastructureError(
                            "the new cluster's group coordinator did not answer in time"
                        ) from None
                    time.sleep(0.5)
        finally:
            consumer.close()
        producer = Producer({**base, "transactional.id": "revline-cluster-warm-up"})
        try:
            producer.init_transactions(max(5.0, deadline - time.monotonic()))
        except KafkaException as exc:
            raise InfrastructureError(
                f"the new cluster's transaction coordinator did not answer in time: {exc}"
            ) from exc

    def _create_acls(self) -> None:
        from confluent_kafka.admin import (  # type: ignore[attr-defined]
            AclBinding,
            AclOperation,
            AclPermissionType,
            AdminClient,
            ResourcePatternType,
            ResourceType,
        )

        allow, deny = AclPermissionType.ALLOW, AclPermissionType.DENY
        prefixed, literal = ResourcePatternType.PREFIXED, ResourcePatternType.LITERAL
        me, intruder = f"User:{CLIENT_USER}", f"User:{INTRUDER_USER}"
        acls = []
        for op in (AclOperation.IDEMPOTENT_WRITE, AclOperation.DESCRIBE,
                   AclOperation.DESCRIBE_CONFIGS):
            acls.append(AclBinding(ResourceType.BROKER, "kafka-cluster", literal, me, "*", op,
                                   allow))
        acls.append(AclBinding(ResourceType.GROUP, INTRUDER_USER, prefixed, intruder, "*",
                               AclOperation.READ, allow))
        for p in self.prefixes:
            for kind in (ResourceType.TOPIC, ResourceType.GROUP, ResourceType.TRANSACTIONAL_ID):
                acls.append(AclBinding(kind, p, prefixed, me, "*", AclOperation.ALL, allow))
            for op in (AclOperation.READ, AclOperation.DESCRIBE,
                       AclOperation.DESCRIBE_CONFIGS):
                acls.append(AclBinding(ResourceType.TOPIC, p, prefixed, intruder, "*", op, allow))
            # An upstream producer: it may publish input events…
            acls.append(AclBinding(ResourceType.TOPIC, f"{p}.events", prefixed, intruder, "*",
                                   AclOperation.WRITE, allow))
            # …and never write what Revline vouches for, whatever else is granted later.
            for stem in PROTECTED_STEMS:
                acls.append(AclBinding(ResourceType.TOPIC, f"{p}.{stem}", prefixed, intruder,
                                       "*", AclOperation.WRITE, deny))
        admin = AdminClient({**self.client_config(ADMIN_USER), "log_level": 0})
        for binding, future in admin.create_acls(acls, request_timeout=30).items():
            try:
                future.result(timeout=60)
            except Exception as exc:
                raise InfrastructureError(f"cannot create ACL {binding}: {exc}") from exc

    def _write_env_files(self) -> None:
        def env(user: str) -> str:
            lines = [f"KAFKA_BOOTSTRAP_SERVERS={self.bootstrap}"]
            if self.secure:
                lines += [
                    "KAFKA_SECURITY_PROTOCOL=SASL_SSL",
                    f"KAFKA_SASL_MECHANISM={SCRAM_MECHANISM}",
                    f"KAFKA_SASL_USERNAME={user}",
                    f"KAFKA_SASL_PASSWORD_FILE={shlex.quote(str(self.password_file(user)))}",
                    f"KAFKA_SSL_CA_LOCATION={shlex.quote(str(self.ca_file))}",
                ]
            return "\n".join(lines) + "\n"

        self.client_env.write_text(env(CLIENT_USER))
        if self.secure:
            self.intruder_env.write_text(env(INTRUDER_USER))


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=value`` lines as written by LocalCluster (shell-quoted values)."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() and not key.lstrip().startswith("#"):
            parts = shlex.split(value)
            values[key.strip()] = parts[0] if parts else ""
    return values


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to a file only its owner can read (created 0600, never wider)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        os.fchmod(fh.fileno(), 0o600)
        fh.write(text)


def _write_tls(tls_dir: Path, node_ids: list[int]) -> None:
    """A CA and one certificate per node (SAN 127.0.0.1 and localhost), in PEM."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    tls_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    not_before, not_after = now - dt.timedelta(hours=1), now + dt.timedelta(days=3650)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Revline local"),
                          x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def key_pem(key: rsa.RSAPrivateKey) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = name("Revline local cluster CA")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    _write_private(tls_dir / "ca.key", key_pem(ca_key).decode())
    (tls_dir / "ca.pem").write_bytes(ca_pem)
    for i in node_ids:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(_NODE_CN.format(i))).issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address(_HOST)),
                x509.DNSName("localhost"),
            ]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        chain = cert.public_bytes(serialization.Encoding.PEM) + ca_pem
        _write_private(tls_dir / f"node-{i}.pem", (key_pem(key) + chain).decode())


def resolve_bootstrap(home: Path, *, start_if_missing: bool) -> tuple[str, bool]:
    """Where to find Kafka: ``(bootstrap, started_now)``.

    ``KAFKA_BOOTSTRAP_SERVERS`` wins; then a running local broker in ``home``; then,
    if allowed, a freshly started one.
    """
    env = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    if env:
        return env, False
    broker = LocalBroker(home)
    running = broker.status()
    if running is not None:
        return running, False
    cluster = LocalCluster(cluster_home(home), jars_dir=home / "lib")
    if cluster.formatted and cluster.running() is not None:
        if cluster.secure:
            raise InfrastructureError(
                "The local Kafka cluster is secured (SASL_SSL): load its client settings "
                f"first: set -a; . {cluster.client_env}; set +a"
            )
        return cluster.bootstrap or "", False
    if start_if_missing:
        return broker.start(), True
    raise InfrastructureError(
        "No Kafka broker: run `revline broker start` for a local one, "
        "or set KAFKA_BOOTSTRAP_SERVERS=host:port for an existing cluster."
    )


def broker_command(action: str, home: Path, *, fresh: bool = False, yes: bool = False,
                   nodes: int | None = None, secure: bool = False) -> int:
    """``revline broker start|stop|status|restart|reset``; returns the exit code.

    ``--nodes N`` (N > 1) or ``--secure`` act on the local cluster (``cluster_home``);
    without them ``start`` is the single broker as always, and stop/status/restart/reset
    act on the single broker and on the cluster if one exists.
    """
    if action not in ("start", "stop", "status", "restart", "reset"):
        print(f"error: unknown broker action {action!r} (use start|stop|status|restart|reset)",
              file=sys.stderr)
        return 2
    if nodes is not None and nodes < 1:
        print("error: --nodes must be at least 1", file=sys.stderr)
        return 2
    chome = cluster_home(home)
    if secure or (nodes is not None and nodes > 1):
        jars = home / "lib"
        if nodes is None and not (chome / _CLUSTER_FILE).is_file():
            nodes = 1
        return _cluster_command(action, LocalCluster(chome, nodes=nodes, secure=secure or None,
                                                     jars_dir=jars), fresh=fresh, yes=yes)
    if not (chome / _CLUSTER_FILE).is_file():
        return _single_command(action, home, fresh=fresh, yes=yes)
    cluster = LocalCluster(chome, jars_dir=home / "lib")
    if action == "start":
        return _single_command(action, home, fresh=fresh, yes=yes)
    if action == "restart":
        codes = []
        if any(cluster.status_quick()):
            codes.append(_cluster_command(action, cluster, fresh=fresh, yes=yes))
        if LocalBroker(home).status() is not None or not codes:
            codes.append(_single_command(action, home, fresh=fresh, yes=yes))
        return max(codes)
    if action == "status":
        single = LocalBroker(home).status()
        if single is not None:
            _single_command(action, home)
        cluster_code = _cluster_command(action, cluster)
        return 0 if single is not None else cluster_code
    if action == "reset" and not yes and not sys.stdin.isatty():
        print("error: `revline broker reset` deletes every topic, record and offset of the "
              "local broker and cluster; confirm with --yes", file=sys.stderr)
        return 2
    code = _single_command(action, home, fresh=fresh, yes=yes)
    if code != 0:  # e.g. reset refused at the prompt
        return code
    return _cluster_command(action, cluster, fresh=fresh, yes=True)


def _cluster_command(action: str, cluster: LocalCluster, *, fresh: bool = False,
                     yes: bool = False) -> int:
    what = f"Kafka cluster ({cluster.nodes} node{'s' * (cluster.nodes != 1)}" + (
        ", SASL_SSL)" if cluster.secure else ")")
    try:
        if action == "reset":
            if not yes:
                if not sys.stdin.isatty():
                    print("error: `revline broker reset` deletes every topic, record and "
                          "offset of the local cluster; confirm with --yes", file=sys.stderr)
                    return 2
                answer = input(f"Delete every topic of the local cluster in {cluster.home}? "
                               "[y/N] ")
                if answer.strip().lower() not in ("y", "yes"):
                    print("Nothing deleted.")
                    return 1
            wiped = cluster.reset()
            print("Local cluster storage deleted." if wiped else "No local cluster storage.")
            return 0
        if action == "status":
            rows = cluster.status()
            up = sum(r.alive for r in rows)
            if not cluster.formatted:
                print("Kafka cluster not created.")
                return 1
            print(f"{what}: {up} of {len(rows)} nodes up; bootstrap {cluster.bootstrap}")
            for r in rows:
                leads = "?" if r.leaders is None else str(r.leaders)
                state = "up" if r.alive else ("not answering" if r.pid else "down")
                print(f"  node {r.node_id}  127.0.0.1:{r.port}  pid {r.pid or '-'}  {state}"
                      f"  leads {leads} partitions  (log: {cluster.node(r.node_id).log_file})")
            print(f"  client settings: {cluster.client_env}")
            return 0 if up == len(rows) else 1
        if action in ("stop", "restart") or fresh:
            stopped = cluster.stop()
            if action == "stop":
                print(f"{what} stopped." if stopped else "No Kafka cluster was running.")
                return 0
        kept = cluster.formatted and not fresh
        print(f"Starting {what}" + (" (keeping its topics)…" if kept else "…"),
              file=sys.stderr, flush=True)
        started = time.monotonic()
        addr = cluster.start(fresh=fresh)
        print(f"{what} ready at {addr} in {time.monotonic() - started:.0f} s "
              f"(logs: {cluster.home}/node-*/broker.log)")
        print(f"Client settings: set -a; . {cluster.client_env}; set +a")
        return 0
    except InfrastructureError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _single_command(action: str, home: Path, *, fresh: bool = False, yes: bool = False) -> int:
    broker = LocalBroker(home)
    try:
        if action == "reset":
            if not yes:
                if not sys.stdin.isatty():
                    print("error: `revline broker reset` deletes every topic, record and "
                          "offset of the local broker; confirm with --yes", file=sys.stderr)
                    return 2
                answer = input(f"Delete every topic of the local broker in {home}? [y/N] ")
                if answer.strip().lower() not in ("y", "yes"):
                    print("Nothing deleted.")
                    return 1
            wiped = broker.reset()
            print("Local broker storage deleted." if wiped else "No local broker storage.")
            return 0
        if fresh and action in ("start", "restart") and broker.status() is not None:
            broker.stop()
        if action in ("stop", "restart"):
            stopped = broker.stop()
            if action == "stop":
                print("Kafka broker stopped." if stopped else "No Kafka broker was running.")
                return 0
        if action in ("start", "restart"):
            running = broker.status()
            if running is not None:
                print(f"Kafka broker already running at {running} (logs: {broker.log_file})")
                return 0
            kept = broker.formatted and not fresh
            print("Starting Kafka broker" + (" (keeping its topics)…" if kept else "…"),
                  file=sys.stderr, flush=True)
            addr = broker.start(fresh=fresh)
            print(f"Kafka broker ready at {addr} (logs: {broker.log_file})")
            return 0
        if action == "status":
            running = broker.status()
            if running is None:
                print("Kafka broker not running.")
                return 1
            print(f"Kafka broker running at {running} (logs: {broker.log_file})")
            return 0
    except InfrastructureError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"error: unknown broker action {action!r} (use start|stop|status|restart|reset)",
          file=sys.stderr)  # fmt: skip
    return 2


# --------------------------------------------------------------------- helpers


def terminate(pid: int, alive: Callable[[int], bool], timeout: float, what: str) -> None:
    """SIGTERM (a controlled shutdown), SIGKILL after ``timeout``; gone, or an error."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not wait_exit(pid, alive, timeout):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if not wait_exit(pid, alive, 10):
            raise InfrastructureError(f"{what} pid {pid} survived SIGKILL")


def wait_exit(pid: int, alive: Callable[[int], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.1)
    return not alive(pid)


def _require_tool(name: str, hint: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise InfrastructureError(f"`{name}` not found on PATH. {hint}")
    return path


def _require_java() -> str:
    java = _require_tool(
        "java", f"Kafka needs Java {MIN_JAVA}+: apt-get install -y openjdk-17-jre-headless"
    )
    res = subprocess.run([java, "-version"], capture_output=True, text=True, check=False)
    m = re.search(r'version "(\d+)(?:\.(\d+))?', res.stderr + res.stdout)
    if m is not None:
        major = int(m.group(2)) if m.group(1) == "1" else int(m.group(1))  # "1.8" is Java 8
        if major < MIN_JAVA:
            raise InfrastructureError(
                f"Kafka 4 needs Java {MIN_JAVA}+, found Java {major} at {java}: "
                "apt-get install -y openjdk-17-jre-headless"
            )
    return java


def _cluster_id() -> str:
    # Same shape as `kafka-storage random-uuid` (base64url of 16 random bytes),
    # without paying for a JVM start. Kafka also avoids a leading '-'.
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid


def _free_ports(n: int) -> list[int]:
    # Hold all sockets open together so the ports are distinct; the short race
    # until Kafka binds them is acceptable for a dev/test broker.
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((_HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    # Reap it first if it is our own exited child; a zombie still "exists" for kill(0).
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    stat = _read(Path(f"/proc/{pid}/stat"))
    if stat is not None:
        state = stat.rpartition(")")[2].split()[:1]
        return state != ["Z"]
    return True


def _cmdline(pid: int) -> str | None:
    """The process command line, or None if it cannot be read on this OS."""
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except FileNotFoundError:
        if Path("/proc/self").exists():
            return ""  # Linux and the process just vanished
    except OSError:
        return None
    res = subprocess.run(  # macOS and other systems without /proc
        ["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True, check=False
    )
    return res.stdout if res.returncode == 0 else None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except (FileNotFoundError, NotADirectoryError):
        return None


def _tail_text(text: str, n: int) -> str:
    return "\n".join(text.splitlines()[-n:])


def _strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _prop_escape(value: str) -> str:
    # Java .properties treats backslash as an escape character.
    return value.replace("\\", "\\\\")
