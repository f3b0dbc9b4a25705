"""Thin Faust wiring of the stream core; decisions live in ``processors``."""

from revline.streams._reference import ReferenceView, publish_reference
from revline.streams.app import Worker, build_worker, run, topics_for

__all__ = ["ReferenceView", "Worker", "build_worker", "publish_reference", "run", "topics_for"]
