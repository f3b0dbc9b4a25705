"""CLI commands: auditor, audit ORDER_ID, audit verify."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    """Add this module's commands to the ``revline`` parser (``sub``: its subparsers)."""
    del sub


__all__ = ["argparse", "register"]
