"""A local 3-node KRaft cluster (``revline broker start --nodes 3 [--secure]``) on real jars.

The secured cluster: SASL_SSL with SCRAM-SHA-512, TLS from a generated CA, ACLs; RF 3 and
min.insync.replicas 2; a leader killed with SIGKILL loses nothing acknowledged; stop/start
keeps topics. Then the single-instance components (auditor, exception manager) on a
3-node cluster: killed with SIGKILL while records flow, a standby takes over, the audit
trail has no fork and no exception is lost or duplicated.

Clients here are configured directly from the cluster's ``client.env`` (sourced by a
shell, as a user would), not through Revline's own config builder.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest
import yaml
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from revline.core.readback import CommittedReader, read_topic
from revline.core.settings import DATA_DIR
from revline.operations.verify import finals_by_input
from revline.schemas import exception_codec
from revline.tools.broker import LocalCluster, cluster_home
from revline.tools.isolated import IsolatedPipeline
from revline.tools.workload import WorkloadOptions, generate
from tests._procs import owner_alive
from tests.conftest import SHARED_JARS, STATE_DIR

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

T = TypeVar("T")
PROTECTED = ("revline.audit.v1", "revline.audit-facts.v1", "revline.audit-heads.v1",
             "revline.exceptions.v1", "revline.exception-state.v1", "revline.validated.v1")
INPUT = "revline.events.v1"


def _reap_stale_clusters() -> None:
    """Stop clusters left by test sessions that died before their teardown ran."""
    for state in STATE_DIR.glob("test-cluster-*"):
        try:
            owner = int(state.name.split("-")[2])
        except (IndexError, ValueError):
            continue
        if owner_alive(owner):
            continue
        for home in (state, state / "kafka-cluster"):
            if (home / "cluster.json").is_file():
                LocalCluster(home, jars_dir=SHARED_JARS).stop(timeout=10)
        shutil.rmtree(state, ignore_errors=True)


def _state_dir(kind: str) -> Path:
    _reap_stale_clusters()
    state = STATE_DIR / f"test-cluster-{os.getpid()}-{kind}"
    shutil.rmtree(state, ignore_errors=True)
    (state / "kafka").mkdir(parents=True)
    # The CLI keeps jars in <state>/kafka/lib: share the session's, never re-run Maven.
    (state / "kafka" / "lib").symlink_to(SHARED_JARS.absolute())
    return state


def revline_cli(state: Path, *args: str, env: dict[str, str] | None = None,
                timeout: float = 240) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "REVLINE_"))}
    full |= {"REVLINE_STATE_DIR": str(state), "COLUMNS": "250"} | (env or {})
    return subprocess.run([sys.executable, "-m", "revline.cli", *args], env=full,
                          capture_output=True, text=True, timeout=timeout)


def sourced(env_file: Path) -> dict[str, str]:
    """The variables a shell gets from ``set -a; . env_file``."""
    out = subprocess.run(["bash", "-c", f"set -a; . {env_file}; env -0"], check=True,
                         capture_output=True, env={"PATH": os.environ["PATH"]}).stdout
    pairs = (item.partition("=") for item in out.decode().split("\0") if item)
    return {k: v for k, _, v in pairs if k.startswith("KAFKA_")}


def client_config(env_file: Path, **overrides: Any) -> dict[str, Any]:
    env = sourced(env_file)
    config: dict[str, Any] = {
        "bootstrap.servers": env["KAFKA_BOOTSTRAP_SERVERS"],
        "security.protocol": env["KAFKA_SECURITY_PROTOCOL"],
        "sasl.mechanism": env["KAFKA_SASL_MECHANISM"],
        "sasl.username": env["KAFKA_SASL_USERNAME"],
        "sasl.password": Path(env["KAFKA_SASL_PASSWORD_FILE"]).read_text().strip(),
        "ssl.ca.location": env["KAFKA_SSL_CA_LOCATION"],
    }
    return config | overrides


def eventually(fn: Callable[[], T], ok: Callable[[T], bool], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {value!r}"[:2000])
        time.sleep(0.3)


def produce_all(config: dict[str, Any], topic: str, values: list[bytes],
                ) -> list[KafkaError | None]:
    """Produce ``values`` (keyed by themselves) and return each delivery's error."""
    errors: list[KafkaError | None] = [None] * len(values)
    done: list[int] = []

    def report(i: int) -> Callable[[KafkaError | None, Any], None]:
        def cb(err: KafkaError | None, _msg: Any) -> None:
            errors[i] = err
            done.append(i)
        return cb

    producer = Producer({"message.timeout.ms": 20_000, "log_level": 0} | config)
    for i, value in enumerate(values):
        producer.produce(topic, key=value, value=value, on_delivery=report(i))
    producer.flush(30)
    assert len(done) == len(values), "deliveries not reported"
    return errors


