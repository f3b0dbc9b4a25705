"""A local Tryton ERP for the demo and the tests: database preparation and the server.

``prepare_database(directory)`` leaves a ready SQLite database in ``directory``:
modules sale + account_invoice, a company (USD), a chart of accounts, fiscal
years with invoice sequences and monthly periods, a default payment term, the
currencies Revline's workload uses (JPY with 0 digits) with rates, one product
per SKU of the reference data, a payment method for captured payments, a tax
record for the upstream-computed tax, and an admin login for JSON-RPC.

Activating the modules takes 25-65 s, so the first build is kept as a
template under ``<state dir>/tryton-template/<key>/`` (the key names the
installed trytond version and this file's setup revision); later calls copy it.

``start_server(database)`` runs ``trytond`` on a free 127.0.0.1 port as a
subprocess, waits until its JSON-RPC answers and returns a handle that stops it.

CLI: ``python -m revline.sinks.erp prepare DIR`` and ``python -m revline.sinks.erp serve DIR``.

The parts that import trytond/proteus run in a child process: trytond keeps its
configuration and database pools in process-wide globals, and the caller (the
pytest process, the sink worker) must stay a plain JSON-RPC client.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from revline.core.errors import ConfigurationError, InfrastructureError
from revline.core.settings import DATA_DIR, Settings

MODULES = ("sale", "account_invoice")
DEFAULT_DATABASE = "revline"
ADMIN_USER = "admin"
# A local, loopback-only development database: the password only keeps the login path real.
DEFAULT_PASSWORD = "revline-admin"
COMPANY_CURRENCY = "USD"
# code -> (name, symbol, digits); the workload's five currencies.
CURRENCIES: dict[str, tuple[str, str, int]] = {
    "USD": ("U.S. Dollar", "$", 2),
    "EUR": ("Euro", "€", 2),
    "GBP": ("Pound Sterling", "£", 2),
    "JPY": ("Yen", "¥", 0),
    "SEK": ("Swedish Krona", "kr", 2),
}
FISCAL_YEARS = tuple(range(2024, 2032))
PAYMENT_METHOD = "Revline captures"
TAX_NAME = "Revline sales tax"
REFUND_SKU = "REVLINE-REFUND"
# Bump when the prepared content changes, so stale templates are not reused.
SETUP_REVISION = 2

REFERENCE_FILE = DATA_DIR / "reference.yaml"


@dataclass(frozen=True)
class TrytonDatabase:
    """A prepared database: ``<directory>/<name>.sqlite`` plus the admin login."""

    directory: Path
    name: str = DEFAULT_DATABASE
    user: str = ADMIN_USER
    password: str = DEFAULT_PASSWORD

    @property
    def file(self) -> Path:
        return self.directory / f"{self.name}.sqlite"


def trytond_version() -> str:
    try:
        return importlib.metadata.version("trytond")
    except importlib.metadata.PackageNotFoundError as exc:
        raise ConfigurationError(
            "trytond is not installed: pip install -e '.[erp]' (or '.[dev]')"
        ) from exc


def tryton_available() -> bool:
    try:
        for dist in ("trytond", "trytond-sale", "trytond-account-invoice", "proteus"):
            importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def template_key() -> str:
    sale = importlib.metadata.version("trytond-sale")
    invoice = importlib.metadata.version("trytond-account-invoice")
    return f"trytond-{trytond_version()}-sale-{sale}-invoice-{invoice}-r{SETUP_REVISION}"


def default_state_dir() -> Path:
    return Settings().state_dir.resolve()


def _trytond_bin(name: str) -> str:
    # The console scripts live next to the interpreter in a venv; PATH may not have them.
    candidate = Path(sys.executable).with_name(name)
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise ConfigurationError(f"{name} not found next to {sys.executable} nor on PATH")
    return found


def write_config(directory: Path, port: int | None = None) -> Path:
    """A trytond.conf for a SQLite database directory (and a listen port for the server)."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = [
        "[database]",
        "uri = sqlite://",
        f"path = {directory}",
        "",
        "[session]",
        # Local tooling logs in repeatedly; the default (5 failures) would lock it out.
        "max_attempt = 100",
        "",
    ]
    if port is not None:
        lines += ["[web]", f"listen = 127.0.0.1:{port}", ""]
    path = directory / ("trytond.conf" if port is None else f"trytond-{port}.conf")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _run(cmd: Sequence[str], env: dict[str, str], what: str, timeout: float) -> None:
    proc = subprocess.run(
        list(cmd), env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout)[-4000:]
        raise InfrastructureError(f"{what} failed (exit {proc.returncode}): {tail}")


