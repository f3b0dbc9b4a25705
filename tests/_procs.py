"""Helpers shared by the fixtures that clean up after dead test sessions."""

from __future__ import annotations

import os


def owner_alive(pid: int) -> bool:
    """Whether the test session that left something behind is still running."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: not ours to clean up
    return True
