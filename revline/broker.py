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
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from revline.errors import InfrastructureError

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
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not self._wait_exit(pid, timeout):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if not self._wait_exit(pid, 10):
                raise InfrastructureError(f"Kafka broker pid {pid} survived SIGKILL")
        self._cleanup_run_files()
        return True

    def _wait_exit(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._alive(pid):
                return True
            time.sleep(0.1)
        return not self._alive(pid)

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

        from revline.kafka_config import client_config

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
    if start_if_missing:
        return broker.start(), True
    raise InfrastructureError(
        "No Kafka broker: run `revline broker start` for a local one, "
        "or set KAFKA_BOOTSTRAP_SERVERS=host:port for an existing cluster."
    )


def broker_command(action: str, home: Path, *, fresh: bool = False, yes: bool = False) -> int:
    """``revline broker start|stop|status|restart|reset``; returns the exit code."""
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
