"""``TrytonErp``: the ERP adapter for Tryton (trytond 8.x), over its JSON-RPC.

Protocol (trytond/protocols/dispatcher.py, jsonrpc.py): POST ``<url>/<db>/rpc/``
with ``{"id", "method", "params"}``. ``common.db.login`` with
``[user, {"password": ...}, language]`` returns ``[user_id, session, ...]``; later
calls send ``Authorization: Session base64("user:user_id:session")``. Model calls
are ``model.<name>.<method>`` with the context dict as the last parameter, wizards
``wizard.<name>.create|execute|delete``. Decimals, dates and datetimes travel as
``{"__class__": ...}`` objects. A Tryton exception comes back with HTTP 200 and
``"error": [kind, args]`` (``UserError``: ``[message, description, domain]``).

Documents (every write carries the idempotency key in a ``[revline step=S key=K]``
marker, ``%``, ``[`` and ``]`` of the key percent-encoded, stored by the same call
that creates or changes the document, so a search for the key finds it after any
crash). An effect is (order id, idempotency key): every search for a marker is
scoped to the order's documents (see ``_marked``):

* order_booked → party (code = customer id) + sale quotation (reference = order id,
  marker in ``comment``, invoice method manual); the line discount is folded into
  the unit price.
* order_amended → draft the quotation, replace its lines, quote again.
* order_cancelled → cancel the quotation; once invoiced, credit each invoice of the
  order (``account.invoice.credit`` wizard, reconciled against it while unpaid), and
  each refund's credit note (the invoices' credit notes give back everything billed,
  so what a refund gave back is taken back: the ledger moves those refunds to AR).
* invoice_issued → step "sale": confirm the sale on the first invoice (no more
  amendments); step "invoice": an invoice of the event's own lines (their origin the
  sale's lines), reference = invoice id, the upstream tax as a manual tax line, then
  posted. A deposit and its balance, or one invoice per shipment, are so many invoices.
* payment_captured → ``account.invoice.pay`` wizard on the order's invoice of that
  invoice id (partial payments allowed); the payment move's description carries the
  marker.
* refund_issued → step "credit_note": a posted credit note for the refunded amount
  (its line credits a line of the paid invoice, which ties it to the order); step
  "refund_payment": the money paid back, through the same wizard. After the order's
  cancellation the customer's money is already a credit of theirs (its credit notes):
  the refund pays that out (step "refund_payment" only, against the cancellation's
  credit note of the paid invoice), as the ledger posts it AR / cash.

Ids Tryton would strip (outer whitespace) are stored encoded (``_stored``).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import json
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any

import httpx

from revline.sinks._protocols import (
    EffectResult,
    ErpDocument,
    Event,
    PartialWriteError,
    PermanentSinkError,
    TransientSinkError,
)
from revline.sinks.erp import _mapping as m
from revline.sinks.erp._tryton_setup import PAYMENT_METHOD, REFUND_SKU, TAX_NAME

_MAX_WARNINGS = 5  # per call; each is one confirmation of the same kind the GUI asks for


def _encode(obj: object) -> object:
    if isinstance(obj, Decimal):
        return {"__class__": "Decimal", "decimal": str(obj)}
    if isinstance(obj, dt.datetime):
        return {
            "__class__": "datetime",
            "year": obj.year,
            "month": obj.month,
            "day": obj.day,
            "hour": obj.hour,
            "minute": obj.minute,
            "second": obj.second,
            "microsecond": obj.microsecond,
        }
    if isinstance(obj, dt.date):
        return {"__class__": "date", "year": obj.year, "month": obj.month, "day": obj.day}
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    raise TypeError(f"cannot send {type(obj).__name__} to Tryton")


def _decode(obj: dict[str, Any]) -> Any:
    kind = obj.get("__class__")
    if kind == "Decimal":
        return Decimal(obj["decimal"])
    if kind == "date":
        return dt.date(obj["year"], obj["month"], obj["day"])
    if kind == "datetime":
        return dt.datetime(
            obj["year"],
            obj["month"],
            obj["day"],
            obj["hour"],
            obj["minute"],
            obj["second"],
            obj["microsecond"],
        )
    if kind == "timedelta":
        return dt.timedelta(seconds=obj["seconds"])
    if kind == "bytes":
        return base64.decodebytes(obj["base64"].encode())
    return obj


class _TrytonWarning(Exception):
    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


class _Rpc:
    """One JSON-RPC session; errors already mapped to the sink's error kinds."""

    def __init__(self, url: str, database: str, user: str, password: str, timeout: float) -> None:
        self.endpoint = f"{url.rstrip('/')}/{database}/rpc/"
        self.user = user
        self._password = password
        self._client = httpx.Client(timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)))
        self._auth: str | None = None
        self.user_id = 0
        self.context: dict[str, Any] = {}
        self._ids = 0
        self._lock = threading.Lock()

    def close(self) -> None:
        self._client.close()

    def _post(self, method: str, params: Sequence[Any]) -> Any:
        self._ids += 1
        body = json.dumps(
            {"id": self._ids, "method": method, "params": list(params)}, default=_encode
        )
        headers = {"Content-Type": "application/json"}
        if self._auth:
            headers["Authorization"] = self._auth
        try:
            resp = self._client.post(self.endpoint, content=body, headers=headers)
        except httpx.TimeoutException as exc:
            raise TransientSinkError(f"Tryton timed out on {method}: {exc!r}") from exc
        except httpx.TransportError as exc:
            raise TransientSinkError(f"Tryton unreachable at {self.endpoint}: {exc!r}") from exc
        if resp.status_code == 401:
            raise _Unauthorized(f"Tryton refused the session for {method}")
        if resp.status_code in (408, 409, 423, 429) or resp.status_code >= 500:
            # 409/423: concurrent update or lock; 503: database busy. All pass.
            raise TransientSinkError(
                f"Tryton answered HTTP {resp.status_code} to {method}: {resp.text[:300]}"
            )
        if resp.status_code != 200:
            raise PermanentSinkError(
                f"Tryton answered HTTP {resp.status_code} to {method}: {resp.text[:300]}"
            )
        try:
            data = json.loads(resp.text, object_hook=_decode)
        except ValueError as exc:
            raise TransientSinkError(f"Tryton sent a non-JSON answer to {method}") from exc
        if "error" in data and data["error"] is not None:
            raise _error(method, data["error"])
        return data.get("result")

    def login(self) -> None:
        self._auth = None
        try:
            result = self._post("common.db.login", [self.user, {"password": self._password}, "en"])
        except _Unauthorized as exc:
            # Credentials are configuration: pausing (transient) beats dead-lettering every event.
            raise TransientSinkError(f"Tryton login failed for user {self.user!r}") from exc
        self.user_id, session = int(result[0]), str(result[1])
        token = base64.b64encode(f"{self.user}:{self.user_id}:{session}".encode()).decode()
        self._auth = f"Session {token}"
        prefs = self._post("model.res.user.get_preferences", [True, {}])
        self.context = {
            k: prefs[k]
            # As the Tryton client does: field states (e.g. who may edit a posted
            # invoice's comment) are evaluated against groups/administrator.
            for k in (
                "company",
                "companies",
                "company_filter",
                "language",
                "groups",
                "administrator",
            )
            if k in prefs
        }

    def call(self, method: str, *params: Any, context: Mapping[str, Any] | None = None) -> Any:
        """Call with the session context appended; re-login once, confirm warnings."""
        with self._lock:
            if self._auth is None:
                self.login()
            ctx = {**self.context, **(context or {})}
            relogged = False
            warnings = 0
            while True:
                try:
                    return self._post(method, [*params, ctx])
                except _Unauthorized:
                    # Expired session, or a wizard that wants a fresh one.
                    if relogged:
                        raise TransientSinkError(
                            f"Tryton keeps refusing the session for {method}"
                        ) from None
                    relogged = True
                    self.login()
                except _TrytonWarning as warning:
                    # A warning is Tryton asking "are you sure?" (e.g. a due date in the
                    # past for a back-dated invoice); upstream already decided: confirm once.
                    warnings += 1
                    if warnings > _MAX_WARNINGS:
                        raise PermanentSinkError(f"Tryton warning on {method}: {warning}") from None
                    self._post(
                        "model.res.user.warning.create",
                        [[{"user": self.user_id, "name": warning.name, "always": False}], ctx],
                    )


class _Unauthorized(Exception):
    pass


def _error(method: str, error: Any) -> Exception:
    kind = error[0] if isinstance(error, list | tuple) and error else error
    args = error[1] if isinstance(error, list | tuple) and len(error) > 1 else None
    if kind == "UserWarning" and isinstance(args, list | tuple) and args:
        return _TrytonWarning(str(args[0]), str(args[1]) if len(args) > 1 else "")
    if kind == "UserError" and isinstance(args, list | tuple) and args:
        text = str(args[0])
        if len(args) > 1 and args[1]:
            text += f" ({args[1]})"
        return PermanentSinkError(f"Tryton refused {method}: {text}")
    if kind == "ConcurrencyException":
        return TransientSinkError(f"Tryton concurrency conflict on {method}: {args}")
    if kind == "LoginException":
        return TransientSinkError(f"Tryton asks for a login parameter on {method}: {args}")
    # Anything else is a server-side exception; its first element is its text.
    return PermanentSinkError(f"Tryton failed on {method}: {str(kind)[:500]}")


def _stored(value: str) -> str:
    """An id as a Tryton Char field keeps it. Tryton strips outer whitespace from Char
    values (``fields.Char(strip=True)``), so "A " and "A" would be one order: an id with
    outer whitespace, or starting with ``%``, is stored as ``%`` + the id with ``%`` and
    whitespace percent-encoded (UTF-8). Every other id is stored as is, as it always was.
    """
    if value == value.strip() and not value.startswith("%"):
        return value
    return "%" + "".join(
        "".join(f"%{b:02X}" for b in ch.encode()) if ch == "%" or ch.isspace() else ch
        for ch in value
    )


def _unstored(value: Any) -> str:
    text = str(value or "")
    return urllib.parse.unquote(text[1:]) if text.startswith("%") else text


def _no_sale(order_id: str, etype: str) -> PermanentSinkError:
    return PermanentSinkError(
        f"{etype} for order {order_id}: Tryton has no sale with reference {order_id} "
        "(the booking has not been applied)"
    )


