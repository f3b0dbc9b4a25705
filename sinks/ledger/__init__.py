"""The ledger adapter: double-entry, append-only postings on SQLAlchemy Core.

``SqlLedger(url)`` works on SQLite (the embedded default, ``sqlite:///.revline/ledger.db``)
and PostgreSQL (``postgresql://...``, driven by psycopg 3). The chart of accounts and
the posting rule per event type live in ``postings.yaml`` next to this file.
"""

from revline.sinks.ledger._errors import RefusedEventError
from revline.sinks.ledger._ledger import (
    DEFAULT_URL,
    EffectId,
    EffectRow,
    Journal,
    JournalLine,
    JournalSummary,
    SideEffect,
    SqlLedger,
    TrialBalance,
    normalize_url,
)
from revline.sinks.ledger._rules import (
    DEFAULT_RULES_FILE,
    Account,
    LineRule,
    PostingRule,
    PostingRules,
    Reclassify,
    load_posting_rules,
)

__all__ = [
    "DEFAULT_RULES_FILE",
    "DEFAULT_URL",
    "Account",
    "EffectId",
    "EffectRow",
    "Journal",
    "JournalLine",
    "JournalSummary",
    "LineRule",
    "PostingRule",
    "PostingRules",
    "Reclassify",
    "RefusedEventError",
    "SideEffect",
    "SqlLedger",
    "TrialBalance",
    "load_posting_rules",
    "normalize_url",
]
