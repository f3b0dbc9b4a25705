"""Installs are reproducible: every dependency is pinned in the lock files, and the
environment the tests run in was installed from them (`make lock` re-resolves)."""

from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(lock: str) -> dict[str, str]:
    pins = {}
    for raw in (ROOT / lock).read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if "==" not in line:
            continue
        spec, _, marker = line.partition(";")
        if marker.strip() and not Marker(marker.strip()).evaluate():
            continue
        name, _, version = spec.partition("==")
        pins[_norm(name.split("[")[0])] = version.strip()
    return pins


def _declared(extra: str | None) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + (project["optional-dependencies"][extra] if extra else [])
    return [Requirement(r) for r in reqs]


@pytest.mark.parametrize(("lock", "extra"), [("requirements.lock", None),
                                             ("requirements-dev.lock", "dev")])
def test_every_declared_dependency_is_pinned_within_its_range(lock: str, extra: str | None
                                                              ) -> None:
    pins = _pins(lock)
    for req in _declared(extra):
        if req.marker and not req.marker.evaluate():
            continue
        name = _norm(req.name)
        assert name in pins, f"{req.name} is not in {lock}: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{lock} pins {req.name}=={pins[name]}, outside {req.specifier}: run `make lock`")


def test_the_test_environment_was_installed_from_the_lock() -> None:
    if sys.prefix == sys.base_prefix:
        pytest.skip("not a virtual environment: nothing was installed from the lock")
    drift = {}
    for name, version in _pins("requirements-dev.lock").items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            drift[name] = (version, None)
            continue
        if installed != version:
            drift[name] = (version, installed)
    assert not drift, f"installed versions differ from requirements-dev.lock: {drift}"
