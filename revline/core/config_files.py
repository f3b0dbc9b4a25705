"""Reading a YAML config file: whatever its bytes, one ConfigurationError naming it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from revline.core.errors import ConfigurationError


def read_yaml(path: Path, name: str | None = None) -> Any:
    """The parsed document of ``path``; ``name`` is how messages call the file."""
    what = name or str(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigurationError(f"cannot read {what}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigurationError(
            f"{what} is not UTF-8 text (byte {exc.start}): give a YAML file") from exc
    except RecursionError as exc:
        raise ConfigurationError(f"{what} is nested too deeply to read") from exc
