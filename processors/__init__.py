"""Pure decision logic: no Kafka, no Faust. Testable with plain values."""

from revline.processors.checks import CheckContext, Finding, run_checks
from revline.processors.engine import (
    DEAD_LETTER,
    DUPLICATE,
    EXCEPTION,
    FINAL_KINDS,
    HELD,
    REDRIVE_COUNT_HEADER,
    REENTRY_HEADER,
    REPLAYED,
    VALIDATED,
    Decision,
    Engine,
    InputRecord,
    body_hash,
    exception_id_for,
)
from revline.processors.order_state import OrderState, depends_on, provides
from revline.processors.reference import CheckSpec, Product, ReferenceData, Rules, load_yaml

__all__ = [
    "DEAD_LETTER",
    "DUPLICATE",
    "EXCEPTION",
    "FINAL_KINDS",
    "HELD",
    "REDRIVE_COUNT_HEADER",
    "REENTRY_HEADER",
    "REPLAYED",
    "VALIDATED",
    "CheckContext",
    "CheckSpec",
    "Decision",
    "Engine",
    "Finding",
    "InputRecord",
    "OrderState",
    "Product",
    "ReferenceData",
    "Rules",
    "body_hash",
    "depends_on",
    "exception_id_for",
    "load_yaml",
    "provides",
    "run_checks",
]
