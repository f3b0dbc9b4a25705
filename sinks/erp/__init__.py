"""ERP adapters: Tryton over JSON-RPC, and an in-memory reference with the same semantics.

``TrytonErp`` needs a running trytond (``pip install -e '.[erp]'``); the helpers
``prepare_database`` / ``start_server`` set one up locally (SQLite, 127.0.0.1).
``InMemoryErp`` is what the embedded demo uses when Tryton is not installed.
"""

from revline.sinks.erp._factory import erp_from_settings
from revline.sinks.erp._mapping import (
    CREDIT_NOTE,
    INVOICE,
    PARTY,
    PAYMENT,
    REFUND_PAYMENT,
    SALE,
    marker,
    markers,
)
from revline.sinks.erp._memory import InMemoryErp, MemoryErpStore
from revline.sinks.erp._tryton import TrytonErp
from revline.sinks.erp._tryton_setup import (
    TrytonDatabase,
    TrytonServer,
    prepare_database,
    running_tryton,
    start_server,
    template_key,
    tryton_available,
)

__all__ = [
    "CREDIT_NOTE",
    "INVOICE",
    "PARTY",
    "PAYMENT",
    "REFUND_PAYMENT",
    "SALE",
    "InMemoryErp",
    "MemoryErpStore",
    "TrytonDatabase",
    "TrytonErp",
    "TrytonServer",
    "erp_from_settings",
    "marker",
    "markers",
    "prepare_database",
    "running_tryton",
    "start_server",
    "template_key",
    "tryton_available",
]
