"""The operations report as one self-contained HTML page a finance lead can open.

Inline CSS, inline SVG charts drawn here: no script, no font, no CDN, nothing
fetched. Every value from Kafka is escaped (owners, reason codes and notes are
free text written by people).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from html import escape

from revline.operations.report import (
    AGE_BUCKETS,
    DELIVERY_TARGET_PCT,
    DRIFT_TARGET_PCT,
    LATENCY_TARGET_MS,
    MTTR_P1_TARGET_MS,
    SEVERITIES,
    SEVERITY_LABELS,
    OperationsReport,
    fmt_date,
    fmt_duration,
    fmt_money,
    fmt_pct,
    fmt_short,
    fmt_time,
    owner_label,
    period_label,
)

GREEN, AMBER, RED, GREY, BLUE = "#2e7d32", "#ef8f00", "#c62828", "#9aa5b1", "#1565c0"
AGE_COLOURS = ("#66bb6a", "#c0ca33", "#ffb300", "#f4511e", "#b71c1c")
OUTCOME_COLOURS = {"validated": GREEN, "exception": AMBER, "duplicate": "#607d8b",
                   "dead_letter": RED}
OUTCOME_LABELS = {"validated": "Validated", "exception": "Exception",
                  "duplicate": "Duplicate (not applied)", "dead_letter": "Dead letter"}

STAGE_LABELS = {"decode": "unreadable bytes", "schema": "unknown schema version",
                "structure": "incomplete or impossible record"}

CSS = """
:root { --ink:#1f2933; --muted:#616e7c; --line:#e4e7eb; --bg:#f5f7fa; --card:#fff;
  --ok:#2e7d32; --warn:#ef8f00; --bad:#c62828; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
  font: 15px/1.5 "Segoe UI", "Helvetica Neue", Arial, "Liberation Sans", sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 28px 28px 48px; }