def _booked_twice(order_id: str, other: Mapping[str, Any]) -> PermanentSinkError:
    return PermanentSinkError(
        f"order {order_id} is already sale {other['id']} in Tryton, booked under "
        f"another key ({m.markers(other['comment'])[:1]}); not booking it twice"
    )


def _live_sale(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The order's sale among its sales (by id): a cancelled booking may have been booked
    again; the live one is the order."""
    if not rows:
        return None
    live = [r for r in rows if r["state"] != "cancelled"]
    return (live or list(rows))[-1]


def _origin_id(origin: Any, model: str) -> int | None:
    """The id in a Reference value ``"model,id"`` when it points at ``model``."""
    if isinstance(origin, str) and origin.startswith(f"{model},"):
        with contextlib.suppress(ValueError):
            return int(origin.split(",", 1)[1])
    return None


class TrytonErp:
    """``ErpAdapter`` over a running trytond's JSON-RPC (see the module docstring)."""

    name = "erp"

    def __init__(
        self,
        url: str,
        database: str,
        user: str,
        password: str,
        *,
        timeout: float = 30.0,
        payment_method: str = PAYMENT_METHOD,
        tax_name: str = TAX_NAME,
        refund_sku: str = REFUND_SKU,
    ) -> None:
        self._rpc = _Rpc(url, database, user, password, timeout)
        self._names = {"payment_method": payment_method, "tax": tax_name, "refund": refund_sku}
        self._setup: dict[str, Any] | None = None
        self._currencies: dict[str, tuple[int, int]] = {}
        self._products: dict[str, tuple[int, int, int]] = {}  # sku -> (product, uom, account)

    def close(self) -> None:
        self._rpc.close()

    def __enter__(self) -> TrytonErp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def rpc(self, method: str, *params: Any) -> Any:
        """A raw call in this adapter's session (inspection, reconciliation, tests):
        ``rpc("model.sale.sale.search_read", domain, 0, None, None, fields)``."""
        return self._rpc.call(method, *params)

    # -- RPC helpers ---------------------------------------------------------------------
    def _m(
        self, model: str, method: str, *args: Any, context: Mapping[str, Any] | None = None
    ) -> Any:
        return self._rpc.call(f"model.{model}.{method}", *args, context=context)

    def _search(
        self,
        model: str,
        domain: list[Any],
        order: list[list[str]] | None = None,
        limit: int | None = None,
    ) -> list[int]:
        return [
            int(i) for i in self._m(model, "search", domain, 0, limit, order or [["id", "ASC"]])
        ]

    def _read(self, model: str, ids: Sequence[int], fields: Sequence[str]) -> list[dict[str, Any]]:
        if not ids:
            return []
        rows = self._m(model, "read", list(ids), list(fields))
        by_id = {int(r["id"]): r for r in rows}
        return [by_id[i] for i in ids if i in by_id]

    def _read1(self, model: str, record: int, fields: Sequence[str]) -> dict[str, Any]:
        rows = self._read(model, [record], fields)
        if not rows:
            raise PermanentSinkError(f"{model} {record} vanished from Tryton")
        return rows[0]

    def _button(self, model: str, method: str, ids: Sequence[int]) -> None:
        self._m(model, method, list(ids))

    def _wizard(
        self,
        name: str,
        model: str,
        record: int,
        drive: Callable[[Callable[[dict[str, Any], str], dict[str, Any]], dict[str, Any]], None],
        *,
        read_start: bool = True,
    ) -> None:
        """Run wizard ``name`` on one record; ``drive(execute, first)`` fills its states.
        Without ``read_start`` the start state is not executed (``first`` is empty): for a
        caller that knows the start view's values already."""
        ctx = {"active_model": model, "active_id": record, "active_ids": [record]}
        session, start, _end = self._rpc.call(f"wizard.{name}.create", context=ctx)

        def execute(data: dict[str, Any], state: str) -> dict[str, Any]:
            out = self._rpc.call(f"wizard.{name}.execute", session, data, state, context=ctx)
            return dict(out or {})

        try:
            first = execute({}, start) if read_start else {}
            drive(execute, first)
        finally:
            # Best effort: Tryton garbage-collects abandoned wizard sessions anyway.
            with contextlib.suppress(TransientSinkError, PermanentSinkError):
                self._rpc.call(f"wizard.{name}.delete", session, context=ctx)

    # -- reference data ------------------------------------------------------------------
    def _cfg(self) -> dict[str, Any]:
        if self._setup is not None:
            return self._setup
        rows = self._m("currency.currency", "search_read", [], 0, None, None, ["code", "digits"])
        self._currencies = {r["code"]: (int(r["id"]), int(r["digits"])) for r in rows}
        acc = self._read1(
            "account.configuration",
            1,
            ["default_customer_payment_term", "default_account_receivable"],
        )
        methods = self._search(
            "account.invoice.payment.method", [["name", "=", self._names["payment_method"]]]
        )
        taxes = self._m(
            "account.tax",
            "search_read",
            [["name", "=", self._names["tax"]]],
            0,
            1,
            None,
            ["invoice_account", "credit_note_account"],
        )
        journals = self._search("account.journal", [["type", "=", "revenue"]], limit=1)
        missing = [
            what
            for what, ok in (
                (f"payment method {self._names['payment_method']!r}", methods),
                (f"tax {self._names['tax']!r}", taxes),
                ("a revenue journal", journals),
                ("a default customer payment term", acc.get("default_customer_payment_term")),
                ("a default receivable account", acc.get("default_account_receivable")),
            )
            if not ok
        ]
        if missing:
            raise PermanentSinkError(
                "the Tryton database is not set up for Revline (missing "
                + ", ".join(missing)
                + "): prepare it with `python -m revline.sinks.erp prepare DIR`"
            )
        self._setup = {
            "company": self._rpc.context.get("company"),
            "payment_term": int(acc["default_customer_payment_term"]),
            "receivable": int(acc["default_account_receivable"]),
            "payment_method": methods[0],
            "tax": int(taxes[0]["id"]),
            "tax_account": int(taxes[0]["invoice_account"]),
            "journal": journals[0],
        }
        return self._setup

    def _currency(self, code: str) -> tuple[int, int]:
        self._cfg()
        if code not in self._currencies:
            raise PermanentSinkError(f"currency {code!r} does not exist in Tryton")
        return self._currencies[code]

    def _product_map(self, skus: Sequence[str]) -> dict[str, tuple[int, int, int]]:
        self._load_products(skus)
        unknown = sorted(set(skus) - self._products.keys())
        if unknown:
            raise PermanentSinkError(
                f"unknown SKU(s) in Tryton (no salable product with a revenue account): {unknown}"
            )
        return {s: self._products[s] for s in skus}

    def _load_products(self, skus: Iterable[str]) -> None:
        """Products by SKU into the cache (products, their unit and revenue account do not
        change under a running sink; an unknown SKU is asked again each time)."""
        wanted = sorted(set(skus) - self._products.keys())
        if wanted:
            rows = self._m(
                "product.product",
                "search_read",
                [["code", "in", wanted]],
                0,
                None,
                None,
                ["code", "default_uom", "template.account_category.account_revenue"],
            )
            for r in rows:
                account = ((r.get("template.") or {}).get("account_category.") or {}).get(
                    "account_revenue"
                )
                if account:
                    self._products[r["code"]] = (int(r["id"]), int(r["default_uom"]), int(account))

    # -- lookup --------------------------------------------------------------------------
    # Every lookup is scoped to one order, as the effect identity is (order, key):
    # * sales: the reference is the order id;
    # * invoices: lines whose origin is a line of the order's sale (``sales`` searcher);
    # * credit notes: lines whose origin is a line of one of those invoices (a
    #   cancellation's credit, and a refund's, made since refunds were linked); older
    #   refund credit notes are recognised by their description "... (<order id>)";
    # * payment moves: their origin is one of the order's invoices or credit notes.
    def _marked(
        self, model: str, field: str, order_id: str, key: str, states: bool = False
    ) -> list[tuple[str, int]]:
        """(step, id) of the order's documents of ``model`` carrying a marker of exactly
        ``key``; with ``states``, only documents past draft (their step completed)."""
        patterns = m.like_patterns(key)
        domain: list[Any] = (
            [[field, "like", patterns[0]]]
            if len(patterns) == 1
            else [["OR", *[[field, "like", p] for p in patterns]]]
        )
        if model == "sale.sale":
            domain.append(["reference", "=", _stored(order_id)])
        fields = [field, "state"] if states else [field]
        if model == "account.move":
            fields.append("origin")
        rows = self._m(model, "search_read", domain, 0, None, [["id", "ASC"]], fields)
        rows = [r for r in rows if m.marker_steps(r.get(field), key)]
        if rows and model == "account.invoice":
            mine = self._order_invoices(order_id)
            rows = [r for r in rows if int(r["id"]) in mine]
        elif rows and model == "account.move":
            mine = self._order_invoices(order_id)
            rows = [r for r in rows if _origin_id(r.get("origin"), "account.invoice") in mine]
        return [
            (step, int(r["id"]))
            for r in rows
            if not states or r.get("state") != "draft"
            for step in m.marker_steps(r.get(field), key)
        ]

    def _sale_invoices(self, order_id: str) -> list[int]:
        """The order's invoices (not credit notes): lines from the order's sale lines."""
        return self._search("account.invoice", [["sales.reference", "=", _stored(order_id)]])

    def _order_invoices(self, order_id: str) -> set[int]:
        """Ids of every invoice and credit note of the order."""
        own = self._sale_invoices(order_id)
        out = set(own)
        if own:
            notes = self._search(
                "account.invoice",
                [["lines.origin.invoice", "in", own, "account.invoice.line"]],
            )
            out.update(notes)
            if notes:  # a cancellation credits a refund's credit note in turn
                out.update(self._search(
                    "account.invoice",
                    [["lines.origin.invoice", "in", notes, "account.invoice.line"]],
                ))  # fmt: skip
        suffix = f" ({order_id})"
        legacy = self._m(
            "account.invoice", "search_read",
            [["type", "=", "out"], ["comment", "like", "%[revline step=credit_note %"],
             ["description", "like", f"refund % of %{m.like_escape(suffix)}"]],
            0, None, None, ["description"],
        )  # fmt: skip
        out.update(int(r["id"]) for r in legacy if str(r["description"]).endswith(suffix))
        return out

    def lookup(self, order_id: str, idempotency_key: str) -> dict[str, str]:
        """Completed steps only: a draft still carrying the marker is a step under way
        (e.g. an invoice written but refused at posting), which ``apply`` completes."""
        refs: dict[str, str] = {}
        for model, field in self._MARKED:
            stateful = model != "account.move"  # payment moves are posted when created
            for step, record in self._marked(
                model, field, order_id, idempotency_key, states=stateful
            ):
                # Lowest id wins: a credit note copies its invoice's comment.
                refs.setdefault(step, str(record))
        return refs

    _MARKED = (
        ("sale.sale", "comment"),
        ("account.invoice", "comment"),
        ("account.move", "description"),
    )

    def _search_read_all(
        self, model: str, domain: list[Any], fields: Sequence[str], page: int = 1000
    ) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        while True:
            chunk = self._m(model, "search_read", domain, len(rows), page, [["id", "ASC"]],
                            list(fields))  # fmt: skip
            rows.extend(chunk)
            if len(chunk) < page:
                return rows

    def documents(self) -> list[ErpDocument]:
        """Read-only: every marked document, one entry per marker (for reconciliation).

        Payment moves carry no amount of their own: it is read from their receivable
        line, in the invoice's currency (``amount_second_currency`` when that is not
        the company's), credit positive, so a refund paid back is negative.
        """
        cfg = self._cfg()
        codes = {cid: (code, digits) for code, (cid, digits) in self._currencies.items()}
        company = self._read1("company.company", int(cfg["company"]), ["currency"])
        company_currency = codes[int(company["currency"])]
        marked = [["comment", "like", "%[revline step=%"]]
        out: list[ErpDocument] = []
        sales = self._search_read_all(
            "sale.sale", marked,
            ["comment", "state", "currency", "untaxed_amount", "sale_date", "reference"],
        )  # fmt: skip
        invoices = self._search_read_all(
            "account.invoice", marked,
            ["comment", "state", "currency", "total_amount", "accounting_date", "invoice_date",
             "sales", "lines", "description"],
        )  # fmt: skip
        orders = self._invoice_orders(
            invoices, {int(r["id"]): _unstored(r["reference"]) for r in sales}
        )
        for rows, amount_field, day_fields in (
            (sales, "untaxed_amount", ("sale_date",)),
            (invoices, "total_amount", ("accounting_date", "invoice_date")),
        ):
            for r in rows:
                code, digits = codes[int(r["currency"])]
                amount = m.to_minor(Decimal(r[amount_field] or 0), digits)
                day = next((r[f] for f in day_fields if r.get(f)), None)
                order = _unstored(r["reference"]) if rows is sales else orders.get(int(r["id"]), "")
                for step, key in m.markers(r.get("comment")):
                    out.append(ErpDocument(key, step, str(r["id"]), code, amount,
                                           str(r["state"]), day, order_id=order))  # fmt: skip
        moves = self._search_read_all(
            "account.move", [["description", "like", "%[revline step=%"]],
            ["description", "state", "date", "lines", "origin"],
        )  # fmt: skip
        line_ids = [int(i) for mv in moves for i in mv["lines"]]
        lines: dict[int, list[dict[str, Any]]] = {}
        for start in range(0, len(line_ids), 1000):
            for ln in self._read(
                "account.move.line", line_ids[start : start + 1000],
                ["move", "debit", "credit", "amount_second_currency", "second_currency",
                 "account.type.receivable"],
            ):  # fmt: skip
                lines.setdefault(int(ln["move"]), []).append(ln)
        missing = sorted(
            {i for mv in moves if (i := _origin_id(mv.get("origin"), "account.invoice"))
             is not None} - orders.keys()
        )  # fmt: skip
        if missing:  # a payment of an invoice without a marker of its own (not ours, normally)
            extra = self._read("account.invoice", missing, ["sales", "lines", "description"])
            orders.update(self._invoice_orders(extra, {}))
        for mv in moves:
            receivable = [
                ln for ln in lines.get(int(mv["id"]), [])
                if ((ln.get("account.") or {}).get("type.") or {}).get("receivable")
            ]  # fmt: skip
            code, digits = company_currency
            amount = 0
            for ln in receivable:
                if ln.get("second_currency"):
                    code, digits = codes[int(ln["second_currency"])]
                    amount -= m.to_minor(Decimal(ln["amount_second_currency"]), digits)
                else:
                    amount += m.to_minor(Decimal(ln["credit"]) - Decimal(ln["debit"]), digits)
            invoice = _origin_id(mv.get("origin"), "account.invoice")
            order = orders.get(invoice, "") if invoice is not None else ""
            for step, key in m.markers(mv.get("description")):
                out.append(ErpDocument(key, step, str(mv["id"]), code, amount, str(mv["state"]),
                                       mv.get("date"), order_id=order))  # fmt: skip
        return out

    def _invoice_orders(
        self, invoices: Sequence[Mapping[str, Any]], sale_refs: dict[int, str]
    ) -> dict[int, str]:
        """invoice id -> order id, for rows read with ``sales``, ``lines``, ``description``:
        an invoice by its sale's reference, a credit note by the invoice it credits (its
        first line's origin), an older refund credit note by its description."""
        wanted = sorted({int(i) for r in invoices for i in r["sales"]} - sale_refs.keys())
        for start in range(0, len(wanted), 1000):
            for sale in self._read("sale.sale", wanted[start : start + 1000], ["reference"]):
                sale_refs[int(sale["id"])] = _unstored(sale["reference"])
        out: dict[int, str] = {}
        credits: dict[int, int] = {}  # credit note -> its first line
        for r in invoices:
            if r["sales"]:
                out[int(r["id"])] = sale_refs.get(int(r["sales"][0]), "")
            elif r["lines"]:
                credits[int(r["id"])] = min(int(i) for i in r["lines"])
        origin_of: dict[int, int] = {}  # credit note -> the invoice line it credits
        first_lines = sorted(credits.values())
        for start in range(0, len(first_lines), 1000):
            for ln in self._read("account.invoice.line", first_lines[start : start + 1000],
                                 ["invoice", "origin"]):  # fmt: skip
                origin = _origin_id(ln.get("origin"), "account.invoice.line")
                if origin is not None:
                    origin_of[int(ln["invoice"])] = origin
        credited = sorted(set(origin_of.values()))
        line_invoice: dict[int, int] = {}
        for start in range(0, len(credited), 1000):
            for ln in self._read("account.invoice.line", credited[start : start + 1000],
                                 ["invoice"]):  # fmt: skip
                line_invoice[int(ln["id"])] = int(ln["invoice"])
        parents = sorted(set(line_invoice.values()) - out.keys())
        if parents:
            out.update(self._invoice_orders(
                self._read("account.invoice", parents, ["sales", "lines", "description"]),
                sale_refs,
            ))  # fmt: skip
        for r in invoices:
            inv = int(r["id"])
            if inv in out:
                continue
            if inv in origin_of and origin_of[inv] in line_invoice:
                out[inv] = out.get(line_invoice[origin_of[inv]], "")
            elif (text := str(r.get("description") or "")).startswith("refund ") and (
                text.endswith(")") and " (" in text
            ):
                out[inv] = text[text.rindex(" (") + 2 : -1]  # "refund R of P (<order>)"
        return out

    # -- apply ---------------------------------------------------------------------------
    def apply(self, event: Event) -> EffectResult:
        return m.dispatch(self, event)

    def apply_many(self, events: Sequence[Event]) -> list[EffectResult | Exception]:
        """Apply a batch: one outcome per event, in order, each what ``apply`` would give
        (an ``EffectResult``, or the ``PermanentSinkError``/``PartialWriteError`` it would
        raise, returned in its place so one refused document never fails the others).

        The batch is cut in waves, the n-th event of every order in the n-th wave, so an
        order's events keep their order and a wave holds one event per order. A wave
        reads what its orders have in Tryton with one call per model, then applies each
        event type with one call per step for all its documents (create sales with their
        lines, quote, confirm, create invoices, post...). An event whose effect is
        already (partly) in Tryton, a rare type (cancellation, refund), or a document
        of a batched call Tryton refused, goes through ``apply``'s path on its own,
        which finds what exists by its marker and completes the rest.

        A ``TransientSinkError`` (Tryton unreachable, a lock) is raised for the whole
        batch: what was written is found by its marker when the batch is applied again.
        """
        out: list[EffectResult | Exception | None] = [None] * len(events)
        waves: list[list[int]] = []
        seen: dict[str, int] = {}
        for i, event in enumerate(events):
            try:
                order = str(m.envelope(event)["order_id"])
            except (PermanentSinkError, KeyError) as exc:
                out[i] = exc if isinstance(exc, PermanentSinkError) else PermanentSinkError(
                    f"event without {exc}")
                continue
            n = seen.get(order, 0)
            seen[order] = n + 1
            if n == len(waves):
                waves.append([])
            waves[n].append(i)
        for wave in waves:
            _Wave(self, [(i, events[i]) for i in wave], out).run()
        assert all(r is not None for r in out)
        return [r for r in out if r is not None]

    def _apply_one(self, event: Event) -> EffectResult | Exception:
        """``apply`` for one event of a batch: its refusal is its outcome; a transient
        failure (also after a finished step) stops the batch."""
        try:
            return m.dispatch(self, event)
        except PartialWriteError as exc:
            if isinstance(exc.cause, TransientSinkError):
                raise exc.cause from exc
            return exc
        except PermanentSinkError as exc:
            return exc

    # -- shared pieces -------------------------------------------------------------------
    _SALE_FIELDS = (
        "state",
        "party",
        "currency",
        "comment",
        "lines",
        "invoices",
        "invoice_address",
        "untaxed_amount",
        "invoice_method",
        "reference",
    )

    def _sale_for_order(self, order_id: str) -> dict[str, Any] | None:
        rows = self._m(
            "sale.sale", "search_read", [["reference", "=", _stored(order_id)]], 0, None,
            [["id", "ASC"]], list(self._SALE_FIELDS),
        )  # fmt: skip
        return _live_sale(rows)

    def _require_sale(self, order_id: str, etype: str) -> dict[str, Any]:
        sale = self._sale_for_order(order_id)
        if sale is None:
            raise _no_sale(order_id, etype)
        return sale

    def _party(self, customer_id: str) -> tuple[int, int]:
        for attempt in range(2):
            ids = self._search("party.party", [["code", "=", _stored(customer_id)]], limit=1)
            if not ids:
                try:
                    ids = self._m(
                        "party.party",
                        "create",
                        [
                            {
                                "name": customer_id,
                                "code": _stored(customer_id),
                                "addresses": [["create", [{}]]],
                            }
                        ],
                    )
                except PermanentSinkError:
                    if attempt:
                        raise
                    continue  # another worker created it first: the code is unique
            party = int(ids[0])
            addresses = self._read1("party.party", party, ["addresses"])["addresses"]
            if not addresses:
                addresses = self._m("party.address", "create", [{"party": party}])
            return party, int(addresses[0])
        raise AssertionError("unreachable")

    def _sale_lines(self, priced: Sequence[m.PricedLine]) -> list[dict[str, Any]]:
        products = self._product_map([ln.sku for ln in priced])
        return [
            {
                "type": "line",
                "product": products[ln.sku][0],
                "unit": products[ln.sku][1],
                "quantity": float(ln.quantity),
                "unit_price": ln.unit_price,
                "description": ln.description,
            }
            for ln in priced
        ]

    def _check_currency(self, record: Mapping[str, Any], code: str, what: str) -> int:
        currency_id, digits = self._currency(code)
        if int(record["currency"]) != currency_id:
            have = next(
                (c for c, (i, _) in self._currencies.items() if i == record["currency"]), "?"
            )
            raise PermanentSinkError(f"{what} is in {have} in Tryton, the event is in {code}")
        return digits

    # -- order_booked ----------------------------------------------------------------------
    def _book(self, event: Event, env: Mapping[str, Any], key: str, p: m.Progress) -> None:
        order_id = str(env["order_id"])
        marked = [
            r for step, r in self._marked("sale.sale", "comment", order_id, key) if step == m.SALE
        ]
        if marked:
            sale = self._read1("sale.sale", marked[0], ["state", "party"])
            p.ref(m.PARTY, sale["party"])
            if sale["state"] == "draft":  # created, then interrupted before the quote
                self._button("sale.sale", "quote", [marked[0]])
                p.wrote = True
            p.complete(m.SALE, marked[0])
            return
        other = self._sale_for_order(order_id)
        if other is not None and other["state"] != "cancelled":
            raise _booked_twice(order_id, other)
        currency_id, digits = self._currency(str(event["currency"]))
        lines = self._sale_lines(m.price_lines(event["lines"], digits))
        party, address = self._party(str(event["customer_id"]))
        p.ref(m.PARTY, party)
        (sale_id,) = self._m(
            "sale.sale",
            "create",
            [self._sale_values(event, env, key, party, address, currency_id, lines)],
        )
        p.wrote = True
        p.ref(m.SALE, sale_id)
        self._button("sale.sale", "quote", [sale_id])
        p.complete(m.SALE, sale_id)

    def _sale_values(
        self,
        event: Event,
        env: Mapping[str, Any],
        key: str,
        party: int,
        address: int,
        currency_id: int,
        lines: list[dict[str, Any]],
    ) -> dict[str, Any]:
        order_id = str(env["order_id"])
        return {
            "party": party,
            "invoice_address": address,
            "shipment_address": address,
            "currency": currency_id,
            "reference": _stored(order_id),
            "description": f"{event.get('booking_kind', 'booking')} {order_id}",
            "comment": m.marker(m.SALE, key),
            "sale_date": m.event_day(env["occurred_at"]),
            "payment_term": self._cfg()["payment_term"],
            # Revline creates each invoice itself (split billing): Tryton must not
            # draft one of the whole sale when it is confirmed.
            "invoice_method": "manual",
            "lines": [["create", lines]],
        }

    # -- order_amended ---------------------------------------------------------------------
    def _amend(self, event: Event, env: Mapping[str, Any], key: str, p: m.Progress) -> None:
        sale = self._require_sale(str(env["order_id"]), "order_amended")
        sale_id = int(sale["id"])
        p.ref(m.PARTY, sale["party"])
        if m.has_marker(sale["comment"], m.SALE, key):
            if sale["state"] == "draft":
                self._button("sale.sale", "quote", [sale_id])
                p.wrote = True
            p.complete(m.SALE, sale_id)
            return
        if sale["state"] not in ("draft", "quotation"):
            raise PermanentSinkError(
                f"sale {sale_id} for order {env['order_id']} is {sale['state']}: Tryton does not "
                "change the lines of a confirmed sale; amendment "
                f"{env.get('amendment_number')} needs a credit note and a new order"
            )
        digits = self._check_currency(sale, str(event["currency"]), f"sale {sale_id}")
        lines = self._sale_lines(m.price_lines(event["lines"], digits))
        if sale["state"] == "quotation":
            self._button("sale.sale", "draft", [sale_id])
        # Lines and marker in one write: the amendment is all there or not at all.
        self._m(
            "sale.sale",
            "write",
            [sale_id],
            {
                "lines": [["delete", list(sale["lines"])], ["create", lines]],
                "comment": m.add_marker(sale["comment"], m.SALE, key),
            },
        )
        p.wrote = True
        self._button("sale.sale", "quote", [sale_id])
        p.complete(m.SALE, sale_id)

    # -- order_cancelled -------------------------------------------------------------------
    def _cancel(self, event: Event, env: Mapping[str, Any], key: str, p: m.Progress) -> None:
        order_id = str(env["order_id"])
        sale = self._require_sale(order_id, "order_cancelled")
        sale_id = int(sale["id"])
        p.ref(m.PARTY, sale["party"])
        day = m.event_day(env["occurred_at"])
        if sale["state"] in ("draft", "quotation"):
            self._button("sale.sale", "cancel", [sale_id])
            p.wrote = True
        elif sale["state"] != "cancelled":
            # One credit note per invoice of the order (a deposit and a balance: two), then
            # one crediting each refund's credit note (see the module docstring): the
            # order's documents then owe the customer what was paid and not refunded.
            own = [int(i) for i in sale["invoices"]]
            fields = ["state", "comment", "total_amount", "amount_to_pay", "payment_lines",
                      "description"]  # fmt: skip
            rows = self._read("account.invoice", own, fields)
            refunds = self._read(
                "account.invoice", sorted(self._order_invoices(order_id) - set(own)), fields
            )
            m.refuse_a_second_cancellation(order_id, key, [
                r["comment"] for r in refunds
                if str(r["description"] or "").startswith("cancellation ")
            ])  # fmt: skip
            rows += [
                r for r in refunds
                if str(r["description"] or "").startswith("refund ")
                and r["state"] in ("posted", "paid") and Decimal(r["total_amount"]) < 0
                and any(step == m.CREDIT_NOTE for step, _ in m.markers(r["comment"]))
            ]  # fmt: skip
            for invoice in rows:
                credit = self._credit_invoice(invoice, key, day, p)
                # The refs name the first credit note (as lookup does: lowest id first).
                if credit is not None and m.CREDIT_NOTE not in p.done:
                    p.complete(m.CREDIT_NOTE, credit)
        if not m.has_marker(sale["comment"], m.SALE, key):
            self._m(
                "sale.sale",
                "write",
                [sale_id],
                {"comment": m.add_marker(sale["comment"], m.SALE, key)},
            )
            p.wrote = True
        p.complete(m.SALE, sale_id)

    def _credit_invoice(
        self, invoice: Mapping[str, Any], key: str, day: dt.date, p: m.Progress
    ) -> int | None:
        inv_id = int(invoice["id"])
        # The credit notes of this invoice: their lines' origin is one of its lines.
        credits = self._m(
            "account.invoice", "search_read",
            [["lines.origin.invoice", "=", inv_id, "account.invoice.line"]],
            0, None, [["id", "ASC"]], ["comment", "state"],
        )  # fmt: skip
        # First: the invoice is cancelled once credited with refund, so look before judging it.
        mine = [int(c["id"]) for c in credits if m.has_marker(c["comment"], m.CREDIT_NOTE, key)]
        if mine:
            return mine[0]
        if invoice["state"] == "draft":
            self._button("account.invoice", "cancel", [inv_id])
            p.wrote = True
            return None
        if invoice["state"] not in ("posted", "paid"):
            return None
        # A credit note copies its invoice's comment: one without a credit-note marker is an
        # earlier attempt's credit, interrupted before re-marking (a refund's has its own).
        # Crediting a refund's credit note copies that note's marker: a credit whose comment
        # is still the note's own is such an interrupted attempt too (adopted, not credited
        # again, or a replay would give the refund back twice).
        credit_id: int | None = next(
            (
                int(c["id"])
                for c in credits
                if not any(step == m.CREDIT_NOTE for step, _ in m.markers(c["comment"]))
                or c["comment"] == invoice["comment"]
            ),
            None,
        )
        if credit_id is None:
            unpaid = not invoice["payment_lines"]
            created: list[int] = []

            def drive(
                execute: Callable[[dict[str, Any], str], dict[str, Any]], first: dict[str, Any]
            ) -> None:
                defaults = first.get("view", {}).get("defaults", {})
                out = execute(
                    {
                        "start": {
                            "with_refund": bool(unpaid and defaults.get("with_refund_allowed")),
                            "with_refund_allowed": defaults.get("with_refund_allowed", False),
                            "invoice_date": self._dates(day)["invoice_date"],
                        }
                    },
                    "credit",
                )
                for _action, data in out.get("actions", []):
                    created.extend(int(i) for i in (data or {}).get("res_id", []))

            self._wizard("account.invoice.credit", "account.invoice", inv_id, drive)
            p.wrote = True
            if not created:
                raise PermanentSinkError(f"Tryton did not credit invoice {inv_id}")
            credit_id = created[0]
        credit = self._read1("account.invoice", credit_id, ["state"])
        self._m(
            "account.invoice",
            "write",
            [credit_id],
            {"comment": m.marker(m.CREDIT_NOTE, key), "description": f"cancellation {key}"},
        )
        p.wrote = True
        if credit["state"] == "draft":
            self._post(credit_id)
        return credit_id

    # -- invoice_issued --------------------------------------------------------------------
    def _invoice(self, event: Event, env: Mapping[str, Any], key: str, p: m.Progress) -> None:
        """One Tryton invoice per invoice_issued, with the event's own lines, tax and total.

        Step "sale": the first invoice confirms the sale (its invoice method is manual, so
        Tryton drafts nothing itself; a confirmed sale's lines no longer change). Step
        "invoice": an invoice created with the marker, its lines' origin the sale's lines
        (that is what ties it to the order), the upstream tax as a manual tax line, then
        posted. A draft left by a refused post is found by its marker and posted.
        """
        order_id = str(env["order_id"])
        invoice_ref = str(env.get("invoice_id") or key)
        sale = self._require_sale(order_id, "invoice_issued")
        sale_id = int(sale["id"])
        p.ref(m.PARTY, sale["party"])
        currency_id, digits = self._currency(str(event["currency"]))
        self._check_currency(sale, str(event["currency"]), f"sale {sale_id}")
        marked = [
            r
            for s, r in self._marked("account.invoice", "comment", order_id, key)
            if s == m.INVOICE
        ]
        invoice = (
            self._read1("account.invoice", marked[0], ["state", "total_amount", "number"])
            if marked
            else None
        )
        priced: list[m.PricedLine] = []
        if invoice is None:
            priced = m.price_lines(event["lines"], digits)
            self._product_map([ln.sku for ln in priced])
            if sum(ln.amount_minor for ln in priced) != int(event["subtotal_minor"]):
                raise PermanentSinkError(
                    f"invoice {invoice_ref}: lines sum to {sum(ln.amount_minor for ln in priced)} "
                    f"but subtotal_minor is {event['subtotal_minor']}"
                )
            if self._invoice_by_ref(order_id, invoice_ref) is not None:
                raise PermanentSinkError(
                    f"order {order_id} already has an invoice {invoice_ref} in Tryton, "
                    "issued under another key"
                )

        # Step "sale": confirmed (manual invoicing: Tryton drafts no invoice of its own).
        if sale["state"] == "cancelled":
            raise PermanentSinkError(f"sale {sale_id} for order {order_id} is cancelled")
        if sale["state"] in ("draft", "quotation") and sale.get("invoice_method") != "manual":
            # Booked before split billing: switch it while it is still a quotation.
            if sale["state"] == "quotation":
                self._button("sale.sale", "draft", [sale_id])
            self._m("sale.sale", "write", [sale_id], {"invoice_method": "manual"})
            sale = {**sale, "state": "draft"}
            p.wrote = True
        if sale["state"] == "draft":
            self._button("sale.sale", "quote", [sale_id])
            p.wrote = True
        if sale["state"] in ("draft", "quotation"):
            self._button("sale.sale", "confirm", [sale_id])
            p.wrote = True
        if not m.has_marker(sale["comment"], m.SALE, key):
            self._m(
                "sale.sale",
                "write",
                [sale_id],
                {"comment": m.add_marker(sale["comment"], m.SALE, key)},
            )
            p.wrote = True
        p.complete(m.SALE, sale_id)

        # Step "invoice": created whole (lines, tax, marker) in one call, then posted.
        if invoice is None:
            inv_id = self._create_invoice(event, env, key, sale, priced, currency_id, digits)
            p.wrote = True
            invoice = self._read1("account.invoice", inv_id, ["state", "total_amount", "number"])
        inv_id = int(invoice["id"])
        p.ref(m.INVOICE, inv_id)
        if invoice["state"] == "draft":
            total = m.to_minor(Decimal(invoice["total_amount"]), digits)
            if total != int(event["total_minor"]):
                raise PermanentSinkError(
                    f"invoice {inv_id} totals {total} in Tryton "
                    f"but the event says {event['total_minor']}"
                )
            self._post(inv_id)
            p.wrote = True
        elif invoice["state"] == "cancelled" and not invoice.get("number"):
            # A draft the cancellation withdrew: never issued. (One numbered when posted,
            # then credited by the cancellation, is this event applied.)
            raise PermanentSinkError(f"invoice {inv_id} for {invoice_ref} is cancelled in Tryton")
        p.complete(m.INVOICE, inv_id)

    def _create_invoice(
        self,
        event: Event,
        env: Mapping[str, Any],
        key: str,
        sale: Mapping[str, Any],
        priced: Sequence[m.PricedLine],
        currency_id: int,
        digits: int,
    ) -> int:
        sale_lines = self._read("sale.line", [int(i) for i in sale["lines"]], ["type", "product"])
        values = self._invoice_values(
            event, env, key, sale, priced, currency_id, digits, sale_lines,
            self._dates(m.event_day(env["occurred_at"])),
        )  # fmt: skip
        (inv_id,) = self._m("account.invoice", "create", [values])
        return int(inv_id)

    def _invoice_values(
        self,
        event: Event,
        env: Mapping[str, Any],
        key: str,
        sale: Mapping[str, Any],
        priced: Sequence[m.PricedLine],
        currency_id: int,
        digits: int,
        sale_lines: Sequence[Mapping[str, Any]],
        dates: Mapping[str, dt.date],
    ) -> dict[str, Any]:
        """An invoice of the event's lines, created whole (lines, tax, marker) in one call;
        ``sale_lines``: the sale's lines read with ``type`` and ``product``."""
        cfg = self._cfg()
        order_id = str(env["order_id"])
        invoice_ref = str(env.get("invoice_id") or key)
        products = self._product_map([ln.sku for ln in priced])
        # Each line's origin is the sale's line of the same product (else its first line):
        # Tryton's own link from an invoice to its sale, which scopes lookups to the order.
        sale_lines = [r for r in sale_lines if r["type"] == "line"]
        if not sale_lines:
            raise PermanentSinkError(f"sale {sale['id']} for order {order_id} has no lines")
        by_product: dict[int, int] = {}
        for r in sale_lines:
            if r.get("product") is not None:
                by_product.setdefault(int(r["product"]), int(r["id"]))
        lines = [
            {
                "type": "line",
                "company": cfg["company"],
                "currency": currency_id,
                "product": products[ln.sku][0],
                "unit": products[ln.sku][1],
                "account": products[ln.sku][2],
                "quantity": float(ln.quantity),
                "unit_price": ln.unit_price,
                "description": ln.description,
                "origin": f"sale.line,{by_product.get(products[ln.sku][0], sale_lines[0]['id'])}",
            }
            for ln in priced
        ]
        values: dict[str, Any] = {
            "type": "out",
            "company": cfg["company"],
            "party": sale["party"],
            "invoice_address": sale["invoice_address"],
            "account": cfg["receivable"],
            "journal": cfg["journal"],
            "currency": currency_id,
            "payment_term": cfg["payment_term"],
            **dates,
            "reference": _stored(invoice_ref),
            "description": f"{invoice_ref} for order {order_id}",
            "comment": m.marker(m.INVOICE, key),
            "lines": [["create", lines]],
        }
        if event.get("due_at") is not None:
            values["payment_term_date"] = m.event_day(event["due_at"])
        tax = int(event.get("tax_minor") or 0)
        if tax:
            # The source system computed the tax; a manual tax line keeps it exact.
            values["taxes"] = [
                [
                    "create",
                    [
                        {
                            "description": "Sales tax (as invoiced upstream)",
                            "tax": cfg["tax"],
                            "account": cfg["tax_account"],
                            "base": m.to_major(int(event["subtotal_minor"]), digits),
                            "amount": m.to_major(tax, digits),
                            "manual": True,
                        }
                    ],
                ]
            ]
        return values

    def _dates(self, day: dt.date) -> dict[str, dt.date]:
        """invoice_date/accounting_date for a document the source dated ``day``.

        Tryton numbers customer invoices from a strict sequence and refuses an
        invoice dated before one already numbered (a legal rule in many countries).
        Events from different orders arrive slightly out of date order, so the
        invoice date moves forward to the latest one numbered, while the accounting
        date stays the source's day: revenue lands in the period the source says.
        """
        later = self._m(
            "account.invoice", "search_read",
            [["type", "=", "out"], ["number", "!=", None], ["invoice_date", ">", day]],
            0, 1, [["invoice_date", "DESC"]], ["invoice_date"],
        )  # fmt: skip
        if not later:
            return {"invoice_date": day, "accounting_date": day}
        return {"invoice_date": later[0]["invoice_date"], "accounting_date": day}

    def _confirm_post_warnings(self, invoices: Sequence[int]) -> None:
        """Confirm beforehand the "payment term date in the past" warning posting each
        invoice raises (a back-dated invoice always does): one call for all, instead of
        each post being refused, confirmed and run again. The key is Tryton's own
        (``res.user.warning.format``: md5 of "account.invoice,<id>", then the name); if
        it ever changes, ``_Rpc.call`` still confirms the warnings one by one."""
        if not invoices:
            return
        self._cfg()  # logged in: the user id is known
        self._m("res.user.warning", "create", [
            {"user": self._rpc.user_id, "always": False,
             "name": f"{hashlib.md5(f'account.invoice,{i}'.encode()).hexdigest()}"
                     ".invoice_payment_term"}
            for i in invoices
        ])  # fmt: skip

    def _post(self, invoice: int) -> None:
        try:
            self._confirm_post_warnings([invoice])
            self._button("account.invoice", "post", [invoice])
        except PermanentSinkError as exc:
            # Another worker numbered a later invoice between our date check and this
            # post: re-date it; the retry then succeeds, so this one is transient.
            (row,) = self._read("account.invoice", [invoice], ["invoice_date", "accounting_date"])
            day = row["accounting_date"] or row["invoice_date"]
            if day is None or row["invoice_date"] is None:
                raise
            dates = self._dates(day)
            if dates["invoice_date"] <= row["invoice_date"]:
                raise
            self._m("account.invoice", "write", [invoice], dates)
            raise TransientSinkError(f"invoice {invoice}: numbering raced: {exc}") from exc

    # -- payment_captured ------------------------------------------------------------------
    def _payment_move(self, order_id: str, key: str, step: str) -> int | None:
        moves = [
            r
            for s, r in self._marked("account.move", "description", order_id, key)
            if s == step
        ]
        return moves[0] if moves else None

    _PAY_FIELDS = ("party", "currency", "company", "account", "alternative_payees")

    def _pay(
        self,
        invoice: int,
        amount: Decimal,
        day: dt.date,
        description: str,
        row: Mapping[str, Any] | None = None,
    ) -> None:
        """Pay ``invoice`` through Tryton's own wizard. The start view's defaults are what
        ``account.invoice.pay`` computes from the invoice (payee: its party, its currency,
        company and account), so they are taken from ``row`` (read if not given) instead
        of executing the start state; an invoice with alternative payees reads them."""
        cfg = self._cfg()
        if row is None or any(f not in row for f in self._PAY_FIELDS):
            row = self._read1("account.invoice", invoice, self._PAY_FIELDS)
        known = not row.get("alternative_payees")

        def drive(
            execute: Callable[[dict[str, Any], str], dict[str, Any]], first: dict[str, Any]
        ) -> None:
            assert row is not None
            defaults = (
                {"payee": row["party"], "currency": row["currency"],
                 "company": row["company"], "invoice_account": row["account"]}
                if known else first["view"]["defaults"]
            )  # fmt: skip
            data: dict[str, Any] = {
                "start": {
                    "payee": defaults["payee"],
                    "amount": amount,
                    "currency": defaults["currency"],
                    "description": description,
                    "payment_method": cfg["payment_method"],
                    "date": day,
                    "company": defaults["company"],
                    "invoice_account": defaults["invoice_account"],
                }
            }
            out = execute(data, "choice")
            view = out.get("view") or {}
            if view.get("state") == "ask":
                # Less than the open balance: book it as a partial payment, nothing written off.
                ask = view.get("defaults", {})
                data["ask"] = {
                    k: ask[k]
                    for k in (
                        "amount",
                        "currency",
                        "company",
                        "invoice",
                        "lines_to_pay",
                        "lines",
                        "payment_lines",
                    )
                    if k in ask
                }
                data["ask"]["type"] = "partial"
                execute(data, "pay")

        self._wizard("account.invoice.pay", "account.invoice", invoice, drive, read_start=not known)

    def _invoice_by_ref(self, order_id: str, invoice_ref: str) -> dict[str, Any] | None:
        """The order's invoice (not a credit note) whose reference is ``invoice_ref``."""
        ids = self._search(
            "account.invoice",
            [
                ["reference", "=", _stored(invoice_ref)],
                ["type", "=", "out"],
                ["comment", "like", "%[revline step=invoice %"],
                ["sales.reference", "=", _stored(order_id)],
            ],
        )
        if not ids:
            return None
        return self._read1(
            "account.invoice", ids[0], ["state", "currency", "amount_to_pay", "total_amount"]
        )

    def _payment(self, event: Event, env: Mapping[str, Any], key: str, p: m.Progress) -> None:
        order_id = str(env["order_id"])
        invoice_ref = str(env.get("invoice_id") or "")
        invoice = self._invoice_by_ref(order_id, invoice_ref)
        if invoice is None:
            raise PermanentSinkError(
                f"payment {env.get('payment_id')}: Tryton has no invoice {invoice_ref} "
                f"for order {order_id}"
            )
        inv_id = int(invoice["id"])
        p.ref(m.INVOICE, inv_id)
        move = self._payment_move(order_id, key, m.PAYMENT)
        if move is None:
            digits = self._check_currency(invoice, str(event["currency"]), f"invoice {inv_id}")
            amount = m.to_major(int(event["amount_minor"]), digits)
            if invoice["state"] != "posted":
                raise PermanentSinkError(
                    f"invoice {inv_id} ({invoice_ref}) is {invoice['state']}: cannot take a payment"
                )
            if amount <= 0 or amount > Decimal(invoice["amount_to_pay"]):
                raise PermanentSinkError(
                    f"payment of {amount} {event['currency']} does not fit invoice {invoice_ref}'s "
                    f"open balance {invoice['amount_to_pay']}"
                )
            description = (
                f"{m.marker(m.PAYMENT, key)} {env.get('payment_id')} "
                f"{event.get('method', '')} {event.get('processor_ref', '')}"
            ).strip()
            self._pay(inv_id, amount, m.event_day(env["occurred_at"]), description)
            p.wrote = True
            move = self._payment_move(order_id, key, m.PAYMENT)
            if move is None:
                raise PermanentSinkError(f"Tryton took payment {key} but its move is not findable")
        p.complete(m.PAYMENT, move)

    # -- refund_issued ---------------------------------------------------------------------
    def _refund(self, event: Event, env: Mapping[str, Any], key: str, p: m.Progress) -> None:
        order_id = str(env["order_id"])
        refund_ref = str(event.get("refund_id") or key)
        cfg = self._cfg()
        currency_id, digits = self._currency(str(event["currency"]))
        amount = m.to_major(int(event["amount_minor"]), digits)
        if amount <= 0:
            raise PermanentSinkError(f"refund {refund_ref}: amount {amount} is not positive")
        day = m.event_day(env["occurred_at"])
        marked = [
            r
            for s, r in self._marked("account.invoice", "comment", order_id, key)
            if s == m.CREDIT_NOTE
        ]
        reason = f"Refund {refund_ref}: {event.get('reason', '')}".strip()
        if not marked:
            payment_id = str(env.get("payment_id") or "")
            paying = self._cancellation_credit(order_id, key, payment_id, amount)
            if paying is not None:
                self._pay_out(paying, order_id, key, f"{refund_ref} {payment_id}", amount, day, p)
                return
        if marked:
            credit_id = marked[0]
        else:
            sale = self._require_sale(order_id, "refund_issued")
            p.ref(m.PARTY, sale["party"])
            (product, uom, account) = self._product_map([self._names["refund"]])[
                self._names["refund"]
            ]
            # The credit note's line credits a line of the invoice the refunded payment
            # paid: Tryton's own link, which ties the credit note to the order.
            credited = self._refunded_line(order_id, str(env.get("payment_id") or ""))
            (credit_id,) = self._m(
                "account.invoice",
                "create",
                [
                    {
                        "type": "out",
                        "company": cfg["company"],
                        "party": sale["party"],
                        "invoice_address": sale["invoice_address"],
                        "account": cfg["receivable"],
                        "journal": cfg["journal"],
                        "currency": currency_id,
                        "payment_term": cfg["payment_term"],
                        **self._dates(day),
                        "reference": _stored(refund_ref),
                        "description": (
                            f"refund {refund_ref} of {env.get('payment_id')} ({order_id})"
                        ),
                        "comment": m.marker(m.CREDIT_NOTE, key),
                        "lines": [
                            [
                                "create",
                                [
                                    {
                                        "type": "line",
                                        "company": cfg["company"],
                                        "currency": currency_id,
                                        "product": product,
                                        "unit": uom,
                                        "account": account,
                                        "quantity": -1.0,
                                        "unit_price": amount,
                                        "description": reason,
                                        **(
                                            {"origin": f"account.invoice.line,{credited}"}
                                            if credited is not None
                                            else {}
                                        ),
                                    }
                                ],
                            ]
                        ],
                    }
                ],
            )
            p.wrote = True
        credit = self._read1("account.invoice", credit_id, ["state", "party"])
        p.ref(m.PARTY, credit["party"])
        p.ref(m.CREDIT_NOTE, credit_id)
        if credit["state"] == "draft":
            self._post(credit_id)
            p.wrote = True
        p.complete(m.CREDIT_NOTE, credit_id)

        move = self._payment_move(order_id, key, m.REFUND_PAYMENT)
        if move is None:
            description = f"{m.marker(m.REFUND_PAYMENT, key)} {refund_ref} {env.get('payment_id')}"
            self._pay(credit_id, -amount, day, description)
            p.wrote = True
            move = self._payment_move(order_id, key, m.REFUND_PAYMENT)
            if move is None:
                raise PermanentSinkError(f"Tryton paid refund {key} but its move is not findable")
        p.complete(m.REFUND_PAYMENT, move)

    def _cancellation_credit(
        self, order_id: str, key: str, payment_id: str, amount: Decimal
    ) -> int | None:
        """The cancellation credit note a refund after the cancellation pays out; None when
        the order has none (not cancelled once invoiced: the refund is a credit note of its
        own). The note of the invoice the refunded payment paid, else the first with enough
        left open; a replay finds its own move's."""
        move = self._payment_move(order_id, key, m.REFUND_PAYMENT)
        if move is not None:
            origin = self._read1("account.move", move, ["origin"])["origin"]
            return _origin_id(origin, "account.invoice")
        invoices = self._sale_invoices(order_id)
        if not invoices:
            return None
        rows = self._m(
            "account.invoice", "search_read",
            [["lines.origin.invoice", "in", invoices, "account.invoice.line"],
             ["description", "like", "cancellation %"]],
            0, None, [["id", "ASC"]], ["state", "total_amount", "amount_to_pay", "comment"],
        )  # fmt: skip
        notes = [
            n
            for n in rows
            if Decimal(n["total_amount"]) < 0
            and any(step == m.CREDIT_NOTE for step, _ in m.markers(n["comment"]))
        ]
        if not notes:
            return None
        open_ = [
            int(n["id"]) for n in notes
            if n["state"] == "posted" and abs(Decimal(n["amount_to_pay"])) >= amount
        ]  # fmt: skip
        if not open_:
            raise PermanentSinkError(
                f"refund of {amount} for cancelled order {order_id}: its credit notes have "
                "less than that left to pay out"
            )
        paid = self._paid_invoice(order_id, payment_id, invoices)
        preferred = self._search("account.invoice", [
            ["id", "in", open_], ["lines.origin.invoice", "=", paid, "account.invoice.line"],
        ])  # fmt: skip
        return (preferred or open_)[0]

    def _pay_out(
        self, credit_id: int, order_id: str, key: str, what: str, amount: Decimal,
        day: dt.date, p: m.Progress,
    ) -> None:  # fmt: skip
        """A refund after the cancellation: the money paid back against its credit note.
        The refs name that credit note (the cancellation's; the refund's own marker is on
        the move alone, so lookup finds the refund payment only)."""
        credit = self._read1("account.invoice", credit_id, ["party"])
        p.ref(m.PARTY, credit["party"])
        p.ref(m.CREDIT_NOTE, credit_id)
        move = self._payment_move(order_id, key, m.REFUND_PAYMENT)
        if move is None:
            self._pay(credit_id, -amount, day, f"{m.marker(m.REFUND_PAYMENT, key)} {what}")
            p.wrote = True
            move = self._payment_move(order_id, key, m.REFUND_PAYMENT)
            if move is None:
                raise PermanentSinkError(f"Tryton paid refund {key} but its move is not findable")
        p.complete(m.REFUND_PAYMENT, move)

    def _paid_invoice(self, order_id: str, payment_id: str, invoices: Sequence[int]) -> int:
        """The order's invoice that payment ``payment_id`` paid (else its first invoice)."""
        paid = invoices[0]
        moves = self._m(
            "account.move", "search_read",
            [["origin", "in", [f"account.invoice,{i}" for i in invoices]],
             ["description", "like", "%[revline step=payment %"]],
            0, None, [["id", "ASC"]], ["description", "origin"],
        )  # fmt: skip
        for mv in moves:
            # A payment move's description: "<marker> <payment id> <method> <processor ref>".
            for _key, rest in m.marker_end(str(mv["description"] or ""), m.PAYMENT):
                rest = rest[1:] if rest.startswith(" ") else rest
                if payment_id and (rest == payment_id or rest.startswith(f"{payment_id} ")):
                    paid = _origin_id(mv["origin"], "account.invoice") or paid
        return paid

    def _refunded_line(self, order_id: str, payment_id: str) -> int | None:
        """A line of the order's invoice that payment ``payment_id`` paid (else of its
        first invoice); None when the order has no invoice in Tryton."""
        invoices = self._sale_invoices(order_id)
        if not invoices:
            return None
        paid = self._paid_invoice(order_id, payment_id, invoices)
        lines = self._read1("account.invoice", paid, ["lines"])["lines"]
        return min(int(i) for i in lines) if lines else None


class _Item:
    """One event of a wave, and the progress of its effect."""

    def __init__(self, index: int, event: Event) -> None:
        self.index = index
        self.event = event
        self.env = m.envelope(event)
        self.order = str(self.env["order_id"])
        self.key = str(self.env["idempotency_key"])
        self.etype = str(self.env["event_type"])
        self.p = m.Progress()


class _Wave:
    """Events of distinct orders, applied together (see ``TrytonErp.apply_many``).

    What each order has in Tryton is read once for the wave: its sales (by reference),
    their invoices, and for payments the moves of those invoices. An event is applied
    here only when that read proves its effect absent (no document of its order carries
    its key's marker); otherwise, or when a batched call is refused, ``apply``'s own
    path takes it."""

    _INVOICE_FIELDS = (
        "comment", "reference", "type", "state", "total_amount", "number", "currency",
        "amount_to_pay", "party", "company", "account", "alternative_payees",
    )  # fmt: skip

    def __init__(
        self,
        erp: TrytonErp,
        events: Sequence[tuple[int, Event]],
        out: list[EffectResult | Exception | None],
    ) -> None:
        self.erp = erp
        self.out = out
        self.items: list[_Item] = []
        for index, event in events:
            try:
                self.items.append(_Item(index, event))
            except (PermanentSinkError, KeyError) as exc:
                out[index] = (
                    exc if isinstance(exc, PermanentSinkError)
                    else PermanentSinkError(f"event without {exc}")
                )  # fmt: skip
        self.sales: dict[str, list[dict[str, Any]]] = {}
        self.invoices: dict[str, list[dict[str, Any]]] = {}
        self.moves: dict[str, list[dict[str, Any]]] = {}

    # -- outcomes ------------------------------------------------------------------------
    def _done(self, it: _Item) -> None:
        self.out[it.index] = m.result(it.order, it.key, it.p.wrote, it.p.refs)

    def _fail(self, it: _Item, exc: PermanentSinkError) -> None:
        self.out[it.index] = m.partial(it.p.done, exc, it.etype) if it.p.done else exc

    def _single(self, it: _Item) -> None:
        self.out[it.index] = self.erp._apply_one(it.event)

    def _fallback(self, items: Iterable[_Item]) -> None:
        """A batched call was refused: each document on its own (it finds what the
        batch did by its marker), so the refusal is only its document's."""
        for it in items:
            if self.out[it.index] is None:
                self._single(it)

    # -- reads ---------------------------------------------------------------------------
    def _read_sales(self, orders: Iterable[str]) -> None:
        refs = sorted({_stored(o) for o in orders})
        rows = self.erp._m(
            "sale.sale", "search_read", [["reference", "in", refs]], 0, None, [["id", "ASC"]],
            list(TrytonErp._SALE_FIELDS),
        )  # fmt: skip
        for r in rows:
            self.sales.setdefault(_unstored(r["reference"]), []).append(r)

    def _read_invoices(self, orders: Iterable[str]) -> None:
        """The invoices of the orders' sales (an order's are by id)."""
        owner: dict[int, str] = {}
        for order in orders:
            for sale in self.sales.get(order, []):
                for inv in sale["invoices"]:
                    owner[int(inv)] = order
        for r in self.erp._read("account.invoice", sorted(owner), self._INVOICE_FIELDS):
            self.invoices.setdefault(owner[int(r["id"])], []).append(r)

    def _read_moves(self, orders: Iterable[str]) -> None:
        owner = {
            f"account.invoice,{r['id']}": order
            for order in orders
            for r in self.invoices.get(order, [])
        }
        if not owner:
            return
        rows = self.erp._m(
            "account.move", "search_read", [["origin", "in", sorted(owner)]], 0, None,
            [["id", "ASC"]], ["description", "origin"],
        )  # fmt: skip
        for r in rows:
            self.moves.setdefault(owner[str(r["origin"])], []).append(r)

    # -- the wave ------------------------------------------------------------------------
    def run(self) -> None:
        groups: dict[str, list[_Item]] = {}
        for it in self.items:
            if it.etype in m.HANDLERS:
                groups.setdefault(it.etype, []).append(it)
            else:
                self.out[it.index] = m.not_applicable(it.order, it.key, it.etype)
        if not groups:
            return
        self.erp._cfg()
        self._read_sales(it.order for group in groups.values() for it in group)
        money = [*groups.get("invoice_issued", []), *groups.get("payment_captured", [])]
        if money:
            self._read_invoices(it.order for it in money)
        if "payment_captured" in groups:
            self._read_moves(it.order for it in groups["payment_captured"])
        self._book(groups.get("order_booked", []))
        self._amend(groups.get("order_amended", []))
        self._invoice(groups.get("invoice_issued", []))
        self._payment(groups.get("payment_captured", []))
        # Rare, and each touching several documents of its order: one at a time.
        for it in [*groups.get("order_cancelled", []), *groups.get("refund_issued", [])]:
            self._single(it)

    # -- order_booked --------------------------------------------------------------------
    def _book(self, group: list[_Item]) -> None:
        erp = self.erp
        fresh: list[tuple[_Item, int, list[dict[str, Any]]]] = []
        erp._load_products(ln["sku"] for it in group for ln in it.event.get("lines") or ())
        for it in group:
            rows = self.sales.get(it.order, [])
            if any(m.has_marker(r["comment"], m.SALE, it.key) for r in rows):
                self._single(it)  # created before (perhaps interrupted before its quote)
                continue
            other = _live_sale(rows)
            if other is not None and other["state"] != "cancelled":
                self._fail(it, _booked_twice(it.order, other))
                continue
            try:
                currency_id, digits = erp._currency(str(it.event["currency"]))
                lines = erp._sale_lines(m.price_lines(it.event["lines"], digits))
            except PermanentSinkError as exc:
                self._fail(it, exc)
                continue
            fresh.append((it, currency_id, lines))
        if not fresh:
            return
        try:
            parties = self._parties({str(it.event["customer_id"]) for it, _, _ in fresh})
            values = []
            for it, currency_id, lines in fresh:
                party, address = parties[str(it.event["customer_id"])]
                it.p.ref(m.PARTY, party)
                values.append(
                    erp._sale_values(it.event, it.env, it.key, party, address, currency_id, lines)
                )
            ids = [int(i) for i in erp._m("sale.sale", "create", values)]
            for (it, _, _), sale_id in zip(fresh, ids, strict=True):
                it.p.wrote = True
                it.p.ref(m.SALE, sale_id)
            erp._button("sale.sale", "quote", ids)
        except PermanentSinkError:
            self._fallback(it for it, _, _ in fresh)
            return
        for it, _, _ in fresh:
            it.p.complete(m.SALE, it.p.refs[m.SALE])
            self._done(it)

    def _parties(self, customers: set[str]) -> dict[str, tuple[int, int]]:
        """customer id -> (party, its first address), creating the missing parties in one
        call (a code another worker created meanwhile: the call is refused, and the
        bookings go one at a time, which finds it)."""
        erp = self.erp
        codes = {c: _stored(c) for c in customers}

        def read(wanted: Iterable[str]) -> dict[str, dict[str, Any]]:
            rows = erp._m(
                "party.party", "search_read", [["code", "in", sorted(set(wanted))]], 0, None,
                [["id", "ASC"]], ["code", "addresses"],
            )  # fmt: skip
            found: dict[str, dict[str, Any]] = {}
            for r in rows:
                found.setdefault(str(r["code"]), r)
            return found

        found = read(codes.values())
        missing = sorted(c for c in customers if codes[c] not in found)
        if missing:
            erp._m("party.party", "create", [
                {"name": c, "code": codes[c], "addresses": [["create", [{}]]]} for c in missing
            ])  # fmt: skip
            found.update(read(codes[c] for c in missing))
        out: dict[str, tuple[int, int]] = {}
        for c in customers:
            row = found.get(codes[c])
            if row is None or not row["addresses"]:
                out[c] = erp._party(c)  # vanished meanwhile, or has no address: the slow way
            else:
                out[c] = (int(row["id"]), int(row["addresses"][0]))
        return out

    # -- order_amended -------------------------------------------------------------------
    def _amend(self, group: list[_Item]) -> None:
        erp = self.erp
        fresh: list[tuple[_Item, dict[str, Any], list[dict[str, Any]]]] = []
        erp._load_products(ln["sku"] for it in group for ln in it.event.get("lines") or ())
        for it in group:
            sale = _live_sale(self.sales.get(it.order, []))
            if sale is None:
                self._fail(it, _no_sale(it.order, "order_amended"))
                continue
            it.p.ref(m.PARTY, sale["party"])
            if m.has_marker(sale["comment"], m.SALE, it.key):
                self._single(it)
                continue
            if sale["state"] not in ("draft", "quotation"):
                self._fail(it, PermanentSinkError(
                    f"sale {sale['id']} for order {it.order} is {sale['state']}: Tryton does "
                    "not change the lines of a confirmed sale; amendment "
                    f"{it.env.get('amendment_number')} needs a credit note and a new order"
                ))  # fmt: skip
                continue
            try:
                digits = erp._check_currency(sale, str(it.event["currency"]), f"sale {sale['id']}")
                lines = erp._sale_lines(m.price_lines(it.event["lines"], digits))
            except PermanentSinkError as exc:
                self._fail(it, exc)
                continue
            fresh.append((it, sale, lines))
        if not fresh:
            return
        try:
            quotations = [int(sale["id"]) for _, sale, _ in fresh if sale["state"] == "quotation"]
            if quotations:
                erp._button("sale.sale", "draft", quotations)
            writes: list[Any] = []
            for it, sale, lines in fresh:
                # Lines and marker in one write: the amendment is all there or not at all.
                writes += [[int(sale["id"])], {
                    "lines": [["delete", list(sale["lines"])], ["create", lines]],
                    "comment": m.add_marker(sale["comment"], m.SALE, it.key),
                }]  # fmt: skip
            erp._m("sale.sale", "write", *writes)
            for it, _, _ in fresh:
                it.p.wrote = True
            erp._button("sale.sale", "quote", [int(sale["id"]) for _, sale, _ in fresh])
        except PermanentSinkError:
            self._fallback(it for it, _, _ in fresh)
            return
        for it, sale, _ in fresh:
            it.p.complete(m.SALE, sale["id"])
            self._done(it)

    # -- invoice_issued ------------------------------------------------------------------
    def _invoice(self, group: list[_Item]) -> None:
        erp = self.erp
        fresh: list[tuple[_Item, dict[str, Any], list[m.PricedLine], int, int]] = []
        erp._load_products(ln["sku"] for it in group for ln in it.event.get("lines") or ())
        for it in group:
            sale = _live_sale(self.sales.get(it.order, []))
            if sale is None:
                self._fail(it, _no_sale(it.order, "invoice_issued"))
                continue
            it.p.ref(m.PARTY, sale["party"])
            invoices = self.invoices.get(it.order, [])
            invoice_ref = str(it.env.get("invoice_id") or it.key)
            try:
                currency = str(it.event["currency"])
                currency_id, digits = erp._currency(currency)
                erp._check_currency(sale, currency, f"sale {sale['id']}")
                if any(m.has_marker(r["comment"], m.INVOICE, it.key) for r in invoices):
                    self._single(it)  # created before: posted, or a draft to post
                    continue
                priced = m.price_lines(it.event["lines"], digits)
                erp._product_map([ln.sku for ln in priced])
                if sum(ln.amount_minor for ln in priced) != int(it.event["subtotal_minor"]):
                    raise PermanentSinkError(
                        f"invoice {invoice_ref}: lines sum to "
                        f"{sum(ln.amount_minor for ln in priced)} but subtotal_minor is "
                        f"{it.event['subtotal_minor']}"
                    )
                if _by_ref(invoices, invoice_ref) is not None:
                    raise PermanentSinkError(
                        f"order {it.order} already has an invoice {invoice_ref} in Tryton, "
                        "issued under another key"
                    )
                if sale["state"] == "cancelled":
                    raise PermanentSinkError(
                        f"sale {sale['id']} for order {it.order} is cancelled"
                    )
            except PermanentSinkError as exc:
                self._fail(it, exc)
                continue
            if sale["state"] in ("draft", "quotation") and sale.get("invoice_method") != "manual":
                self._single(it)  # booked before split billing: switched on its own
                continue
            fresh.append((it, sale, priced, currency_id, digits))
        if not fresh:
            return
        # Step "sale": confirmed (manual invoicing: Tryton drafts no invoice of its own).
        try:
            drafts = [int(s["id"]) for _, s, _, _, _ in fresh if s["state"] == "draft"]
            if drafts:
                erp._button("sale.sale", "quote", drafts)
            quoted = [int(s["id"]) for _, s, _, _, _ in fresh
                      if s["state"] in ("draft", "quotation")]  # fmt: skip
            if quoted:
                erp._button("sale.sale", "confirm", quoted)
            writes: list[Any] = []
            for it, sale, _, _, _ in fresh:
                if int(sale["id"]) in quoted:
                    it.p.wrote = True
                if not m.has_marker(sale["comment"], m.SALE, it.key):
                    writes += [[int(sale["id"])],
                               {"comment": m.add_marker(sale["comment"], m.SALE, it.key)}]
            if writes:
                erp._m("sale.sale", "write", *writes)
        except PermanentSinkError:
            self._fallback(it for it, _, _, _, _ in fresh)
            return
        for it, sale, _, _, _ in fresh:
            if not m.has_marker(sale["comment"], m.SALE, it.key):
                it.p.wrote = True
            it.p.complete(m.SALE, sale["id"])

        # Step "invoice": created whole, all in one call, then posted together.
        lines = {
            int(r["id"]): r
            for r in erp._read(
                "sale.line",
                sorted({int(i) for _, s, _, _, _ in fresh for i in s["lines"]}),
                ["type", "product"],
            )
        }
        later = erp._m(
            "account.invoice", "search_read",
            [["type", "=", "out"], ["number", "!=", None]],
            0, 1, [["invoice_date", "DESC"]], ["invoice_date"],
        )  # fmt: skip
        latest: dt.date | None = later[0]["invoice_date"] if later else None
        made: list[tuple[_Item, dict[str, Any], int]] = []
        values: list[dict[str, Any]] = []
        for it, sale, priced, currency_id, digits in fresh:
            day = m.event_day(it.env["occurred_at"])
            # As _dates: the invoice date moves forward to the latest one numbered.
            dates = {"invoice_date": latest if latest is not None and latest > day else day,
                     "accounting_date": day}  # fmt: skip
            try:
                values.append(erp._invoice_values(
                    it.event, it.env, it.key, sale, priced, currency_id, digits,
                    [lines[int(i)] for i in sale["lines"] if int(i) in lines], dates,
                ))  # fmt: skip
            except PermanentSinkError as exc:
                self._fail(it, exc)
                continue
            made.append((it, sale, digits))
        if not made:
            return
        try:
            ids = [int(i) for i in erp._m("account.invoice", "create", values)]
        except PermanentSinkError:
            self._fallback(it for it, _, _ in made)
            return
        rows = {int(r["id"]): r
                for r in erp._read("account.invoice", ids, ["state", "total_amount"])}  # fmt: skip
        to_post: list[tuple[_Item, int]] = []
        for (it, _, digits), inv_id in zip(made, ids, strict=True):
            it.p.wrote = True
            it.p.ref(m.INVOICE, inv_id)
            total = m.to_minor(Decimal(rows[inv_id]["total_amount"]), digits)
            if total != int(it.event["total_minor"]):
                self._fail(it, PermanentSinkError(
                    f"invoice {inv_id} totals {total} in Tryton "
                    f"but the event says {it.event['total_minor']}"
                ))  # fmt: skip
                continue
            to_post.append((it, inv_id))
        if not to_post:
            return
        try:
            erp._confirm_post_warnings([inv for _, inv in to_post])
            erp._button("account.invoice", "post", [inv for _, inv in to_post])
        except PermanentSinkError:
            self._fallback(it for it, _ in to_post)  # each draft found by its marker, posted
            return
        for it, inv_id in to_post:
            it.p.complete(m.INVOICE, inv_id)
            self._done(it)

    # -- payment_captured ----------------------------------------------------------------
    def _payment(self, group: list[_Item]) -> None:
        erp = self.erp
        paid: list[_Item] = []
        for it in group:
            invoice_ref = str(it.env.get("invoice_id") or "")
            invoice = _by_ref(self.invoices.get(it.order, []), invoice_ref)
            if invoice is None:
                self._fail(it, PermanentSinkError(
                    f"payment {it.env.get('payment_id')}: Tryton has no invoice {invoice_ref} "
                    f"for order {it.order}"
                ))  # fmt: skip
                continue
            inv_id = int(invoice["id"])
            it.p.ref(m.INVOICE, inv_id)
            if any(m.has_marker(r["description"], m.PAYMENT, it.key)
                   for r in self.moves.get(it.order, [])):  # fmt: skip
                self._single(it)  # taken before
                continue
            try:
                digits = erp._check_currency(
                    invoice, str(it.event["currency"]), f"invoice {inv_id}"
                )
                amount = m.to_major(int(it.event["amount_minor"]), digits)
                if invoice["state"] != "posted":
                    raise PermanentSinkError(
                        f"invoice {inv_id} ({invoice_ref}) is {invoice['state']}: cannot take a "
                        "payment"
                    )
                if amount <= 0 or amount > Decimal(invoice["amount_to_pay"]):
                    raise PermanentSinkError(
                        f"payment of {amount} {it.event['currency']} does not fit invoice "
                        f"{invoice_ref}'s open balance {invoice['amount_to_pay']}"
                    )
                description = (
                    f"{m.marker(m.PAYMENT, it.key)} {it.env.get('payment_id')} "
                    f"{it.event.get('method', '')} {it.event.get('processor_ref', '')}"
                ).strip()
                # One wizard per payment: Tryton's pay wizard takes one invoice.
                erp._pay(inv_id, amount, m.event_day(it.env["occurred_at"]), description,
                         row=invoice)  # fmt: skip
            except PermanentSinkError as exc:
                self._fail(it, exc)
                continue
            it.p.wrote = True
            paid.append(it)
        if not paid:
            return
        self.moves.clear()
        self._read_moves(it.order for it in paid)
        for it in paid:
            move = next(
                (int(r["id"]) for r in self.moves.get(it.order, [])
                 if m.has_marker(r["description"], m.PAYMENT, it.key)), None,
            )  # fmt: skip
            if move is None:
                self._fail(it, PermanentSinkError(
                    f"Tryton took payment {it.key} but its move is not findable"
                ))  # fmt: skip
                continue
            it.p.complete(m.PAYMENT, move)
            self._done(it)


def _by_ref(invoices: Sequence[Mapping[str, Any]], invoice_ref: str) -> Mapping[str, Any] | None:
    """As ``TrytonErp._invoice_by_ref``, among an order's invoices read by id."""
    stored = _stored(invoice_ref)
    return next(
        (r for r in invoices
         if r["reference"] == stored and r["type"] == "out"
         and "[revline step=invoice " in str(r["comment"] or "")),
        None,
    )  # fmt: skip
