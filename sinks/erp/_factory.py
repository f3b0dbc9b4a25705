"""The ERP adapter the settings ask for."""

from __future__ import annotations

from revline.core.errors import ConfigurationError
from revline.core.settings import Settings
from revline.sinks._protocols import ErpAdapter
from revline.sinks.erp._memory import InMemoryErp, MemoryErpStore
from revline.sinks.erp._tryton import TrytonErp


def erp_from_settings(settings: Settings) -> ErpAdapter:
    """Tryton when configured (``REVLINE_TRYTON_URL``), else the in-memory reference ERP."""
    kind = settings.erp
    if kind == "auto":
        kind = "tryton" if settings.tryton_url else "memory"
    if kind == "memory":
        store = MemoryErpStore(journal=settings.memory_erp_file)
        return InMemoryErp(store, outage_file=settings.memory_erp_outage_file)
    if kind == "tryton":
        if not settings.tryton_url:
            raise ConfigurationError(
                "REVLINE_ERP=tryton needs REVLINE_TRYTON_URL, e.g. http://127.0.0.1:8000 "
                "(a local one: `python -m revline.sinks.erp prepare DIR && "
                "python -m revline.sinks.erp serve DIR`)"
            )
        return TrytonErp(settings.tryton_url, settings.tryton_database, settings.tryton_user,
                         settings.tryton_password)
    raise ConfigurationError(f"REVLINE_ERP={settings.erp!r}: use memory, tryton or auto")