header.top { background:#102a43; color:#fff; }
header.top .inner { max-width:1120px; margin:0 auto; padding:22px 28px 20px; }
header.top .brand { letter-spacing:.12em; text-transform:uppercase; font-size:12px;
  color:#9fb3c8; }
header.top h1 { margin:4px 0 6px; font-size:28px; font-weight:600; }
header.top p { margin:0; color:#d9e2ec; }
h2 { font-size:20px; margin:0 0 4px; font-weight:600; }
section { background:var(--card); border:1px solid var(--line); border-radius:10px;
  padding:20px 22px; margin:18px 0; break-inside: avoid; }
p.lead { color:var(--muted); margin:0 0 14px; max-width: 860px; }
.kpis { display:grid; grid-template-columns: repeat(4, 1fr); gap:14px; margin:22px 0 8px; }
.kpi { background:var(--card); border:1px solid var(--line); border-left:5px solid var(--line);
  border-radius:10px; padding:14px 16px; }
.kpi.ok { border-left-color:var(--ok); } .kpi.warn { border-left-color:var(--warn); }
.kpi.bad { border-left-color:var(--bad); }
.kpi .label { font-size:13px; color:var(--muted); }
.kpi .value { font-size:28px; font-weight:600; margin:2px 0; font-variant-numeric: tabular-nums; }
.kpi .sub { font-size:12.5px; color:var(--muted); }
table { border-collapse:collapse; width:100%; margin-top:10px; font-size:14px; }
th, td { padding:7px 9px; border-bottom:1px solid var(--line); text-align:left;
  vertical-align: top; white-space: nowrap; }
td.wrap, td:last-child { white-space: normal; }
table.narrow { max-width: 560px; }
table.dense th, table.dense td { padding-left:6px; padding-right:6px; }
th { font-size:12.5px; color:var(--muted); font-weight:600; background:#fafbfc; }
td.num, th.num { text-align:right; font-variant-numeric: tabular-nums; white-space:nowrap; }
tr.total td { font-weight:600; border-top:2px solid var(--line); }
.flag { display:inline-block; padding:1px 8px; border-radius:10px; font-size:12px;
  font-weight:600; margin-right:4px; white-space:nowrap; }
.flag.bad { background:#fde8e8; color:var(--bad); }
.flag.warn { background:#fff4e0; color:#a05e00; }
.flag.ok { background:#e6f4ea; color:var(--ok); }
.chart { margin: 6px 0 4px; } .chart svg { display:block; width:100%; height:auto; }
.chart text { font-size:12px; fill:var(--ink); } .chart text.muted { fill:var(--muted); }
.legend { display:flex; flex-wrap:wrap; gap:14px; font-size:12.5px; color:var(--muted);
  margin:4px 0 0; }
.legend span::before { content:""; display:inline-block; width:11px; height:11px;
  border-radius:2px; margin-right:5px; vertical-align:-1px; background:var(--c); }
.cols { display:grid; grid-template-columns: 1fr 1fr; gap: 22px; }
.big { font-size:34px; font-weight:600; font-variant-numeric: tabular-nums; }
.caption { color:var(--muted); }
.empty { color:var(--muted); font-style:italic; }
footer { color:var(--muted); font-size:12.5px; margin-top:26px; }
footer li { margin: 2px 0; }
code { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 12.5px; }
@media (max-width: 860px) { .kpis { grid-template-columns: repeat(2, 1fr); }
  .cols { grid-template-columns: 1fr; } }
@media print { body { background:#fff; } section, .kpi { border-color:#ccc; }
  header.top { background:#fff; color:#000; border-bottom:2px solid #000; }
  header.top p, header.top .brand { color:#333; } }
"""


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _n(value: int) -> str:
    return f"{value:,}"


# -- charts (inline SVG) --------------------------------------------------------------
def _text_width(text: str) -> int:
    """Rough width of 12 px sans-serif text: capitals and digits are wider."""
    wide = sum(1 for c in text if c.isupper() or c.isdigit() or c in "%_—")
    return int(wide * 8.6 + (len(text) - wide) * 6.6) + 10


def hbar_chart(rows: Sequence[tuple[str, float, str, str]], *, width: int = 1000,
               label_width: int | None = None, title: str) -> str:
    """Horizontal bars: (label, value, shown value, colour)."""
    if not rows:
        return ""
    lw = label_width or min(320, max(_text_width(r[0]) for r in rows))
    vw = max(_text_width(r[2]) for r in rows)
    bar_h, gap = 20, 8
    height = len(rows) * (bar_h + gap) + gap
    top = max((r[1] for r in rows), default=0) or 1
    span = width - lw - vw - 12
    parts = []
    for i, (label, value, shown, colour) in enumerate(rows):
        y = gap + i * (bar_h + gap)
        w = max(0.0, span * value / top)
        parts.append(
            f'<text x="{lw - 8}" y="{y + 14}" text-anchor="end">{_e(label)}</text>'
            f'<rect x="{lw}" y="{y}" width="{span}" height="{bar_h}" fill="#f0f2f5" rx="3"/>'
            f'<rect x="{lw}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{colour}" rx="3"/>'
            f'<text x="{lw + w + 6:.1f}" y="{y + 14}">{_e(shown)}</text>'
        )
    return _svg(width, height, title, "".join(parts))


def stacked_chart(rows: Sequence[tuple[str, Sequence[int]]], series: Sequence[tuple[str, str]],
                  *, width: int = 1000, title: str, percent: bool = False) -> str:
    """Horizontal stacked bars, one row per label; ``percent`` scales each row to 100 %."""
    if not rows:
        return ""
    lw = min(320, max(_text_width(r[0]) for r in rows))
    bar_h, gap, vw = 24, 10, 8 if percent else 60
    height = len(rows) * (bar_h + gap) + gap
    top = max((sum(v) for _, v in rows), default=0) or 1
    span = width - lw - vw
    parts = []
    for i, (label, values) in enumerate(rows):
        y = gap + i * (bar_h + gap)
        total = sum(values)
        scale = span / (total or 1) if percent else span / top
        x = float(lw)
        parts.append(f'<text x="{lw - 8}" y="{y + 16}" text-anchor="end">{_e(label)}</text>')
        if percent or not total:
            parts.append(f'<rect x="{lw}" y="{y}" width="{span}" height="{bar_h}" '
                         f'fill="#f0f2f5" rx="3"/>')
        for value, (name, colour) in zip(values, series, strict=True):
            if not value:
                continue
            w = value * scale
            parts.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar_h}" '
                         f'fill="{colour}"><title>{_e(name)}: {_n(value)}</title></rect>')
            if w > 26:
                parts.append(f'<text x="{x + w / 2:.1f}" y="{y + 16}" text-anchor="middle" '
                             f'style="fill:#fff;font-weight:600">{_n(value)}</text>')
            x += w
        if not percent:
            parts.append(f'<text x="{x + 6:.1f}" y="{y + 16}" class="muted">{_n(total)}</text>')
    legend = "".join(f'<span style="--c:{c}">{_e(n)}</span>' for n, c in series)
    return _svg(width, height, title, "".join(parts)) + f'<div class="legend">{legend}</div>'


def column_chart(rows: Sequence[tuple[str, int]], colours: Sequence[str], *, width: int = 1000,
                 title: str) -> str:
    """Vertical bars with the count on top and the label below (a histogram)."""
    if not rows:
        return ""
    height, base, top_pad = 210, 170, 22
    slot = width / len(rows)
    bar_w = min(80.0, slot * 0.62)
    top = max(v for _, v in rows) or 1
    parts = [f'<line x1="0" y1="{base}" x2="{width}" y2="{base}" stroke="#cbd2d9"/>']
    for i, (label, value) in enumerate(rows):
        cx = slot * i + slot / 2
        h = max((base - top_pad) * value / top, 3 if value else 0)  # a few stay visible
        parts.append(
            f'<rect x="{cx - bar_w / 2:.1f}" y="{base - h:.1f}" width="{bar_w:.1f}" '
            f'height="{h:.1f}" fill="{colours[i % len(colours)]}" rx="3"/>'
            f'<text x="{cx:.1f}" y="{base - h - 6:.1f}" text-anchor="middle">{_n(value)}</text>'
            f'<text x="{cx:.1f}" y="{base + 18}" text-anchor="middle" class="muted">'
            f'{_e(label)}</text>'
        )
    return _svg(width, height, title, "".join(parts))


def _svg(width: int | float, height: int | float, title: str, body: str) -> str:
    return (f'<div class="chart"><svg viewBox="0 0 {width} {height}" width="{width}" '
            f'height="{height}" role="img" aria-label="{_e(title)}"><title>{_e(title)}</title>'
            f"{body}</svg></div>")


# -- building blocks ----------------------------------------------------------------------
def _table(head: Sequence[str], rows: Sequence[Sequence[str]], *, numeric: set[int],
           total: Sequence[str] | None = None, table_id: str = "", narrow: bool = False,
           dense: bool = False) -> str:
    def cells(row: Sequence[str], tag: str) -> str:
        return "".join(f'<{tag}{" class=num" if i in numeric else ""}>{c}</{tag}>'
                       for i, c in enumerate(row))

    body = "".join(f"<tr>{cells(r, 'td')}</tr>" for r in rows)
    if total is not None:
        body += f'<tr class="total">{cells(total, "td")}</tr>'
    ident = f' id="{_e(table_id)}"' if table_id else ""
    classes = " ".join(c for c, on in (("narrow", narrow), ("dense", dense)) if on)
    ident += f' class="{classes}"' if classes else ""
    return f"<table{ident}><thead><tr>{cells([_e(h) for h in head], 'th')}</tr></thead>" \
           f"<tbody>{body}</tbody></table>"


def _kpi(ident: str, label: str, value: str, sub: str, status: str = "") -> str:
    return (f'<div class="kpi {status}" id="kpi-{ident}"><div class="label">{_e(label)}</div>'
            f'<div class="value">{_e(value)}</div><div class="sub">{sub}</div></div>')


def _flag(text: str, kind: str) -> str:
    return f'<span class="flag {kind}">{_e(text)}</span>'


def _section(ident: str, title: str, lead: str, body: str) -> str:
    return (f'<section id="{ident}"><h2>{_e(title)}</h2><p class="lead">{lead}</p>'
            f"{body}</section>")


def _status(ok: bool | None, warn: bool = False) -> str:
    if ok is None:
        return ""
    return "ok" if ok else "warn" if warn else "bad"


# -- sections -----------------------------------------------------------------------------
def _kpis(r: OperationsReport) -> str:
    f, oe, lat = r.flow, r.open_exceptions, r.latency
    delivery = f.delivery_success_pct
    sla = r.sla_compliance_pct
    rec = r.reconciliation
    ov = r.overrides
    cards = [
        _kpi("inputs", "Events processed", _n(f.inputs),
             f"{_n(f.validated)} validated · {_n(f.exceptions)} exceptions · "
             f"{_n(f.dead_letters)} dead letters"),
        _kpi("delivery", "Delivery success", fmt_pct(delivery, 2),
             f"share of events read and judged · target ≥ {DELIVERY_TARGET_PCT} %",
             _status(None if delivery is None else delivery >= DELIVERY_TARGET_PCT)),
        _kpi("open-exceptions", "Open exceptions", _n(oe.total),
             f"{_n(oe.overdue)} past their SLA · oldest {fmt_duration(oe.oldest_age_ms)}",
             _status(oe.overdue == 0, warn=True)),
        _kpi("sla", "SLA compliance", fmt_pct(sla),
             "exceptions opened this period answered in time",
             _status(None if sla is None else sla >= 95.0, warn=sla is not None and sla >= 80)),
        _kpi("duplicates", "Duplicates prevented", _n(r.duplicates.prevented),
             f"re-sent events recognised and not applied · {_n(r.duplicates.conflicts)} "
             "conflicting re-sends held as exceptions", "ok"),
        _kpi("latency", "Trigger → outcome (95th pct)", fmt_duration(lat.p95_ms),
             f"median {fmt_duration(lat.p50_ms)} · target under 24 h",
             _status(None if lat.p95_ms is None else lat.p95_ms < LATENCY_TARGET_MS)),
        _kpi("drift", "Reconciliation drift",
             "not run" if rec is None or rec.drift_pct is None else f"{rec.drift_pct:.3g} %",
             f"target ≤ {DRIFT_TARGET_PCT} % per week"
             + (f" · checked {fmt_date(rec.at_ms)}" if rec else ""),
             _status(None if rec is None else rec.within_target, warn=True)),
        _kpi("overrides", "Manual overrides", _n(len(ov.items)),
             f"{_n(ov.reasonless + ov.refused)} without a reason · {_n(ov.expired)} expired",
             _status(ov.reasonless + ov.refused == 0)),
    ]
    return f'<div class="kpis">{"".join(cards)}</div>'


def _outcomes(r: OperationsReport) -> str:
    f = r.flow
    if not f.inputs:
        return _section("outcomes", "What happened to the events",
                        "No event reached a final outcome in this period.", "")
    values = [("validated", f.validated), ("exception", f.exceptions),
              ("duplicate", f.duplicates), ("dead_letter", f.dead_letters)]
    chart = stacked_chart([("All events", [v for _, v in values])],
                          [(OUTCOME_LABELS[k], OUTCOME_COLOURS[k]) for k, _ in values],
                          percent=True, title="Outcomes of the period's events")
    rows = [[_e(OUTCOME_LABELS[k]), _n(v), fmt_pct(100.0 * v / f.inputs)] for k, v in values]
    stages = ", ".join(f"{_e(STAGE_LABELS.get(s, s))}: {_n(n)}"
                       for s, n in f.dead_letters_by_stage) or "none"
    lead = (f"Every event Revline read in the period and what it became. {_n(f.held)} arrived "
            "before something they depend on and waited (were held) first. Dead letters by "
            f"reason: {stages}.")
    return _section("outcomes", "What happened to the events", lead,
                    chart + _table(["Outcome", "Events", "Share"], rows, numeric={1, 2},
                                   total=["Total", _n(f.inputs), "100 %"], table_id="t-outcomes"))


def _open_exceptions(r: OperationsReport) -> str:
    oe = r.open_exceptions
    lead = ("Exceptions nobody has resolved, waived or seen expire yet, by the team that owns "
            "them and how long they have been open. “Past SLA” means not acknowledged by its "
            f"deadline (P1 15 min, P2 2 h, P3 48 h). Source: {_e(r.exceptions_source)}.")
    if not oe.total:
        return _section("open-exceptions", "Open exceptions by owner and age", lead,
                        '<p class="empty">No open exceptions.</p>')
    series = [(label, AGE_COLOURS[i]) for i, (_, label) in enumerate(AGE_BUCKETS)]
    rows = [(owner_label(o.owner), list(o.by_age)) for o in oe.by_owner if o.total]
    chart = stacked_chart(rows, series, title="Open exceptions by owner and age")
    head = ["Owner", *[label for _, label in AGE_BUCKETS], *SEVERITIES, "Total", "Past SLA",
            "Oldest"]
    trows = [[_e(owner_label(o.owner)), *[_n(v) for v in o.by_age],
              *[_n(v) for v in o.by_severity], _n(o.total),
              _flag(_n(o.overdue), "bad") if o.overdue else "0",
              fmt_duration(o.oldest_age_ms)]
             for o in oe.by_owner if o.total]
    n_age = len(AGE_BUCKETS)
    totals = ["All owners", *[_n(sum(o.by_age[i] for o in oe.by_owner)) for i in range(n_age)],
              *[_n(sum(o.by_severity[i] for o in oe.by_owner)) for i in range(len(SEVERITIES))],
              _n(oe.total), _n(oe.overdue), fmt_duration(oe.oldest_age_ms)]
    numeric = set(range(1, len(head)))
    body = chart + _table(head, trows, numeric=numeric, total=totals, table_id="t-open",
                          dense=True)
    if oe.amounts:
        held = " · ".join(_e(fmt_money(v, c)) for c, v in oe.amounts)
        body += f"<p><strong>Money held up by open exceptions:</strong> {held}</p>"
    if oe.oldest:
        orows = [[_e(e.exception_id[:16]), _e(e.check_id), _e(e.severity), _e(owner_label(e.owner)),
                  _e(e.order_id or "—"), fmt_short(e.opened_at_ms),
                  fmt_duration(r.generated_at_ms - e.opened_at_ms),
                  (_flag("past SLA", "bad") if r.generated_at_ms > e.sla_deadline_ms
                   and e.acknowledged_at_ms is None else "")
                  + (_flag("escalated", "warn") if e.escalated else "")
                  + (_flag("acknowledged", "ok") if e.status == "acknowledged" else "")]
                 for e in oe.oldest]
        body += ("<h3>Longest open</h3>"
                 + _table(["Exception", "Check", "Sev.", "Owner", "Order", "Opened (UTC)",
                           "Open for", ""], orows, numeric={6}, table_id="t-oldest"))
    return _section("open-exceptions", "Open exceptions by owner and age", lead, body)


def _sla(r: OperationsReport) -> str:
    lead = ("For the exceptions opened in this period: how many were acknowledged (or closed) "
            "before their SLA deadline. Escalated exceptions count as breached; those not yet "
            f"due are pending. Users aim to close invoice-stopping (P1) exceptions within "
            f"{fmt_duration(MTTR_P1_TARGET_MS)}.")
    rows = [r_ for r_ in r.sla if r_.opened]
    if not rows:
        return _section("sla", "SLA compliance", lead,
                        '<p class="empty">No exceptions were opened in this period.</p>')
    chart = stacked_chart(
        [(SEVERITY_LABELS.get(s.severity, s.severity), [s.met, s.breached, s.pending])
         for s in rows],
        [("Answered in time", GREEN), ("Breached", RED), ("Not yet due", GREY)],
        percent=True, title="SLA compliance by severity")
    trows = [[_e(SEVERITY_LABELS.get(s.severity, s.severity)), fmt_duration(s.target_ms),
              _n(s.opened), _n(s.met), _n(s.breached), _n(s.pending), fmt_pct(s.compliance_pct),
              fmt_duration(s.p50_close_ms), fmt_duration(s.p95_close_ms)] for s in rows]
    total = ["All", "", _n(sum(s.opened for s in rows)), _n(sum(s.met for s in rows)),
             _n(sum(s.breached for s in rows)), _n(sum(s.pending for s in rows)),
             fmt_pct(r.sla_compliance_pct), "", ""]
    return _section("sla", "SLA compliance", lead, chart + _table(
        ["Severity", "SLA", "Opened", "In time", "Breached", "Pending", "Compliance",
         "Median time to close", "95th pct time to close"], trows, numeric=set(range(1, 9)),
        total=total, table_id="t-sla"))


def _qa(r: OperationsReport) -> str:
    lead = (f"Of the {_n(r.judged)} events the QA checks judged, how many each check stopped "
            "(an exception with an owner) and how many passed with an advisory warning.")
    if not r.qa:
        return _section("qa", "QA failure rates by check", lead,
                        '<p class="empty">No check failed in this period.</p>')
    colour = {"P1": RED, "P2": AMBER, "P3": BLUE}
    failing = [q for q in r.qa if q.failures]
    chart = hbar_chart([(q.check_id, q.rate_pct, f"{q.rate_pct:.2f} % ({_n(q.failures)})",
                         colour.get(q.severity, GREY)) for q in failing],
                       title="QA failure rate by check") if failing else ""
    trows = [[f"<code>{_e(q.check_id)}</code>", _e(q.severity), _e(owner_label(q.owner)),
              _n(q.failures), f"{q.rate_pct:.2f} %", _n(q.warnings)] for q in r.qa]
    legend = ('<div class="legend"><span style="--c:#c62828">P1 invoice-stopping</span>'
              '<span style="--c:#ef8f00">P2 data drift</span>'
              '<span style="--c:#1565c0">P3 cosmetic</span></div>') if failing else ""
    return _section("qa", "QA failure rates by check", lead, chart + legend + _table(
        ["Check", "Severity", "Owner", "Failures", "Failure rate", "Warnings"], trows,
        numeric={3, 4, 5}, table_id="t-qa"))


def _overrides(r: OperationsReport) -> str:
    ov = r.overrides
    lead = ("Manual overrides let one event pass one check. Each must carry a reason code, an "
            "actor and an expiry. Listed: those made in the period and those still in force.")
    parts = []
    if ov.refused:
        parts.append(f'<p>{_flag("refused", "bad")} <strong id="overrides-refused">'
                     f"{_n(ov.refused)}</strong> override(s) rejected by the pipeline because "
                     "a reason code, actor, check or target was missing (dead-lettered, never "
                     "applied).</p>")
    if ov.by_reason:
        parts.append(hbar_chart([(code, n, _n(n), BLUE) for code, n in ov.by_reason],
                                title="Overrides by reason code"))
    if ov.items:
        now = r.generated_at_ms
        rows = [[_e(o.override_id), _e(o.order_id), f"<code>{_e(o.check_id)}</code>",
                 _e(o.reason_code or "—"), _e(o.actor), fmt_short(o.occurred_at_ms),
                 fmt_short(o.expires_at_ms),
                 (_flag("expired", "warn") if o.expired(now) else _flag("in force", "ok"))
                 + (_flag("no reason", "bad") if o.reasonless else "")]
                for o in ov.items]
        parts.append(_table(["Override", "Order", "Check", "Reason code", "By", "Made (UTC)",
                             "Expires (UTC)", "Status"], rows, numeric=set(),
                            table_id="t-overrides"))
    else:
        parts.append('<p class="empty">No manual overrides in this period.</p>')
    if ov.exceptions_by_check:
        listed = ", ".join(f"<code>{_e(c)}</code>: {_n(n)}" for c, n in ov.exceptions_by_check)
        parts.append(f"<p>Exceptions raised about overrides: {listed}.</p>")
    return _section("overrides", "Overrides and their reason codes", lead, "".join(parts))


def _duplicates(r: OperationsReport) -> str:
    d = r.duplicates
    lead = ("Upstream systems re-send events (webhooks fire twice, exports re-run). Revline "
            "recognises a re-sent event by its idempotency key and never applies it twice; a "
            "re-send with different content is held as an exception instead.")
    per_k = (f"{1000.0 * d.invoice_duplicates / d.invoices:.1f}" if d.invoices else "—")
    body = (f'<div class="cols"><div><div class="big" id="duplicates-prevented">'
            f'{_n(d.prevented)}</div><div class="caption">duplicates prevented</div></div>'
            f'<div><div class="big">{_n(d.conflicts)}</div><div class="caption">conflicting '
            "re-sends held as exceptions</div></div></div>"
            f"<p>Re-sent invoices caught and not applied: {_n(d.invoice_duplicates)}, against "
            f"{_n(d.invoices)} invoices validated ({per_k} per 1,000 invoices).</p>")
    if d.by_event_type:
        body += _table(["Event type", "Duplicates prevented"],
                       [[_e(t.replace("_", " ")), _n(n)] for t, n in d.by_event_type],
                       numeric={1}, table_id="t-duplicates", narrow=True)
    return _section("duplicates", "Duplicates prevented", lead, body)


def _latency(r: OperationsReport) -> str:
    lat = r.latency
    lead = ("Time from when something happened upstream (an order booked, an invoice issued) "
            "to Revline's decision about it. Target for events without exceptions: under 24 "
            "hours; Revline aims for under a second. Events that arrived long after they "
            "happened (a late export, a replay) count with their full delay.")
    if not lat.count:
        return _section("latency", "Trigger-to-outcome latency", lead,
                        '<p class="empty">No timed events in this period.</p>')
    colours = ["#43a047", "#7cb342", "#c0ca33", "#fdd835", "#ffb300", "#fb8c00", RED]
    chart = column_chart(list(lat.histogram), colours,
                         title="Events by trigger-to-outcome latency")
    pct = [["Median (50th)", fmt_duration(lat.p50_ms)], ["90th", fmt_duration(lat.p90_ms)],
           ["95th", fmt_duration(lat.p95_ms)], ["99th", fmt_duration(lat.p99_ms)],
           ["Slowest", fmt_duration(lat.max_ms)]]
    kinds = [[_e(OUTCOME_LABELS.get(k, k)), _n(n), fmt_duration(p50), fmt_duration(p95)]
             for k, n, p50, p95 in lat.by_kind]
    within = (f"<p>{fmt_pct(lat.within_target_pct)} of validated events were decided within "
              "24 hours.</p>") if lat.within_target_pct is not None else ""
    body = chart + '<div class="cols"><div>' + _table(
        ["Percentile", "Latency"], pct, numeric={1}, table_id="t-latency") + "</div><div>" \
        + _table(["Outcome", "Events", "Median", "95th pct"], kinds, numeric={1, 2, 3}) \
        + "</div></div>" + within
    return _section("latency", "Trigger-to-outcome latency", lead, body)


def _reconciliation(r: OperationsReport) -> str:
    rec = r.reconciliation
    lead = ("Reconciliation compares what the event stream says with what the ERP and the "
            f"ledger hold. Users accept at most {DRIFT_TARGET_PCT} % drift per week.")
    if rec is None:
        return _section("reconciliation", "Reconciliation drift", lead,
                        '<p class="big" id="drift-value">not run</p><p class="empty">No '
                        "reconciliation has been recorded yet (run <code>revline reconcile"
                        "</code>).</p>")
    drift = "—" if rec.drift_pct is None else f"{rec.drift_pct:.3g} %"
    verdict = {True: _flag("within target", "ok"), False: _flag("above target", "bad"),
               None: ""}[rec.within_target]
    rows = [["Records checked", "—" if rec.checked is None else _n(rec.checked)],
            ["Missing in ERP/ledger", "—" if rec.missing is None else _n(rec.missing)],
            ["Extra in ERP/ledger", "—" if rec.extra is None else _n(rec.extra)],
            ["Amounts that differ", "—" if rec.mismatched is None else _n(rec.mismatched)]]
    body = (f'<p><span class="big" id="drift-value">{_e(drift)}</span> {verdict}</p>'
            f"<p>Last run {fmt_time(rec.at_ms)} by {_e(rec.actor)}"
            + (f", covering {_e(rec.period)}" if rec.period else "") + ".</p>"
            + _table(["", "Count"], rows, numeric={1}, table_id="t-reconciliation",
                     narrow=True))
    return _section("reconciliation", "Reconciliation drift", lead, body)


def render_html(report: OperationsReport) -> str:
    r = report
    sections: list[Callable[[OperationsReport], str]] = [
        _outcomes, _open_exceptions, _sla, _qa, _overrides, _duplicates, _latency,
        _reconciliation,
    ]
    notes = "".join(f"<li>{_e(n)}</li>" for n in r.notes)
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>Revline operations report — {_e(fmt_date(r.generated_at_ms))}</title>"
        f"<style>{CSS}</style></head><body>"
        '<header class="top"><div class="inner"><div class="brand">Revline · revenue '
        'operations</div><h1>Operations report</h1>'
        f'<p id="period">{_e(period_label(r.since_ms, r.generated_at_ms))}</p></div></header>'
        f"<main>{_kpis(r)}{''.join(s(r) for s in sections)}"
        "<footer><p>Generated by <code>revline report</code> on "
        f"{_e(fmt_time(r.generated_at_ms))}. Flow figures cover the period above; open "
        "exceptions are as of the time of the report. Times are UTC.</p>"
        f"{'<ul>' + notes + '</ul>' if notes else ''}</footer></main></body></html>\n"
    )
