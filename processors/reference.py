"""Reference data and QA rules as plain values (no I/O beyond parsing a mapping)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from revline.core.config_files import read_yaml
from revline.core.errors import ConfigurationError

SEVERITIES = ("P1", "P2", "P3")
OWNERS = ("revenue_ops", "finance", "integrations")


@dataclass(frozen=True)
class Product:
    sku: str
    family: str
    name: str
    list_prices: Mapping[str, int]  # currency -> unit list price in minor units


@dataclass(frozen=True)
class ReferenceData:
    version: str
    products: Mapping[str, Product] = field(default_factory=dict)
    campaigns: frozenset[str] = frozenset()
    channels: frozenset[str] = frozenset()

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> ReferenceData:
        try:
            products = {
                p["sku"]: Product(
                    sku=p["sku"],
                    family=p["family"],
                    name=p.get("name", p["sku"]),
                    list_prices={str(c): int(v) for c, v in p["list_prices"].items()},
                )
                for p in data.get("products", [])
            }
            return cls(
                version=str(data["version"]),
                products=products,
                campaigns=frozenset(c["campaign_id"] for c in data.get("campaigns", [])),
                channels=frozenset(c["channel_id"] for c in data.get("channels", [])),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigurationError(f"reference data is malformed: {exc!r}") from exc


@dataclass(frozen=True)
class CheckSpec:
    check_id: str
    severity: str
    owner: str


@dataclass(frozen=True)
class Rules:
    version: str
    price_tolerance_bps: int
    discount_family_bps: Mapping[str, int]
    discount_sku_bps: Mapping[str, int]
    hold_timeout_seconds: float
    checks: Mapping[str, CheckSpec]
    sla_minutes: Mapping[str, int]

    def discount_tolerance_bps(self, sku: str, family: str | None) -> int:
        if sku in self.discount_sku_bps:
            return self.discount_sku_bps[sku]
        return self.discount_family_bps.get(family or "", 0)

    def spec(self, check_id: str) -> CheckSpec:
        return self.checks[check_id]

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Rules:
        odd = _non_finite(data)
        if odd:  # refused here, so `rules validate` says so, not the worker or backtest later
            raise ConfigurationError(f"{'; '.join(odd[:5])}: give a finite number")
        try:
            checks = {
                check_id: CheckSpec(check_id, str(spec["severity"]), str(spec["owner"]))
                for check_id, spec in data["checks"].items()
            }
            tolerance = data.get("discount_tolerance_bps", {})
            rules = cls(
                version=str(data["version"]),
                price_tolerance_bps=int(data.get("price_tolerance_bps", 0)),
                discount_family_bps={k: int(v) for k, v in tolerance.get("families", {}).items()},
                discount_sku_bps={k: int(v) for k, v in tolerance.get("skus", {}).items()},
                hold_timeout_seconds=float(data.get("hold_timeout_seconds", 900)),
                checks=checks,
                sla_minutes={k: int(v) for k, v in data["sla_minutes"].items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigurationError(f"rules file is malformed: {exc!r}") from exc
        for spec in checks.values():
            if spec.severity not in SEVERITIES or spec.owner not in OWNERS:
                raise ConfigurationError(
                    f"check {spec.check_id}: severity must be one of {SEVERITIES} and owner "
                    f"one of {OWNERS}, got {spec.severity}/{spec.owner}"
                )
        return rules


def load_yaml(path: Path) -> Mapping[str, Any]:
    # Every caller (the worker, the exception manager, the backtest, the CLI) gets one
    # ConfigurationError naming the file, whatever the bytes are.
    data = read_yaml(path)
    if not isinstance(data, Mapping):
        raise ConfigurationError(f"{path} must hold a mapping at the top level")
    return data


def _non_finite(data: Any, where: str = "") -> list[str]:
    """Where ``data`` (parsed YAML) holds .nan or .inf: no rule means anything with them,
    and every comparison with nan is false, so a check would silently never fire."""
    if isinstance(data, float) and not math.isfinite(data):
        return [f"{where or 'the document'} is {data}"]
    items: Iterable[tuple[Any, Any]] = ()
    if isinstance(data, dict):
        items = data.items()
    elif isinstance(data, list):
        items = enumerate(data)
    found: list[str] = []
    for key, value in items:
        found += _non_finite(value, f"{where}.{key}" if where else str(key))
    return found