def consume_all(config: dict[str, Any], topic: str, expect: int, timeout: float = 60,
                ) -> list[bytes]:
    consumer = Consumer({"group.id": f"revline-t-{uuid.uuid4().hex[:8]}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False,
                         "log_level": 0} | config)
    values: list[bytes] = []
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + timeout
        while len(values) < expect and time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            values.append(msg.value() or b"")
    finally:
        consumer.close()
    return values


def end_offsets(config: dict[str, Any], topics: list[str] | tuple[str, ...],
                ) -> dict[tuple[str, int], int]:
    consumer = Consumer(config | {"group.id": "revline-t-offsets", "log_level": 0})
    try:
        return {(t, p): consumer.get_watermark_offsets(TopicPartition(t, p), timeout=10)[1]
                for t in topics for p in range(3)}
    finally:
        consumer.close()


# ----------------------------------------------------------------- the secured cluster


@pytest.fixture(scope="class")
def secure() -> Iterator[LocalCluster]:
    state = _state_dir("secure")
    started = time.monotonic()
    run = revline_cli(state, "broker", "start", "--nodes", "3", "--secure")
    took = time.monotonic() - started
    cluster = LocalCluster(cluster_home(state / "kafka"), jars_dir=SHARED_JARS)
    try:
        assert run.returncode == 0, run.stdout + run.stderr
        print(f"secure 3-node cluster started in {took:.1f} s")
        assert f"set -a; . {cluster.client_env}" in run.stdout
        for user in ("revline", "intruder", "revline-admin"):  # passwords never printed
            secret = cluster.password_file(user).read_text().strip()
            assert len(secret) >= 24 and secret not in run.stdout + run.stderr
            assert cluster.password_file(user).stat().st_mode & 0o077 == 0
            assert secret not in cluster.client_env.read_text()
        admin = AdminClient(client_config(cluster.client_env) | {"log_level": 0})
        for name in (INPUT, "revline.chaos.v1", *PROTECTED):
            admin.create_topics([NewTopic(name, 3)])[name].result(timeout=60)
        yield cluster
    finally:
        revline_cli(state, "broker", "stop")
        assert not any(cluster.status_quick()), f"cluster in {state} did not stop"
        shutil.rmtree(state, ignore_errors=True)


