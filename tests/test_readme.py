"""The README and docs/ stay true: examples are valid input, the commands and options
shown exist, every setting is documented, and every relative link resolves."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from revline.cli import build_parser
from revline.core.settings import Settings
from revline.schemas import EVENT_MODELS, EventDeserializer, EventSerializer, validate_event

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
DOCS = {p: p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))}
ALL = {ROOT / "README.md": README, **DOCS}
README_MAX_LINES = 250


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


# -- examples ---------------------------------------------------------------------------
def test_every_json_block_is_a_valid_event() -> None:
    for path, text in ALL.items():
        for block in re.findall(r"```json\n(.*?)\n```", text, flags=re.S):
            event = validate_event(json.loads(block))
            assert EventDeserializer().decode(EventSerializer()(event)) == event, _name(path)


def test_every_event_type_has_a_json_example_in_the_wire_contract() -> None:
    text = (ROOT / "docs" / "events.md").read_text()
    seen = {json.loads(block)["envelope"]["event_type"]
            for block in re.findall(r"```json\n(.*?)\n```", text, flags=re.S)}
    assert seen == set(EVENT_MODELS)


# -- the README itself ------------------------------------------------------------------
def test_readme_starts_with_the_two_commands() -> None:
    first = README.split("\n## ", 2)[1]
    assert first.startswith("Two commands")
    assert "make demo" in first and "make test" in first
    makefile = (ROOT / "Makefile").read_text()
    assert "\ndemo:" in makefile and "\ntest:" in makefile


def test_readme_is_read_in_five_minutes() -> None:
    assert len(README.splitlines()) <= README_MAX_LINES


def test_readme_keeps_the_wire_contract_summary() -> None:
    """The id rule and the lifecycle table stay in the README (issue #15)."""
    assert "**Identity and ids.**" in README and "U+007F–U+009F" in README
    assert "| stage | accepts | refuses (check) |" in README
    assert "(docs/events.md)" in README and "(docs/lifecycle.md)" in README


def test_readme_architecture_is_a_mermaid_diagram() -> None:
    diagram = re.search(r"```mermaid\n(.*?)\n```", README, flags=re.S)
    assert diagram is not None
    for part in ("revline worker", "revline sink", "revline auditor", "revline exceptions run",
                 "revline shadow run", "revline reconcile", "revline report", "ledger", "ERP",
                 "Prometheus"):
        assert part in diagram[1], part


def test_report_screenshot_is_small() -> None:
    png = ROOT / "docs" / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size < 300_000


# -- commands and options ---------------------------------------------------------------
def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {opt for action in parser._actions for opt in action.option_strings}


def _command_lines() -> list[tuple[str, str]]:
    """(file, text) of every `revline …` shown: inline code spans and code-block lines."""
    found = []
    for path, text in ALL.items():
        for span in re.findall(r"`(revline [^`]+)`", text):
            found.append((_name(path), span))
        for line in text.splitlines():
            if line.lstrip().startswith("revline ") and not line.startswith(("|", "`")):
                found.append((_name(path), line.strip()))
    return found


def test_documented_commands_and_options_exist() -> None:
    top = build_parser()
    commands = _subparsers(top)
    shown = _command_lines()
    assert len(shown) > 50
    for where, text in shown:
        words = text.split()
        name = words[1]
        assert name in commands, f"{where}: `{text}`: no command {name!r}"
        parser = commands[name]
        actions = _subparsers(parser)
        if actions and len(words) > 2:
            action = re.match(r"[\w-]+", words[2])
            if action and not words[2].startswith("-"):
                assert action[0] in actions, f"{where}: `{text}`: no action {action[0]!r}"
                parser = actions[action[0]]
        known = _options(top) | _options(parser)
        for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", text):
            assert flag in known, f"{where}: `{text}`: revline {name} has no {flag}"


def test_every_command_is_in_the_readme_table() -> None:
    table = {m for m in re.findall(r"^\| `revline ([\w-]+)", README, flags=re.M)}
    assert table == set(_subparsers(build_parser()))


# -- settings ---------------------------------------------------------------------------
def test_every_setting_is_in_the_deployment_table() -> None:
    text = (ROOT / "docs" / "deployment.md").read_text()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        env = alias.choices[0] if alias is not None else f"REVLINE_{name.upper()}"  # type: ignore[union-attr]
        assert f"`{env}`" in text, f"docs/deployment.md does not list {env}"


# -- links ------------------------------------------------------------------------------
def _slug(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(h) for h in re.findall(r"^#+ (.+)$", path.read_text(), flags=re.M)}


@pytest.mark.parametrize("path", list(ALL), ids=_name)
def test_relative_links_resolve(path: Path) -> None:
    text = re.sub(r"```.*?```", "", ALL[path], flags=re.S)
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    for link in links:
        if re.match(r"[a-z]+:", link):
            continue
        target, _, anchor = link.partition("#")
        file = (path.parent / target).resolve() if target else path
        assert file.exists(), f"{_name(path)}: link {link} points to nothing"
        if anchor and file.suffix == ".md":
            assert anchor in _anchors(file), f"{_name(path)}: link {link}: no such heading"
