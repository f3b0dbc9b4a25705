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
  order (``account.invoice.credit`` wizard, reconciled against it while unpaid).
* invoice_issued → step "sale": confirm the sale on the first invoice (no more
  amendments); step "invoice": an invoice of the event's own lines (their origin the
  sale's lines), reference = invoice id, the upstream tax as a manual tax line, then
  posted. A deposit and its balance, or one invoice per shipment, are so many invoices.
* payment_captured → ``account.invoice.pay`` wizard on the order's invoice of that
  invoice id (partial payments allowed); the payment move's description carries the
  marker.
* refund_issued → step "credit_note": a posted credit note for the refunded amount
  (its line credits a line of the paid invoice, which ties it to the order); step
  "refund_payment": the money paid back, through the same wizard.

Ids Tryton would strip (outer whitespace) are stored encoded (``_stored``).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import threading
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from typing import Any

import httpx

from sinks._protocols import (
    EffectResult,
    ErpDocument,
    Event,
    PermanentSinkError,
    TransientSinkError,
)
from sinks.erp import _mapping as m
from sinks.erp._tryton_setup import PAYMENT_METHOD, REFUND_SKU, TAX_NAME

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
    ) -> None:
        ctx = {"active_model": model, "active_id": record, "active_ids": [record]}
        session, start, _end = self._rpc.call(f"wizard.{name}.create", context=ctx)

        def execute(data: dict[str, Any], state: str) -> dict[str, Any]:
            out = self._rpc.call(f"wizard.{name}.execute", session, data, state, context=ctx)
            return dict(out or {})

        try:
            first = execute({}, start)
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
                + "): prepare it with `python -m sinks.erp prepare DIR`"
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
        unknown = sorted(set(skus) - self._products.keys())
        if unknown:
            raise PermanentSinkError(
                f"unknown SKU(s) in Tryton (no salable product with a revenue account): {unknown}"
            )
        return {s: self._products[s] for s in skus}

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
        domain: list[Any] = [[field, "like", m.like_pattern(key)]]
        if model == "sale.sale":
            domain.append(["reference", "=", _stored(order_id)])
        fields = [field, "state"] if states else [field]
        if model == "account.move":
            fields.append("origin")
        rows = self._m(model, "search_read", domain, 0, None, [["id", "ASC"]], fields)
        rows = [r for r in rows if any(k == key for _s, k in m.markers(r.get(field)))]
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
            for step, k in m.markers(r.get(field))
            if k == key
        ]

    def _sale_invoices(self, order_id: str) -> list[int]:
        """The order's invoices (not credit notes): lines from the order's sale lines."""
        return self._search("account.invoice", [["sales.reference", "=", _stored(order_id)]])

    def _order_invoices(self, order_id: str) -> set[int]:
        """Ids of every invoice and credit note of the order."""
        own = self._sale_invoices(order_id)
        out = set(own)
        if own:
            out.update(self._search(
                "account.invoice",
                [["lines.origin.invoice", "in", own, "account.invoice.line"]],
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

    # -- shared pieces -------------------------------------------------------------------
    def _sale_for_order(self, order_id: str) -> dict[str, Any] | None:
        ids = self._search("sale.sale", [["reference", "=", _stored(order_id)]])
        if not ids:
            return None
        rows = self._read(
            "sale.sale",
            ids,
            [
                "state",
                "party",
                "currency",
                "comment",
                "lines",
                "invoices",
                "invoice_address",
                "untaxed_amount",
                "invoice_method",
            ],
        )
        # A cancelled booking may have been booked again; the live one is the order.
        live = [r for r in rows if r["state"] != "cancelled"]
        return (live or rows)[-1]

    def _require_sale(self, order_id: str, etype: str) -> dict[str, Any]:
        sale = self._sale_for_order(order_id)
        if sale is None:
            raise PermanentSinkError(
                f"{etype} for order {order_id}: Tryton has no sale with reference {order_id} "
                "(the booking has not been applied)"
            )
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
            raise PermanentSinkError(
                f"order {order_id} is already sale {other['id']} in Tryton, booked under "
                f"another key ({m.markers(other['comment'])[:1]}); not booking it twice"
            )
        currency_id, digits = self._currency(str(event["currency"]))
        lines = self._sale_lines(m.price_lines(event["lines"], digits))
        party, address = self._party(str(event["customer_id"]))
        p.ref(m.PARTY, party)
        cfg = self._cfg()
        (sale_id,) = self._m(
            "sale.sale",
            "create",
            [
                {
                    "party": party,
                    "invoice_address": address,
                    "shipment_address": address,
                    "currency": currency_id,
                    "reference": _stored(order_id),
                    "description": f"{event.get('booking_kind', 'booking')} {order_id}",
                    "comment": m.marker(m.SALE, key),
                    "sale_date": m.event_day(env["occurred_at"]),
                    "payment_term": cfg["payment_term"],
                    # Revline creates each invoice itself (split billing): Tryton must not
                    # draft one of the whole sale when it is confirmed.
                    "invoice_method": "manual",
                    "lines": [["create", lines]],
                }
            ],
        )
        p.wrote = True
        p.ref(m.SALE, sale_id)
        self._button("sale.sale", "quote", [sale_id])
        p.complete(m.SALE, sale_id)

    # -- order_amended ---------------------------------------------------------------------
    def _amend(self, event: Event, env: Mapping[str, Any], key: str, p: m.Progress) -> None:
        sale = self._require_sale(str(env["order_id"]), "order_amended")
        sale_id = int(sale["id"])
        p.ref(m.PARTY, sale["party"])
        if (m.SALE, key) in m.markers(sale["comment"]):
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
            # One credit note per invoice of the order (a deposit and a balance: two).
            for invoice in self._read(
                "account.invoice",
                [int(i) for i in sale["invoices"]],
                ["state", "comment", "total_amount", "amount_to_pay", "payment_lines"],
            ):
                credit = self._credit_invoice(invoice, key, day, p)
                # The refs name the first credit note (as lookup does: lowest id first).
                if credit is not None and m.CREDIT_NOTE not in p.done:
                    p.complete(m.CREDIT_NOTE, credit)
        if (m.SALE, key) not in m.markers(sale["comment"]):
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
        mine = [int(c["id"]) for c in credits if (m.CREDIT_NOTE, key) in m.markers(c["comment"])]
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
        credit_id: int | None = next(
            (
                int(c["id"])
                for c in credits
                if not any(step == m.CREDIT_NOTE for step, _ in m.markers(c["comment"]))
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
        if (m.SALE, key) not in m.markers(sale["comment"]):
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
        cfg = self._cfg()
        order_id = str(env["order_id"])
        invoice_ref = str(env.get("invoice_id") or key)
        products = self._product_map([ln.sku for ln in priced])
        # Each line's origin is the sale's line of the same product (else its first line):
        # Tryton's own link from an invoice to its sale, which scopes lookups to the order.
        sale_lines = [
            r
            for r in self._read("sale.line", [int(i) for i in sale["lines"]], ["type", "product"])
            if r["type"] == "line"
        ]
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
            **self._dates(m.event_day(env["occurred_at"])),
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
        (inv_id,) = self._m("account.invoice", "create", [values])
        return int(inv_id)

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

    def _post(self, invoice: int) -> None:
        try:
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

    def _pay(self, invoice: int, amount: Decimal, day: dt.date, description: str) -> None:
        cfg = self._cfg()

        def drive(
            execute: Callable[[dict[str, Any], str], dict[str, Any]], first: dict[str, Any]
        ) -> None:
            defaults = first["view"]["defaults"]
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

        self._wizard("account.invoice.pay", "account.invoice", invoice, drive)

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

    def _refunded_line(self, order_id: str, payment_id: str) -> int | None:
        """A line of the order's invoice that payment ``payment_id`` paid (else of its
        first invoice); None when the order has no invoice in Tryton."""
        invoices = self._sale_invoices(order_id)
        if not invoices:
            return None
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
        lines = self._read1("account.invoice", paid, ["lines"])["lines"]
        return min(int(i) for i in lines) if lines else None
