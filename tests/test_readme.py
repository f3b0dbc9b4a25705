"""The README stays true: its examples are valid input and its commands exist."""

from __future__ import annotations

import json
import re
from pathlib import Path

from revline.cli import build_parser
from schemas import EVENT_MODELS, EventDeserializer, EventSerializer, validate_event

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_every_event_type_has_a_valid_json_example() -> None:
    blocks = re.findall(r"```json\n(.*?)\n```", README, flags=re.S)
    seen = set()
    for block in blocks:
        event = validate_event(json.loads(block))
        assert EventDeserializer().decode(EventSerializer()(event)) == event
        seen.add(event["envelope"]["event_type"])
    assert seen == set(EVENT_MODELS)


def test_readme_starts_with_the_two_commands() -> None:
    head = README.split("##", 2)[2]
    assert "make demo" in head and "make test" in head
    makefile = (Path(__file__).parent.parent / "Makefile").read_text()
    assert "\ndemo:" in makefile and "\ntest:" in makefile


def test_documented_subcommands_exist() -> None:
    parser = build_parser()
    documented = set(re.findall(r"`revline (\w[\w-]*)", README))
    actions = {a.dest: a for a in parser._actions}
    choices = set(actions["command"].choices)  # type: ignore[arg-type]
    assert documented <= choices, documented - choices