def build_template(target: Path, password: str = DEFAULT_PASSWORD) -> TrytonDatabase:
    """Build a database from nothing into ``target`` (25-65 s)."""
    target.mkdir(parents=True, exist_ok=True)
    db = TrytonDatabase(target, DEFAULT_DATABASE, ADMIN_USER, password)
    db.file.unlink(missing_ok=True)
    db.file.touch()  # trytond's SQLite backend refuses a database whose file is absent
    conf = write_config(target)
    with tempfile.NamedTemporaryFile("w", suffix=".pass", delete=False) as passfile:
        passfile.write(password + "\n")
    env = {**os.environ, "TRYTONPASSFILE": passfile.name, "TRYTOND_CONFIG": str(conf)}
    env.pop("TRYTOND_DATABASE_URI", None)
    admin = _trytond_bin("trytond-admin")
    try:
        _run(
            [admin, "-c", str(conf), "-d", db.name, "--all", "--email", "admin@example.com"],
            env,
            "trytond-admin --all",
            600,
        )
        _run(
            [admin, "-c", str(conf), "-d", db.name, "-u", *MODULES, "--activate-dependencies"],
            env,
            "trytond-admin module activation",
            900,
        )
    finally:
        os.unlink(passfile.name)
    _run(
        [sys.executable, "-m", "revline.sinks.erp", "_configure", str(conf), db.name],
        env,
        "company/chart/products setup",
        900,
    )
    return db


def prepare_database(
    directory: Path,
    *,
    name: str = DEFAULT_DATABASE,
    state_dir: Path | None = None,
    rebuild: bool = False,
) -> TrytonDatabase:
    """A ready database in ``directory``, copied from the cached template (built if absent)."""
    template = (state_dir or default_state_dir()) / "tryton-template" / template_key()
    template_db = TrytonDatabase(template)
    if rebuild or not (template / "READY").exists():
        # Build next to the final place and rename, so a killed build never looks ready.
        staging = template.with_name(template.name + f".build-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        build_template(staging)
        (staging / "READY").write_text(json.dumps({"built_at": time.time()}), encoding="utf-8")
        shutil.rmtree(template, ignore_errors=True)
        try:
            staging.rename(template)
        except OSError:
            # A concurrent session finished its own build first: use that one.
            shutil.rmtree(staging, ignore_errors=True)
            if not (template / "READY").exists():
                raise
        for stale in template.parent.iterdir():
            # Templates of other trytond versions or setup revisions are never used again.
            if stale != template and ".build-" not in stale.name:
                shutil.rmtree(stale, ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True)
    db = TrytonDatabase(directory, name)
    shutil.copyfile(template_db.file, db.file)
    write_config(directory)
    return db


# -- the server ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class TrytonServer:
    """A ``trytond`` process serving one database directory on 127.0.0.1."""

    database: TrytonDatabase
    port: int = 0
    log_file: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 60.0) -> TrytonServer:
        if self.running:
            return self
        if not self.port:
            self.port = free_port()
        conf = write_config(self.database.directory, self.port)
        log = self.log_file or self.database.directory / f"trytond-{self.port}.log"
        env = {**os.environ, "TRYTOND_CONFIG": str(conf)}
        env.pop("TRYTOND_DATABASE_URI", None)
        with open(log, "ab") as out:
            self.process = subprocess.Popen(
                [_trytond_bin("trytond"), "-c", str(conf), "-d", self.database.name],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C in the terminal is for the caller only
            )
        try:
            self._wait_ready(timeout, log)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float, log: Path) -> None:
        deadline = time.monotonic() + timeout
        body = {
            "id": 0,
            "method": "common.db.login",
            "params": [self.database.user, {"password": self.database.password}, "en"],
        }
        last = "no answer"
        with httpx.Client(timeout=5.0) as client:
            while time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    tail = log.read_text(errors="replace")[-3000:]
                    raise InfrastructureError(
                        f"trytond exited with {self.process.returncode}: {tail}"
                    )
                try:
                    # A real login also loads the database pool, so the first event is not slow.
                    resp = client.post(f"{self.url}/{self.database.name}/rpc/", json=body)
                    if resp.status_code == 200 and "result" in resp.json():
                        return
                    last = f"HTTP {resp.status_code}: {resp.text[:300]}"
                except httpx.HTTPError as exc:
                    last = repr(exc)
                time.sleep(0.1)
        raise InfrastructureError(f"trytond on {self.url} did not answer in {timeout}s: {last}")

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout)

    def __enter__(self) -> TrytonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(
    database: TrytonDatabase, port: int | None = None, timeout: float = 60.0
) -> TrytonServer:
    """Start ``trytond`` for ``database`` on ``port`` (a free one if None); ready on return."""
    return TrytonServer(database, port or 0).start(timeout)


