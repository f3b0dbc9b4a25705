"""A local Schema Registry (Apicurio Registry) for development and tests.

Revline talks to a schema registry through confluent-kafka's client and the Confluent
wire framing. Apicurio Registry serves that API under ``/apis/ccompat/v7`` and is
published on Maven Central as a ready-to-run Quarkus distribution, so like the local
Kafka broker (``revline/tools/broker.py``) it runs from a Maven download
(``broker_dist/registry-pom.xml``) with the system ``java`` 17, detached in its own
session. Its state lives in ``home``:

    home/lib/                   the distribution (or a shared ``jars_dir``), fetched once
    home/config/application.properties   its settings (0600: may hold the password)
    home/data/                  storage (an H2 database file): kept across stop/start, so
                                schema ids stay valid for records already in Kafka; wiped
                                by ``start(fresh=True)`` or ``reset()``
    home/registry.log           the registry's log (previous run kept as registry.log.prev)
    home/registry.json          port and whether basic auth is on
    home/secrets/revline.password   the basic-auth password (0600), never printed
    home/client.env             SCHEMA_REGISTRY_URL (+ basic auth) to source
    home/registry.pid

With ``auth=True`` every API call needs HTTP basic auth as ``revline`` (Quarkus'
embedded user store; no OIDC server needed); without it the API is open, on 127.0.0.1
only. A new registry's global compatibility is FULL, the policy Revline's own catalog
follows (``schemas/_compat.py``), instead of Apicurio's default NONE.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from revline.core.errors import InfrastructureError
from revline.tools.broker import (
    _cmdline,
    _free_ports,
    _locked,
    _pid_alive,
    _port_open,
    _read,
    _require_tool,
    _strip_ansi,
    _tail_text,
    _write_private,
    terminate,
)
from revline.tools.broker import default_home as _kafka_home

POM = Path(__file__).parent / "broker_dist" / "registry-pom.xml"
CCOMPAT_PATH = "/apis/ccompat/v7"
USER = "revline"
GLOBAL_COMPATIBILITY = "FULL"
MIN_JAVA = 17
_MARKER = ".revline-apicurio-version"
_META = "registry.json"
_HOST = "127.0.0.1"
_ID_PROPERTY = "-Drevline.registry.home="


def default_home(cwd: Path | None = None) -> Path:
    """``<git root or cwd>/.revline/registry``, beside the local broker's state."""
    return _kafka_home(cwd).with_name("registry")


def apicurio_version(pom: Path = POM) -> str:
    m = re.search(r"<apicurio\.version>([^<]+)</apicurio\.version>", pom.read_text())
    if m is None:
        raise InfrastructureError(f"{pom} has no <apicurio.version> property")
    return m.group(1).strip()


