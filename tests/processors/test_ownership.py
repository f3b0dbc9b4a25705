"""Ownership rules: versioned config -> owner, severity, backup owner and SLA per exception."""

from __future__ import annotations

from typing import Any

import pytest

from revline.core.errors import ConfigurationError
from revline.core.settings import DATA_DIR, Settings
from revline.processors.ownership import ExceptionFacts, Ownership, event_amount, load_ownership
from revline.processors.reference import OWNERS, Rules, load_yaml

BUNDLED = load_ownership(DATA_DIR / "ownership.yaml")


def facts(check_id: str, severity: str = "P2", owner: str = "revenue_ops",
          **kw: Any) -> ExceptionFacts:
    return ExceptionFacts(check_id=check_id, severity=severity, owner=owner, **kw)


def test_bundled_config_is_the_settings_default_and_has_the_default_slas() -> None:
    assert Settings(_env_file=None).ownership_file == DATA_DIR / "ownership.yaml"  # type: ignore[call-arg]
    assert BUNDLED.version
    minutes = {s: BUNDLED.assign(facts("x.y", severity=s)).sla_ms / 60_000
               for s in ("P1", "P2", "P3")}
    assert minutes == {"P1": 15, "P2": 120, "P3": 48 * 60}


def test_every_qa_check_gets_a_valid_owner_and_a_different_backup() -> None:
    rules = Rules.from_mapping(load_yaml(DATA_DIR / "rules.yaml"))
    for spec in rules.checks.values():
        a = BUNDLED.assign(facts(spec.check_id, spec.severity, spec.owner))
        assert a.owner in OWNERS and a.backup_owner in OWNERS and a.backup_owner != a.owner
        assert a.version == BUNDLED.version


def test_first_matching_rule_wins_and_unset_fields_keep_the_qa_defaults() -> None:
    a = BUNDLED.assign(facts("reconciliation.invoice_total", "P1", "finance"))
    assert (a.owner, a.severity, a.rule) == ("finance", "P1", "reconciliation")
    big = BUNDLED.assign(facts("reconciliation.invoice_total", "P1", "finance",
                               event_type="invoice_issued", amount_minor=25_000_000,
                               currency="EUR"))
    assert big.rule == "large-money-movements" and big.severity == "P1"
    # Not matched: the QA rules' owner and severity; backup from backup_owners.
    plain = BUNDLED.assign(facts("policy.discount", "P2", "revenue_ops"))
    assert (plain.owner, plain.severity, plain.backup_owner, plain.rule) == (
        "revenue_ops", "P2", "finance", None)


def test_match_by_event_type_source_system_amount_and_currency() -> None:
    own = Ownership.from_mapping({
        "version": "t1",
        "backup_owners": {"revenue_ops": "finance", "finance": "revenue_ops",
                          "integrations": "revenue_ops"},
        "rules": [
            {"name": "big-eur", "match": {"currency": "EUR", "min_amount_minor": 1000},
             "severity": "P1", "backup_owner": "integrations"},
            {"name": "shop", "match": {"check_id": "completeness.*", "source_system": "shopify",
                                       "event_type": ["order_booked", "order_amended"]},
             "owner": "integrations"},
        ],
    })
    assert own.assign(facts("policy.price", amount_minor=1000, currency="EUR")).rule == "big-eur"
    assert own.assign(facts("policy.price", amount_minor=999, currency="EUR")).rule is None
    assert own.assign(facts("policy.price", amount_minor=5000, currency="USD")).rule is None
    assert own.assign(facts("policy.price", amount_minor=None, currency=None)).rule is None
    big = own.assign(facts("policy.price", amount_minor=1000, currency="EUR"))
    assert (big.owner, big.severity, big.backup_owner) == ("revenue_ops", "P1", "integrations")
    shop = own.assign(facts("completeness.sku", "P1", event_type="order_booked",
                            source_system="shopify"))
    assert shop.owner == "integrations" and shop.backup_owner == "revenue_ops"
    assert own.assign(facts("completeness.sku", "P1", event_type="invoice_issued",
                            source_system="shopify")).rule is None
    assert own.assign(facts("completeness.sku", "P1", event_type="order_booked",
                            source_system="salesforce")).rule is None


def test_tiny_slas_and_expiry_for_tests() -> None:
    own = Ownership.from_mapping({
        "version": "fast", "sla_minutes": {"P1": 0.05}, "expire_after_minutes": {"P3": 0.1},
        "backup_owners": {"revenue_ops": "finance", "finance": "revenue_ops",
                          "integrations": "finance"},
    })
    assert own.assign(facts("a", "P1")).sla_ms == 3000
    assert own.assign(facts("a", "P3")).expire_after_ms == 6000
    assert own.assign(facts("a", "P2")).sla_ms == 120 * 60_000  # defaults for the rest


@pytest.mark.parametrize("change, message", [
    ({"rules": [{"match": {"check": "policy.*"}, "owner": "finance"}]}, "unknown keys"),
    ({"rules": [{"match": {"check_id": "policy.*"}, "owner": "sales"}]}, "owner must be"),
    ({"rules": [{"match": {"check_id": "policy.*"}}]}, "sets none of"),
    ({"rules": [{"match": {}, "severity": "P0"}]}, "severity must be"),
    ({"backup_owners": {"revenue_ops": "revenue_ops", "finance": "revenue_ops",
                        "integrations": "finance"}}, "backup_owners.revenue_ops"),
    ({"backup_owners": {"finance": "revenue_ops"}}, "backup_owners.revenue_ops"),
    ({"sla_minutes": {"P1": 0}}, "sla_minutes.P1"),
    ({"version": None, "rules": "nope"}, "malformed"),
])
def test_bad_config_is_refused_with_what_to_change(change: dict[str, Any], message: str) -> None:
    base: dict[str, Any] = {
        "version": "t", "backup_owners": {"revenue_ops": "finance", "finance": "revenue_ops",
                                          "integrations": "revenue_ops"},
    }
    with pytest.raises(ConfigurationError, match=message):
        Ownership.from_mapping({**base, **change})


def test_event_amount() -> None:
    def env(kind: str) -> dict[str, Any]:
        return {"envelope": {"event_type": kind}}

    assert event_amount({**env("invoice_issued"), "total_minor": 500, "currency": "EUR"}) == (
        500, "EUR")
    assert event_amount({**env("payment_captured"), "amount_minor": 7, "currency": "USD"}) == (
        7, "USD")
    assert event_amount(env("order_cancelled")) == (None, None)
    assert event_amount(None) == (None, None)


@pytest.mark.parametrize(("body", "expect"), [
    (bytes(range(128, 256)), "is not UTF-8 text (byte 0)"),
    (b"[" * 100_000, "nested too deeply"),
    (b"key: [unclosed", "cannot read"),
    (b"- a list\n", "must hold a mapping"),
])
def test_any_caller_of_load_yaml_gets_one_configuration_error(
        tmp_path: Any, body: bytes, expect: str) -> None:
    """The worker, the exception manager and the backtest load YAML without the CLI's
    guard: bad bytes are a ConfigurationError naming the file, not a UnicodeDecodeError
    or a RecursionError."""
    path = tmp_path / "rules.yaml"
    path.write_bytes(body)
    with pytest.raises(ConfigurationError) as caught:
        load_yaml(path)
    assert expect in str(caught.value) and str(path) in str(caught.value)
    if b"[" not in body[:1]:
        with pytest.raises(ConfigurationError):
            load_ownership(path)
