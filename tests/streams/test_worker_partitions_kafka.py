"""A worker refuses an input topic whose partition count it would not fully read."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from revline.core.admin import ensure_topics
from revline.tools.isolated import IsolatedPipeline

pytestmark = [pytest.mark.kafka]


def test_worker_refuses_an_input_topic_with_other_partition_count(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    pipeline = IsolatedPipeline(kafka_bootstrap, tmp_path, partitions=2)
    ensure_topics(kafka_bootstrap, {pipeline.topic("events"): 3})  # e.g. a broker auto-create
    done = subprocess.run([sys.executable, "-m", "revline.cli", "worker"], env=pipeline.env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "REVLINE_INPUT_PARTITIONS" in done.stderr and "has 3" in done.stderr