class LocalRegistry:
    """Manages one Apicurio Registry whose state lives in ``home``.

    ``jars_dir`` lets several homes (e.g. a test session's) share one download;
    ``auth`` turns basic auth on or off at the next start (None: as last time).
    """

    def __init__(self, home: Path, *, jars_dir: Path | None = None,
                 auth: bool | None = None) -> None:
        self.home = Path(home).absolute()
        self.lib = Path(jars_dir).absolute() if jars_dir is not None else self.home / "lib"
        self.log_file = self.home / "registry.log"
        self.pid_file = self.home / "registry.pid"
        self.meta_file = self.home / _META
        self.config_file = self.home / "config" / "application.properties"
        self.data_dir = self.home / "data"
        self.password_file = self.home / "secrets" / f"{USER}.password"
        self.client_env = self.home / "client.env"
        self._wanted_auth = auth
        # Only set when this process launched the JVM, so we can reap it.
        self._proc: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ jars

    def ensure_jars(self) -> Path:
        """Fetch and unpack the registry with Maven unless the marker shows it is current."""
        expected = self._marker_text()
        marker = self.lib / _MARKER
        if _read(marker) == expected:
            return self.lib
        mvn = _require_tool(
            "mvn", "Maven is needed once to fetch Apicurio Registry: apt-get install -y maven"
        )
        self.lib.parent.mkdir(parents=True, exist_ok=True)
        with _locked(self.lib.with_name(self.lib.name + ".lock")):
            if _read(marker) == expected:
                return self.lib
            # Fetch and unpack beside the target, then swap: an interrupted fetch never
            # leaves a half-filled lib that looks usable.
            staging = self.lib.with_name(f"{self.lib.name}.tmp-{os.getpid()}")
            shutil.rmtree(staging, ignore_errors=True)
            cmd = [
                mvn, "-q", "-B", "-f", str(POM), "dependency:copy",
                f"-DoutputDirectory={staging}",
            ]  # fmt: skip
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            archives = sorted(staging.glob("apicurio-registry-app-*.tar.gz"))
            if res.returncode != 0 or not archives:
                shutil.rmtree(staging, ignore_errors=True)
                out = _strip_ansi(res.stdout + res.stderr).strip()
                raise InfrastructureError(
                    f"Maven could not fetch Apicurio Registry (exit {res.returncode}); "
                    f"it needs access to Maven Central.\n{_tail_text(out, 30)}"
                )
            try:
                with tarfile.open(archives[0]) as tar:
                    tar.extractall(staging, filter="data")
            except (tarfile.TarError, OSError) as exc:
                shutil.rmtree(staging, ignore_errors=True)
                raise InfrastructureError(
                    f"cannot unpack {archives[0].name}: {exc}") from exc
            archives[0].unlink()
            if not any(staging.glob("*-runner.jar")):
                shutil.rmtree(staging, ignore_errors=True)
                raise InfrastructureError(
                    f"{archives[0].name} has no *-runner.jar: not a runnable registry")
            (staging / _MARKER).write_text(expected)
            shutil.rmtree(self.lib, ignore_errors=True)
            staging.rename(self.lib)
        return self.lib

    def _marker_text(self) -> str:
        digest = hashlib.sha256(POM.read_bytes()).hexdigest()[:16]
        return f"apicurio={apicurio_version()} pom={digest}\n"

    def _runner(self) -> Path:
        jars = sorted(self.lib.glob("*-runner.jar"))
        if not jars:
            raise InfrastructureError(f"no Apicurio runner jar in {self.lib}")
        return jars[0]

    # --------------------------------------------------------------- queries

    def _meta(self) -> dict[str, Any]:
        try:
            data = json.loads(_read(self.meta_file) or "{}")
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    @property
    def port(self) -> int | None:
        port = self._meta().get("port")
        return int(port) if port else None

    @property
    def auth(self) -> bool:
        """Basic auth required (as configured by the last start)."""
        return bool(self._meta().get("auth", False))

    @property
    def url(self) -> str | None:
        """The Confluent-compatible API root (SCHEMA_REGISTRY_URL), from the last start."""
        port = self.port
        return f"http://{_HOST}:{port}{CCOMPAT_PATH}" if port else None

    @property
    def user_info(self) -> str | None:
        """``revline:<password>`` for SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO, if auth is on."""
        if not self.auth:
            return None
        password = (_read(self.password_file) or "").strip()
        return f"{USER}:{password}" if password else None

    def client_config(self) -> dict[str, Any]:
        """The registry client's config (``schemas.registry_client``) for this registry."""
        url = self.url
        if url is None:
            raise InfrastructureError(f"no local registry configured in {self.home}")
        config: dict[str, Any] = {"url": url}
        if self.user_info is not None:
            config["basic.auth.user.info"] = self.user_info
        return config

    def env(self) -> dict[str, str]:
        """Revline's settings for this registry (what ``client.env`` holds)."""
        config = self.client_config()
        env = {"SCHEMA_REGISTRY_URL": str(config["url"])}
        if "basic.auth.user.info" in config:
            env["SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO"] = str(config["basic.auth.user.info"])
        return env

    @property
    def created(self) -> bool:
        """Storage and its port exist from an earlier start."""
        return self.port is not None and any(self.data_dir.glob("*.mv.db"))

    def status(self) -> str | None:
        """The API URL if our registry process is alive and its port answers."""
        pid = self._live_pid()
        port, url = self.port, self.url
        if pid is None or port is None or url is None:
            return None
        return url if _port_open(_HOST, port) else None

    # ------------------------------------------------------------- lifecycle

    def start(self, timeout: float = 90, *, fresh: bool = False) -> str:
        """Start the registry and wait until its Confluent-compatible API answers.

        Storage (schemas and their ids), port and password are kept from the last
        start; ``fresh=True`` wipes them. Returns the API URL. If the registry of this
        home already runs (with the wanted auth), returns its URL instead.
        """
        self.home.mkdir(parents=True, exist_ok=True)
        with _locked(self.home / ".lock"):
            running = self.status()
            auth = self.auth if self._wanted_auth is None else self._wanted_auth
            if running is not None and auth == self.auth and not fresh:
                return running
            if self._live_pid() is not None:
                self._stop_locked(timeout=15)  # wedged, other auth, or fresh
            java = _require_java()
            self.ensure_jars()
            runner = self._runner()
            port = None if fresh or not self.created else self.port
            if port is None:
                shutil.rmtree(self.data_dir, ignore_errors=True)
                port = _free_ports(1)[0]
            elif _port_open(_HOST, port):
                raise InfrastructureError(
                    f"port {port} of the local registry in {self.home} is taken by another "
                    "process; free it, or start on new storage and a new port with "
                    "`revline registry start --fresh` (this deletes every schema)"
                )
            new_storage = not any(self.data_dir.glob("*.mv.db"))
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._write_config(port, auth, fresh)
            if self.log_file.exists():
                self.log_file.replace(self.log_file.with_name("registry.log.prev"))
            cmd = [
                # C1 only and the serial collector: about half the start time on a small,
                # busy machine, plenty for a development registry.
                java, "-Xms64m", "-Xmx384m", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC",
                "-Djava.awt.headless=true",
                f"{_ID_PROPERTY}{self.home}",  # identifies our process (see _live_pid)
                "-jar", str(runner),
            ]  # fmt: skip
            with self.log_file.open("wb") as out:
                self._proc = subprocess.Popen(
                    cmd,
                    cwd=self.home,  # Quarkus reads ./config/application.properties
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # survives the CLI exiting and its Ctrl-C
                )
            self.pid_file.write_text(f"{self._proc.pid}\n")
            url = self.url
            assert url is not None
            try:
                self._wait_ready(time.monotonic() + timeout)
                if new_storage:
                    self._request("PUT", "/config", {"compatibility": GLOBAL_COMPATIBILITY})
            except BaseException:
                # Never leave a half-started registry behind (also on Ctrl-C).
                self._stop_locked(timeout=10)
                raise
            return url

    def stop(self, timeout: float = 30) -> bool:
        """SIGTERM (clean shutdown), SIGKILL after ``timeout``. True if one was running."""
        if not self.home.is_dir():
            return False
        with _locked(self.home / ".lock"):
            return self._stop_locked(timeout)

    def reset(self) -> bool:
        """Stop the registry if it runs and delete its storage; True if there was any."""
        if not self.home.is_dir():
            return False
        with _locked(self.home / ".lock"):
            self._stop_locked(timeout=30)
            existed = self.data_dir.exists()
            shutil.rmtree(self.data_dir, ignore_errors=True)
            return existed

    def _stop_locked(self, timeout: float) -> bool:
        pid = self._live_pid()
        if pid is None:
            return False
        terminate(pid, self._alive, timeout, "Schema registry")
        self.pid_file.unlink(missing_ok=True)
        self._proc = None
        return True

    def _alive(self, pid: int) -> bool:
        # Reap our own child through Popen so it knows the JVM ended (no zombie).
        if self._proc is not None and self._proc.pid == pid:
            return self._proc.poll() is None
        return _pid_alive(pid)

    def _live_pid(self) -> int | None:
        """The pid from the pid file if that process is alive *and* is our registry
        (checked by its command line, against pid reuse). Stale files are removed."""
        text = _read(self.pid_file)
        if text is None:
            return None
        try:
            pid = int(text.strip())
        except ValueError:
            pid = -1
        if pid > 0 and self._alive(pid):
            if self._proc is not None and self._proc.pid == pid:
                return pid  # our child; /proc may still show Python's command line
            cmdline = _cmdline(pid)
            if cmdline is None or f"{_ID_PROPERTY}{self.home} " in cmdline + " ":
                return pid
        self.pid_file.unlink(missing_ok=True)
        return None

    # ------------------------------------------------------------ internals

    def _write_config(self, port: int, auth: bool, fresh: bool) -> None:
        props = {
            "quarkus.http.host": _HOST,
            "quarkus.http.port": str(port),
            # A file database instead of the default in-memory one: schema ids must stay
            # valid for the records already written with them.
            "apicurio.datasource.url": f"jdbc:h2:file:{self.data_dir / 'registry'}",
            # Only the API; no browser UI is served from here anyway.
            "quarkus.http.cors": "false",
        }
        password = None
        if auth:
            password = None if fresh else (_read(self.password_file) or "").strip() or None
            password = password or secrets.token_urlsafe(18)
            _write_private(self.password_file, password + "\n")
            props.update({
                # Apicurio 3 accepts HTTP basic auth against Quarkus' embedded user store
                # (no OIDC server); anonymous reads stay refused.
                "quarkus.http.auth.basic": "true",
                "quarkus.security.users.embedded.plain-text": "true",
                f"quarkus.security.users.embedded.users.{USER}": password,
                f"quarkus.security.users.embedded.roles.{USER}": "sr-admin",
            })
        _write_private(self.config_file,
                       "".join(f"{k}={_prop_escape(v)}\n" for k, v in props.items()))
        _write_private(self.meta_file, json.dumps({"port": port, "auth": auth}) + "\n")
        env = {"SCHEMA_REGISTRY_URL": f"http://{_HOST}:{port}{CCOMPAT_PATH}"}
        if password is not None:
            env["SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO"] = f"{USER}:{password}"
        _write_private(self.client_env,
                       "".join(f"{k}={shlex.quote(v)}\n" for k, v in env.items()))

    def _request(self, method: str, path: str, body: Any = None,
                 timeout: float = 10) -> Any:
        """One call to the Confluent-compatible API as this registry's client."""
        url = self.url
        assert url is not None
        req = urllib.request.Request(
            url + path, method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/vnd.schemaregistry.v1+json"},
        )
        if self.user_info is not None:
            token = base64.b64encode(self.user_info.encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read() or b"null")

    def _wait_ready(self, deadline: float) -> None:
        last = ""
        while time.monotonic() < deadline:
            assert self._proc is not None
            code = self._proc.poll()
            if code is not None:
                raise InfrastructureError(
                    f"Schema registry exited with code {code} during startup.\n"
                    f"{self._log_tail()}"
                )
            try:
                # The API itself, not just the health endpoint: storage is up and the
                # credentials are accepted.
                self._request("GET", "/subjects", timeout=2)
                return
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code} from {self.url}/subjects"
                if exc.code in (401, 403):
                    raise InfrastructureError(
                        f"Schema registry refused its own credentials ({last}).\n"
                        f"{self._log_tail()}") from exc
            except (OSError, ValueError) as exc:  # not listening yet
                last = str(exc)
            time.sleep(0.2)
        raise InfrastructureError(
            f"Schema registry at {self.url} not ready within the timeout ({last}).\n"
            f"{self._log_tail()}"
        )

    def _log_tail(self, n: int = 30) -> str:
        return (f"--- last {n} lines of {self.log_file} ---\n"
                + _tail_text(_read(self.log_file) or "(empty)", n))


