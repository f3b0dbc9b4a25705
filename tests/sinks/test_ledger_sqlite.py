"""The ledger contract on SQLite (a file per test), plus what is SQLite-only or backend-free."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from revline.core.errors import ConfigurationError
from revline.sinks._protocols import TransientSinkError
from revline.sinks.ledger import DEFAULT_RULES_FILE, PostingRules, SqlLedger, load_posting_rules

try:  # tests/sinks may or may not become a package
    from .ledger_contract import LedgerContract, invoice
except ImportError:
    from ledger_contract import LedgerContract, invoice  # type: ignore[no-redef]


class TestSqliteLedger(LedgerContract):
    @pytest.fixture
    def ledger(self, tmp_path: Path) -> Iterator[SqlLedger]:
        with SqlLedger(f"sqlite:///{tmp_path}/ledger.db") as ledger:
            assert ledger.dialect == "sqlite"
            yield ledger


def test_in_memory_ledger_keeps_its_data(tmp_path: Path) -> None:
    with SqlLedger("sqlite://") as ledger:
        ledger.post([invoice("SO-1", 100, 20)])
        assert ledger.balances()[("accounts_receivable", "EUR")] == 120


def test_creates_the_directory_of_a_new_database_file(tmp_path: Path) -> None:
    with SqlLedger(f"sqlite:///{tmp_path}/a/b/ledger.db") as ledger:
        ledger.post([invoice("SO-1", 100, 20)])
    assert (tmp_path / "a" / "b" / "ledger.db").exists()


def test_unopenable_database_is_transient(tmp_path: Path) -> None:
    (tmp_path / "dir.db").mkdir()  # a directory where the file should be
    with pytest.raises(TransientSinkError, match="unavailable"):
        SqlLedger(f"sqlite:///{tmp_path}/dir.db")


def test_unsupported_url_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="not supported"):
        SqlLedger("mysql://localhost/x")


def test_changing_an_account_kind_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/ledger.db"
    SqlLedger(url).close()
    rules = load_posting_rules()
    raw = _rules_mapping()
    raw["accounts"]["refunds"]["kind"] = "expense"
    changed = PostingRules.from_mapping(raw)
    assert changed.account("refunds") != rules.account("refunds")
    with pytest.raises(ConfigurationError, match="refunds"):
        SqlLedger(url, changed)


# -- posting rules (backend-free) ----------------------------------------------------


def _rules_mapping() -> dict:  # type: ignore[type-arg]
    import yaml

    return yaml.safe_load(DEFAULT_RULES_FILE.read_text())  # type: ignore[no-any-return]


def test_packaged_rules_cover_every_event_type() -> None:
    from revline.schemas import EVENT_TYPES

    rules = load_posting_rules()
    assert {r.event_type for r in rules.rules} == set(EVENT_TYPES.values())
    actions = {r.event_type: r.action for r in rules.rules}
    assert actions["invoice_issued"] == actions["payment_captured"] == "post"
    assert actions["refund_issued"] == "post" and actions["order_cancelled"] == "reverse"
    inv = rules.rule_for("invoice_issued")
    assert inv is not None
    assert [(ln.side, ln.account, ln.amount) for ln in inv.lines] == [
        ("debit", "accounts_receivable", "total_minor"),
        ("credit", "revenue", "subtotal_minor"),
        ("credit", "tax_payable", "tax_minor"),
    ]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("accounts"), "missing 'accounts'"),
        (lambda d: d["accounts"]["cash"].update(kind="money"), "kind must be one of"),
        (lambda d: d["accounts"].update({"Bad Code": {"name": "x", "kind": "asset"}}), "codes"),
        (lambda d: d["rules"]["invoice_issued"]["lines"][1].update(credit="revnue"),
         "unknown account 'revnue'"),
        (lambda d: d["rules"]["invoice_issued"].update(action="book"), "action must be one of"),
        (lambda d: d["rules"]["payment_captured"].update(lines=[{"debit": "cash", "amount": "x"}]),
         "one debit and one credit"),
        (lambda d: d["rules"]["refund_issued"]["lines"][0].update(credit="cash"),
         "exactly one of"),
        (lambda d: d["rules"]["order_cancelled"].update(reverses=["order_booked"]),
         "no 'post' rule"),
        (lambda d: d["rules"]["order_booked"].update(lines=[]), "unknown key"),
        (lambda d: d.update(extra=1), "unknown key"),
        (lambda d: d["rules"]["invoice_issued"]["lines"][0].update(amount="total minor"),
         "not a field name"),
    ],
)  # fmt: skip
def test_malformed_rules_are_configuration_errors(edit, message) -> None:  # type: ignore[no-untyped-def]
    data = _rules_mapping()
    edit(data)
    with pytest.raises(ConfigurationError, match=message):
        PostingRules.from_mapping(data)


def test_unreadable_rules_file_is_a_configuration_error(tmp_path: Path) -> None:
    bad = tmp_path / "postings.yaml"
    bad.write_text("accounts: [unclosed")
    with pytest.raises(ConfigurationError, match=str(bad)):
        load_posting_rules(bad)
    with pytest.raises(ConfigurationError, match="cannot read"):
        load_posting_rules(tmp_path / "missing.yaml")
    bad.write_text("- a list\n")
    with pytest.raises(ConfigurationError, match="must be a mapping"):
        load_posting_rules(bad)


def test_bench_runs_continue_the_ledgers_timeline(tmp_path: Path) -> None:
    """Each ledger bench run's events start after the journals already there, as a live
    stream's do, so its time-ordered ids append instead of landing between earlier ones."""
    import sqlalchemy as sa

    from revline.sinks.ledger._schema import journals
    from revline.tools.ledger_bench import bench_ledger, ledger_extent

    url = f"sqlite:///{tmp_path}/bench.db"
    assert ledger_extent(url) is None  # no ledger yet
    bench_ledger(url, 40, batch_size=20)
    first = ledger_extent(url)
    assert first is not None and first.journals > 0 and first.latest_occurred_at is not None
    with SqlLedger(url) as ledger, ledger.engine.connect() as conn:
        earlier_ids = set(conn.execute(sa.select(journals.c.id)).scalars())

    bench_ledger(url, 40, batch_size=20)
    with SqlLedger(url) as ledger, ledger.engine.connect() as conn:
        rows = conn.execute(sa.select(journals.c.id, journals.c.occurred_at)).all()
    later = [(jid, at) for jid, at in rows if jid not in earlier_ids]
    assert later
    assert min(at for _, at in later) > first.latest_occurred_at
    assert min(jid for jid, _ in later) > max(earlier_ids)


@pytest.mark.parametrize(("server_text", "transient"), [
    ('FATAL:  password authentication failed for user "revline"', False),
    ('FATAL:  role "nosuchuser" does not exist', False),
    ('FATAL:  database "nosuchdb" does not exist', False),
    ("FATAL:  no pg_hba.conf entry for host", False),
    ("no such table: journals", False),
    ("FATAL:  the database system is starting up", True),
    ("Connection refused\n\tIs the server running on that host", True),
    ("database is locked", True),
])
def test_a_refused_login_is_said_at_once_a_server_away_is_waited_for(
        server_text: str, transient: bool) -> None:
    import sqlalchemy.exc as sa_exc

    from revline.sinks.ledger._errors import is_transient

    error = sa_exc.OperationalError("connect", {}, Exception(
        f'connection failed: connection to server at "127.0.0.1" failed: {server_text}'))
    assert is_transient(error) is transient
