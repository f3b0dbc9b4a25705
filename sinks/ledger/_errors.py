"""Database errors sorted into what the sink processor must do with them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy.exc as sa_exc

from revline.sinks._protocols import PermanentSinkError, TransientSinkError

# SQLSTATEs that mean "try again": serialization failure, deadlock, connection
# exceptions (class 08), too many connections / out of resources (class 53),
# operator intervention such as admin shutdown or "cannot connect now" (class 57).
_TRANSIENT_SQLSTATE_PREFIXES = ("40001", "40P01", "08", "53", "57")


class RefusedEventError(PermanentSinkError):
    """The ledger refuses one event of a batch; nothing of the batch was written.

    ``order_id`` and ``idempotency_key`` name the event (its effect), so the caller
    can route it to the exception topic and post the rest of the batch without it.
    ``order_id`` is None when the event names no usable order.
    """

    def __init__(
        self, message: str, idempotency_key: str | None = None, order_id: str | None = None
    ) -> None:
        super().__init__(message)
        self.idempotency_key = idempotency_key
        self.order_id = order_id


def sqlstate(exc: BaseException) -> str | None:
    orig = getattr(exc, "orig", None)
    for candidate in (getattr(orig, "sqlstate", None), getattr(orig, "pgcode", None)):
        if isinstance(candidate, str):
            return candidate
    return None


# Program limits exceeded (SQLSTATE class 54: an index row or a statement too large):
# the row itself is refused, whatever the database's state, so it is never retried.
_REFUSED_SQLSTATE_PREFIXES = ("54",)


def db_message(exc: sa_exc.DBAPIError) -> str:
    """The database's own text, without SQLAlchemy's statement and parameter dump."""
    orig = exc.orig
    text = str(orig).strip() if orig is not None else str(exc)
    return text.splitlines()[0] if text else type(orig).__name__


# A refused login carries no SQLSTATE in psycopg's connect error, only the server's text:
# these will not pass by waiting (start-up would wait its whole timeout for a typo).
_REFUSED_LOGIN = ("password authentication failed", "no pg_hba.conf entry",
                  "does not exist", "permission denied for database",
                  "authentication failed", "no such table")


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        state = sqlstate(exc)
        if state is None and isinstance(exc, sa_exc.OperationalError) and any(
                text in str(exc.orig) for text in _REFUSED_LOGIN):
            return False  # wrong password, unknown role or database: say so at once
        if state is not None and state.startswith(("28", "3D")):
            return False  # invalid authorization, invalid catalog (database) name
        if state is not None and state.startswith(_TRANSIENT_SQLSTATE_PREFIXES):
            return True
        if state is not None and state.startswith(_REFUSED_SQLSTATE_PREFIXES):
            return False  # this very row can never be written: retrying would stall the sink
        return isinstance(exc, sa_exc.OperationalError)
    # Pool exhausted (TimeoutError) or a connection found dead by the pool.
    return isinstance(exc, sa_exc.TimeoutError | sa_exc.DisconnectionError)


def translate(exc: BaseException) -> BaseException:
    """The sink error for a database error; anything else (a bug) is returned unchanged."""
    if is_transient(exc):
        detail = db_message(exc) if isinstance(exc, sa_exc.DBAPIError) else str(exc)
        return TransientSinkError(f"ledger database unavailable: {detail}")
    if isinstance(exc, sa_exc.DBAPIError) and (
        isinstance(exc, sa_exc.IntegrityError | sa_exc.DataError)
        or (sqlstate(exc) or "").startswith(_REFUSED_SQLSTATE_PREFIXES)
    ):
        return PermanentSinkError(f"ledger database refused the write: {db_message(exc)}")
    return exc


@contextmanager
def db_errors() -> Iterator[None]:
    """Re-raise database errors as TransientSinkError / PermanentSinkError."""
    try:
        yield
    except (sa_exc.DBAPIError, sa_exc.TimeoutError, sa_exc.DisconnectionError) as exc:
        sink_error = translate(exc)
        if sink_error is exc:
            raise
        raise sink_error from exc