@contextlib.contextmanager
def running_tryton(directory: Path, *, state_dir: Path | None = None) -> Iterator[TrytonServer]:
    """Prepare a database in ``directory`` and serve it for the block's duration."""
    server = start_server(prepare_database(directory, state_dir=state_dir))
    try:
        yield server
    finally:
        server.stop()


# -- the in-database setup (runs in a child process, see the module docstring) ----------


def _configure(config_file: str, database: str) -> None:  # pragma: no cover - child process
    import datetime as dt
    from decimal import Decimal

    import yaml
    from proteus import Model
    from proteus import config as pconfig
    from trytond.modules.account.tests.tools import create_chart, create_fiscalyear, get_accounts
    from trytond.modules.account_invoice.tests.tools import set_fiscalyear_invoice_sequences
    from trytond.modules.company.tests.tools import create_company

    from revline.processors.reference import ReferenceData

    # The test tools below are Tryton's own scenario helpers (shipped in the wheels):
    # they drive the same wizards a user would, so the setup stays version-proof.
    pconfig.set_trytond(database=database, config_file=config_file)

    Currency = Model.get("currency.currency")
    Rate = Model.get("currency.currency.rate")
    reference = ReferenceData.from_mapping(yaml.safe_load(REFERENCE_FILE.read_text("utf-8")))
    anchor = reference.products["SKU-CRM-PRO"].list_prices
    currencies: dict[str, Any] = {}
    for code, (cname, symbol, digits) in CURRENCIES.items():
        cur = Currency(
            name=cname,
            code=code,
            symbol=symbol,
            digits=digits,
            rounding=Decimal(1).scaleb(-digits),
        )
        cur.save()
        # Units of `code` per company unit, from the reference price book's anchor SKU.
        usd = Decimal(anchor[COMPANY_CURRENCY]).scaleb(-CURRENCIES[COMPANY_CURRENCY][2])
        rate = (Decimal(anchor[code]).scaleb(-digits) / usd).quantize(Decimal("0.000001"))
        Rate(date=dt.date(2000, 1, 1), rate=rate, currency=cur).save()
        currencies[code] = cur

    Party = Model.get("party.party")
    company_party = Party(name="Revline Demo Company")
    company_party.save()
    create_company(company_party, currencies[COMPANY_CURRENCY])
    create_chart()
    accounts = get_accounts()

    for year in FISCAL_YEARS:
        fy = create_fiscalyear(today=(dt.date(year, 1, 1), dt.date(year, 12, 31)))
        set_fiscalyear_invoice_sequences(fy)
        fy.save()
        fy.click("create_period")

    Term = Model.get("account.invoice.payment_term")
    term = Term(name="Net (due date from the invoice)")
    term.lines.new(type="remainder")
    term.save()
    AccountConfig = Model.get("account.configuration")
    acc_config = AccountConfig(1)
    acc_config.default_customer_payment_term = term
    # Foreign-currency invoices post rounding/rate differences to these.
    (gains,) = accounts["revenue"].duplicate(default={"name": "Currency exchange gains"})
    (losses,) = accounts["expense"].duplicate(default={"name": "Currency exchange losses"})
    acc_config.currency_exchange_credit_account = gains
    acc_config.currency_exchange_debit_account = losses
    Journal = Model.get("account.journal")
    exchange_journals = Journal.find([("type", "=", "write-off")])
    if exchange_journals:
        acc_config.currency_exchange_journal = exchange_journals[0]
    else:
        exchange_journal = Journal(name="Currency exchange", code="EXC", type="write-off")
        exchange_journal.save()
        acc_config.currency_exchange_journal = exchange_journal
    acc_config.save()

    PaymentMethod = Model.get("account.invoice.payment.method")
    (cash_journal,) = Journal.find([("type", "=", "cash")])
    method = PaymentMethod(
        name=PAYMENT_METHOD,
        journal=cash_journal,
        credit_account=accounts["cash"],
        debit_account=accounts["cash"],
    )
    method.save()

    Tax = Model.get("account.tax")
    tax = Tax(
        name=TAX_NAME,
        description="Sales tax as computed by the source system",
        type="percentage",
        rate=Decimal(0),
        invoice_account=accounts["tax"],
        credit_note_account=accounts["tax"],
    )
    tax.save()

    Category = Model.get("product.category")
    category = Category(name="Revline revenue", accounting=True)
    category.account_revenue = accounts["revenue"]
    category.account_expense = accounts["expense"]
    category.save()
    Uom = Model.get("product.uom")
    (unit,) = Uom.find([("name", "=", "Unit")])
    Template = Model.get("product.template")
    products = [
        (p.sku, p.name, p.family, p.list_prices.get(COMPANY_CURRENCY, 0))
        for p in reference.products.values()
    ]
    products.append((REFUND_SKU, "Refund to customer", "services", 0))
    for sku, pname, family, price_minor in products:
        template = Template(
            name=pname,
            code=sku,
            type="goods" if family == "hardware" else "service",
            default_uom=unit,
            salable=True,
            list_price=Decimal(price_minor).scaleb(-CURRENCIES[COMPANY_CURRENCY][2]),
            account_category=category,
        )
        template.save()


# -- CLI ------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m revline.sinks.erp")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_prep = sub.add_parser("prepare", help="prepare a database directory (copies the template)")
    p_prep.add_argument("directory", type=Path)
    p_prep.add_argument("--rebuild", action="store_true", help="rebuild the template")
    p_serve = sub.add_parser("serve", help="prepare if needed, then serve until interrupted")
    p_serve.add_argument("directory", type=Path)
    p_serve.add_argument("--port", type=int, default=0)
    p_conf = sub.add_parser("_configure")
    p_conf.add_argument("config_file")
    p_conf.add_argument("database")
    args = parser.parse_args(argv)
    if args.cmd == "_configure":
        _configure(args.config_file, args.database)
        return 0
    if args.cmd == "prepare":
        started = time.monotonic()
        db = prepare_database(args.directory, rebuild=args.rebuild)
        print(f"prepared {db.file} in {time.monotonic() - started:.1f}s")
        return 0
    db = TrytonDatabase(args.directory)
    if not db.file.exists():
        db = prepare_database(args.directory)
    server = start_server(db, args.port or None)
    print(f"trytond serving {db.name} on {server.url} (user {db.user}); Ctrl-C stops it")
    try:
        while server.running:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