def registry_command(action: str, home: Path, *, auth: bool = False,
                     fresh: bool = False) -> int:
    """``revline registry start|stop|status|restart``; returns the exit code."""
    registry = LocalRegistry(home, auth=auth if action in ("start", "restart") else None)
    try:
        if action in ("stop", "restart"):
            stopped = registry.stop()
            if action == "stop":
                print("Schema registry stopped." if stopped
                      else "No schema registry was running.")
                return 0
        if action in ("start", "restart"):
            kept = registry.created and not fresh
            print("Starting the schema registry (Apicurio)"
                  + (" (keeping its schemas)…" if kept else "…"), flush=True,
                  file=sys.stderr)
            began = time.monotonic()
            started = registry.start(fresh=fresh)
            print(f"Schema registry ready at {started} in {time.monotonic() - began:.0f} s"
                  + (", basic auth on" if registry.auth else "")
                  + f" (log: {registry.log_file})")
            print(f"Client settings: set -a; . {registry.client_env}; set +a")
            return 0
        if action == "status":
            running = registry.status()
            if running is None:
                print("Schema registry not running.")
                return 1
            print(f"Schema registry running at {running}"
                  + (" (basic auth)" if registry.auth else "")
                  + f" (log: {registry.log_file}; settings: {registry.client_env})")
            return 0
    except InfrastructureError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"error: unknown registry action {action!r} (use start|stop|status|restart)",
          file=sys.stderr)
    return 2