class TestSecureCluster:
    def test_status_shows_every_node_and_topics_get_rf_3_min_isr_2(
        self, secure: LocalCluster
    ) -> None:
        state = secure.home.parent
        status = revline_cli(state, "broker", "status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert "Kafka cluster (3 nodes, SASL_SSL): 3 of 3 nodes up" in status.stdout
        for node_id, (port, _) in secure.ports().items():
            assert f"node {node_id}  127.0.0.1:{port}  pid " in status.stdout
        leads = [int(n) for n in re.findall(r"leads (\d+) partitions", status.stdout)]
        assert len(leads) == 3 and sum(leads) >= 3 * (1 + len(PROTECTED))

        admin = AdminClient(client_config(secure.client_env))
        md = admin.list_topics(INPUT, timeout=10).topics[INPUT]
        assert all(len(p.replicas) == 3 for p in md.partitions.values())
        eventually(lambda: [len(p.isrs) for p in
                            admin.list_topics(INPUT, timeout=10).topics[INPUT]
                            .partitions.values()],
                   lambda isrs: isrs == [3, 3, 3], 30, "full ISRs")
        resource = ConfigResource("topic", INPUT)
        configs = admin.describe_configs([resource])[resource].result(timeout=30)
        assert configs["min.insync.replicas"].value == "2"

    def test_revline_produces_and_consumes_over_sasl_ssl(self, secure: LocalCluster) -> None:
        config = client_config(secure.client_env)
        values = [f"order-{i}".encode() for i in range(200)]
        errors = produce_all(config | {"enable.idempotence": True, "acks": "all"}, INPUT,
                             values)
        assert errors == [None] * len(values)
        assert sorted(consume_all(config, INPUT, len(values))) == sorted(values)
        # Revline may write what it vouches for.
        assert produce_all(config, "revline.audit.v1", [b"chained"]) == [None]

    def test_the_intruder_reads_but_cannot_write_audit_or_exception_topics(
        self, secure: LocalCluster
    ) -> None:
        intruder = client_config(secure.intruder_env)
        assert intruder["sasl.username"] == "intruder"
        before = end_offsets(client_config(secure.client_env), PROTECTED)
        for topic in PROTECTED:
            errors = produce_all(intruder, topic, [b"forged"])
            assert errors[0] is not None, topic
            assert errors[0].code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, (topic, errors)
        # It may publish input events (an upstream producer) and read them back.
        assert produce_all(intruder, INPUT, [b"from-upstream"]) == [None]
        seen = consume_all(intruder | {"group.id": f"intruder-{uuid.uuid4().hex[:6]}"},
                           INPUT, sum(end_offsets(intruder, [INPUT]).values()))
        assert b"from-upstream" in seen
        # Nothing forged reached the protected topics.
        assert end_offsets(client_config(secure.client_env), PROTECTED) == before

    def test_a_wrong_password_fails_within_seconds(self, secure: LocalCluster) -> None:
        errors: list[KafkaError] = []
        config = client_config(secure.client_env, **{"sasl.password": "not-the-password"})
        started = time.monotonic()
        admin = AdminClient(config | {"error_cb": errors.append, "log_level": 0})
        # The client connects at once; no request is needed to learn it was refused.
        eventually(lambda: (admin.poll(0.1), errors)[1], bool, 10, "an error callback")
        took = time.monotonic() - started
        print(f"wrong password refused after {took:.1f} s")
        assert errors[0].code() == KafkaError._AUTHENTICATION, errors[0]
        assert "Authentication failed" in errors[0].str(), errors[0].str()
        assert took < 10

    def test_killing_a_partition_leader_loses_nothing_acknowledged(
        self, secure: LocalCluster
    ) -> None:
        topic = "revline.chaos.v1"
        config = client_config(secure.client_env)
        producer = Producer(config | {"enable.idempotence": True, "acks": "all",
                                      "linger.ms": 5, "message.timeout.ms": 120_000,
                                      "log_level": 0})
        acked: list[tuple[int, float]] = []
        failed: list[KafkaError] = []
        lock = threading.Lock()

        def delivered(err: KafkaError | None, msg: Any) -> None:
            with lock:
                if err is None:
                    acked.append((int(msg.value()), time.monotonic()))
                else:
                    failed.append(err)

        stop = threading.Event()
        sent = [0]

        def pump() -> None:
            while not stop.is_set():
                producer.produce(topic, value=str(sent[0]).encode(), partition=sent[0] % 3,
                                 on_delivery=delivered)
                sent[0] += 1
                producer.poll(0.01)  # ~100 records/s
            producer.flush(120)

        thread = threading.Thread(target=pump, daemon=True)
        thread.start()
        eventually(lambda: len(acked), lambda n: n > 200, 30, "acknowledged records")
        victim = secure.leader_of(topic, 0)
        secure.kill(victim)
        killed_at = time.monotonic()
        # acks=all with min ISR 2 of 3: after the election, partition 0 takes writes again.
        eventually(lambda: [t for v, t in acked if v % 3 == 0 and t > killed_at + 0.5],
                   lambda late: len(late) > 20, 60, "acknowledged writes after the kill")
        new_leader = secure.leader_of(topic, 0)
        assert new_leader not in (victim, -1)
        recovered = min(t for v, t in acked if v % 3 == 0 and t > killed_at) - killed_at
        secure.start_node(victim)
        admin = AdminClient(config)
        eventually(lambda: [len(p.isrs) for p in
                            admin.list_topics(topic, timeout=10).topics[topic]
                            .partitions.values()],
                   lambda isrs: isrs == [3, 3, 3], 90, "the restarted node back in every ISR")
        stop.set()
        thread.join(150)
        assert not thread.is_alive()
        print(f"leader {victim} killed: partition 0 acknowledged writes again after "
              f"{recovered:.1f} s; {len(acked)} acknowledged")
        assert failed == []
        values = [int(v) for v in consume_all(config, topic, len(acked), timeout=90)]
        counts = Counter(values)
        lost = {v for v, _ in acked} - set(counts)
        assert lost == set(), f"{len(lost)} acknowledged records lost"
        assert [v for v, n in counts.items() if n > 1] == []  # idempotent: no duplicates

    def test_stop_and_start_keep_topics_ports_and_records(self, secure: LocalCluster) -> None:
        state = secure.home.parent
        before = secure.client_env.read_text()
        config = client_config(secure.client_env)
        assert produce_all(config | {"acks": "all"}, INPUT, [b"before-stop"]) == [None]
        stop = revline_cli(state, "broker", "stop")
        assert stop.returncode == 0 and "stopped" in stop.stdout, stop.stdout + stop.stderr
        assert not any(secure.status_quick())
        start = revline_cli(state, "broker", "start", "--nodes", "3", "--secure")
        assert start.returncode == 0, start.stdout + start.stderr
        assert secure.client_env.read_text() == before
        config = client_config(secure.client_env)
        topics = AdminClient(config).list_topics(timeout=30).topics
        assert {INPUT, "revline.chaos.v1", *PROTECTED} <= set(topics)
        records = sum(end_offsets(config, [INPUT]).values())
        assert b"before-stop" in consume_all(config, INPUT, records)
        # Still secured after the restart: the intruder stays refused.
        errors = produce_all(client_config(secure.intruder_env), "revline.audit.v1", [b"x"])
        assert errors[0] is not None
        assert errors[0].code() == KafkaError.TOPIC_AUTHORIZATION_FAILED


# ------------------------------------------------ single-instance components on a cluster
#
# On a plain (PLAINTEXT) 3-node cluster: Revline's components do not read the
# KAFKA_SECURITY_PROTOCOL/KAFKA_SASL_* settings yet, so they cannot join the secured one.


@pytest.fixture(scope="class")
def plain() -> Iterator[LocalCluster]:
    state = _state_dir("plain")
    cluster = LocalCluster(state / "kafka-cluster", nodes=3, secure=False, jars_dir=SHARED_JARS)
    try:
        started = time.monotonic()
        cluster.start()
        print(f"plain 3-node cluster started in {time.monotonic() - started:.1f} s")
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(state, ignore_errors=True)


def host(pipeline: IsolatedPipeline, name: str, **env: str) -> IsolatedPipeline:
    """The same pipeline (topics, groups) as seen from another host: its own state dir."""
    return IsolatedPipeline(pipeline.bootstrap, pipeline.state_dir.parent / name,
                            name=pipeline.name, partitions=pipeline.partitions,
                            extra_env=pipeline.extra_env | env)


def committed_audit(pipeline: IsolatedPipeline, *, committed_only: bool = True,
                    ) -> list[dict[str, Any]]:
    try:
        with CommittedReader(pipeline.bootstrap, pipeline.topic("audit"),
                             committed_only=committed_only) as reader:
            return [orjson.loads(m.value() or b"") for m in reader]
    except Exception:  # not created yet
        return []


def alive_or_killed(*hosts: IsolatedPipeline) -> None:
    for h in hosts:
        for proc in h.procs:
            assert proc.poll() in (None, 0, -9, -15), f"a process died; see {h.state_dir}"


class TestSingleInstanceComponents:
    def test_auditor_standby_takes_over_after_kill_9_and_fences_a_twin_without_a_fork(
        self, plain: LocalCluster, tmp_path: Path
    ) -> None:
        from revline.processors.audit_chain import entries_from_outcome
        from revline.schemas import outcome_codec

        assert plain.bootstrap is not None
        a = IsolatedPipeline(plain.bootstrap, tmp_path / "host-a",
                             extra_env={"REVLINE_BATCH_SIZE": "40"})
        b, c = host(a, "host-b"), host(a, "host-c")
        workload = generate(WorkloadOptions(orders=60, seed=29, out_of_order=0.2, poison=0))
        total = len(workload.records)
        thirds = [workload.records[k * total // 3:(k + 1) * total // 3] for k in range(3)]
        auditor = ("auditor", "--instance", "one", "--metrics-port", "-1", "--batch-size", "20")
        try:
            a.cli("reference", "load")
            a.start_worker()
            # The active auditor dies by SIGKILL inside its 3rd transaction, records sent:
            # the fork a standby must never build on.
            active = a.start(*auditor, "--failpoint-kill-before-commit", "3")
            a.publish(workload, thirds[0])
            eventually(lambda: (alive_or_killed(a), active.poll())[1],
                       lambda rc: rc is not None, 120, "the failpoint's SIGKILL")
            assert active.returncode == -signal.SIGKILL
            a.publish(workload, thirds[1])  # outcomes flow while no auditor runs
            # What the killed auditor committed: the standby must commit past it before the
            # twin starts, or the twin may initialise first and be the one fenced (a CI
            # run's twin started while the standby was still starting).
            before = len(committed_audit(a))
            standby = b.start(*auditor)  # the standby host: same instance id
            eventually(lambda: len(committed_audit(a)), lambda n: n > before, 120,
                       "the standby chaining")
            alive_or_killed(a, b)
            # A twin joins while the standby runs (a split brain): the newer one fences it.
            # The standby learns it at its next transaction, so the last third is sent
            # once the twin has initialised (in CI the standby had chained everything
            # before the twin's fencing and then sat idle, never told).
            c.start(*auditor)
            eventually(lambda: "chaining" in "".join(
                f.read_text(errors="replace") for f in c.state_dir.glob("auditor-*.log")),
                bool, 120, "the twin initialised")
            a.publish(workload, thirds[2])
            a.wait_for(lambda o: len(finals_by_input(o)) >= total, 180,
                       "a final outcome for every input")
            eventually(standby.poll, lambda rc: rc is not None, 90, "the fenced standby to exit")
            assert standby.returncode not in (0, -9)
            outcomes = [outcome_codec().decode(m.value() or b"")
                        for m in read_topic(a.bootstrap, a.topic("outcomes"))]
            expected = {e.fact_id for o in outcomes for e in entries_from_outcome(o)}
            records = eventually(lambda: committed_audit(a),
                                 lambda rs: expected <= {r["fact_id"] for r in rs}, 180,
                                 "every outcome chained")
            verify = revline_cli(a.state_dir, "audit", "verify",
                                 env={k: v for k, v in a.env.items()
                                      if k.startswith(("KAFKA_", "REVLINE_"))})
            written = len(committed_audit(a, committed_only=False))
        finally:
            for h in (a, b, c):
                h.stop_all()
        standby_log = next(b.state_dir.glob("auditor-*.log")).read_text()
        assert "fenced" in standby_log.lower() or "another auditor" in standby_log, \
            standby_log[-3000:]
        # No fork: each fact once, each chain numbered 1..n, and verify recomputes every hash.
        ids = Counter(r["fact_id"] for r in records)
        assert [i for i, n in ids.items() if n > 1] == []
        assert {r["fact_id"] for r in records} == expected
        seqs: dict[str, list[int]] = {}
        for r in records:
            seqs.setdefault(r["chain"], []).append(r["seq"])
        assert all(s == list(range(1, len(s) + 1)) for s in seqs.values())
        assert written > len(records)  # the killed transaction's records: aborted, unseen
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert "complete: all" in verify.stdout, verify.stdout

    def test_exception_manager_standby_takes_over_and_a_second_one_is_refused(
        self, plain: LocalCluster, tmp_path: Path
    ) -> None:
        assert plain.bootstrap is not None
        ownership = yaml.safe_load((DATA_DIR / "ownership.yaml").read_text())
        ownership_file = tmp_path / "ownership.yaml"
        ownership_file.write_text(yaml.safe_dump(ownership))
        a = IsolatedPipeline(plain.bootstrap, tmp_path / "host-a", extra_env={
            "REVLINE_OWNERSHIP_FILE": str(ownership_file),
            "REVLINE_EXCEPTION_CHECK_INTERVAL_S": "0.5",
            "REVLINE_INSTANCE_ID": "manager-1",
        })
        standby_host = host(a, "host-b")  # same instance id: the documented standby
        other = host(a, "host-c", REVLINE_INSTANCE_ID="manager-2")
        workload = generate(WorkloadOptions(
            orders=60, seed=11, run_id=f"x{a.name}", duplicates=0, conflicts=0,
            out_of_order=0, incomplete=0.08, off_policy=0.1, unknown_attribution=0.1,
            amount_mismatch=0.08, poison=0, orphans=0))
        half = len(workload.records) // 2

        def exception_ids() -> set[str]:
            return {exception_codec().decode(m.value() or b"")["exception_id"]
                    for m in read_topic(a.bootstrap, a.topic("exceptions"), missing_ok=True)}

        def states() -> dict[str, dict[str, Any]]:
            from revline.streams.exceptions import read_states
            try:
                return read_states(a.bootstrap, a.topic("exception-state"))
            except Exception:  # not created yet
                return {}

        try:
            a.cli("reference", "load")
            a.start_worker()
            active = a.start("exceptions", "run", log_name="manager")
            a.publish(workload, workload.records[:half])
            eventually(lambda: len(states()), lambda n: n >= 3, 120, "the manager at work")
            active.send_signal(signal.SIGKILL)  # while exceptions flow
            assert active.wait(10) == -signal.SIGKILL
            a.publish(workload, workload.records[half:])
            standby = standby_host.start("exceptions", "run", log_name="manager")
            eventually(lambda: (standby_host.state_dir / "manager-0.log").read_text(),
                       lambda log: "exception manager ready" in log, 90,
                       "the standby to take over")
            # Another manager (not the killed one's instance) waits outside: refused.
            refused = other.start("exceptions", "run", log_name="manager")
            assert refused.wait(120) != 0
            a.wait_for(lambda o: len(finals_by_input(o)) >= len(workload.records), 180,
                       "a final outcome for every input")
            ids = exception_ids()
            current = eventually(states, lambda s: ids <= set(s), 90,
                                 "a state for every exception")
            alive_or_killed(a, standby_host)
            assert standby.poll() is None
        finally:
            for h in (a, standby_host, other):
                h.stop_all()
        refusal = (other.state_dir / "manager-0.log").read_text()
        assert "already running" in refusal, refusal[-3000:]
        assert len(ids) >= 10
        # None lost, none duplicated: one state per exception, opened exactly once.
        assert set(current) == ids
        for i in ids:
            opened = [h for h in current[i]["history"] if h["status"] == "open"]
            assert len(opened) == 1, current[i]["history"]