def _require_java() -> str:
    java = _require_tool(
        "java", f"Apicurio Registry needs Java {MIN_JAVA}+: "
        "apt-get install -y openjdk-17-jre-headless"
    )
    res = subprocess.run([java, "-version"], capture_output=True, text=True, check=False)
    m = re.search(r'version "(\d+)(?:\.(\d+))?', res.stderr + res.stdout)
    if m is not None:
        major = int(m.group(2)) if m.group(1) == "1" else int(m.group(1))
        if major < MIN_JAVA:
            raise InfrastructureError(
                f"Apicurio Registry 3.0 needs Java {MIN_JAVA}+, found Java {major} at {java}: "
                "apt-get install -y openjdk-17-jre-headless"
            )
    return java


def _prop_escape(value: str) -> str:
    # Java .properties: backslash escapes; ':' and '=' are fine in a value.
    return value.replace("\\", "\\\\")


def main(argv: list[str] | None = None) -> int:
    """``python -m revline.tools.registry_server start|stop|status|restart [--auth] [--fresh]``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m revline.tools.registry_server",
        description="A local Schema Registry (Apicurio, Confluent-compatible API) in "
                    "<git root>/.revline/registry.")
    parser.add_argument("action", choices=["start", "stop", "status", "restart"],
                        help="stop/start/restart keep the registered schemas and their ids")
    parser.add_argument("--auth", action="store_true",
                        help="with start/restart: require HTTP basic auth (user revline, a "
                             "generated password in the client.env to source)")
    parser.add_argument("--fresh", action="store_true",
                        help="with start/restart: delete every schema and pick a new port")
    args = parser.parse_args(argv)
    return registry_command(args.action, default_home(), auth=args.auth, fresh=args.fresh)


if __name__ == "__main__":
    sys.exit(main())
