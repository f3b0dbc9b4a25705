"""CLI command: ``revline chaos`` (see revline/tools/chaos.py)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    """Add ``chaos`` to the ``revline`` parser (``sub``: its subparsers)."""
    from revline.cli import COUNT, POSITIVE, SECONDS, _bounded_float

    # Every value is checked here, by the parser: a bad one is refused before the
    # cluster starts, not minutes into a run.
    rate = _bounded_float(0.001, 10**7)
    p = sub.add_parser(
        "chaos",
        help="run a generated workload on a local 3-node cluster twice (clean, then with "
        "kill -9 of workers, sink, auditor, exception manager and a partition leader, "
        "workers scaled 1 -> N -> 1, the ERP down and PostgreSQL restarted), check outcomes, "
        "money, effects, dead letter, audit and reconcile, and print recovery and throughput "
        "figures; exit 1 if a check fails",
    )
    p.add_argument("--orders", type=POSITIVE, default=300, help="orders to generate (300)")
    p.add_argument("--seed", type=COUNT, default=18)
    p.add_argument("--worker-kills", type=COUNT, default=5)
    p.add_argument("--sink-kills", type=COUNT, default=3)
    p.add_argument("--auditor-kills", type=COUNT, default=1)
    p.add_argument("--exceptions-kills", type=COUNT, default=1)
    p.add_argument("--broker-kills", type=COUNT, default=2,
                   help="kill -9 of the leader of the busiest input partition, restarted")
    p.add_argument("--scale-to", type=POSITIVE, default=3, help="workers at the peak (3; 1: none)")
    p.add_argument("--broker-down", type=SECONDS, default=5.0, help="seconds a killed node stays "
                   "down (5)")
    p.add_argument("--erp-outages", type=COUNT, default=1,
                   help="times the sink's in-memory ERP is taken down (1)")
    p.add_argument("--erp-down", type=SECONDS, default=60.0,
                   help="seconds the ERP stays down each time (60)")
    p.add_argument("--pg-restarts", type=COUNT, default=None,
                   help="PostgreSQL restarts (default: 1 when --ledger-dsn is PostgreSQL and a "
                   "restart command is given, else none)")
    p.add_argument("--pg-restart-command", metavar="CMD",
                   default=os.environ.get("REVLINE_CHAOS_PG_RESTART") or None,
                   help="shell command that restarts the ledger's PostgreSQL server, e.g. "
                   "pg_ctl restart -m immediate -w -D DATA (default: $REVLINE_CHAOS_PG_RESTART)")
    p.add_argument("--rate", type=rate, default=2000.0,
                   help="chaos run publishing pace, lines/s (2000)")
    p.add_argument("--stall", type=_bounded_float(0.001, 10**7), default=150.0,
                   help="seconds without output after a fault before a component counts as "
                   "stalled and is restarted (150)")
    p.add_argument("--ledger-dsn", help="the chaos run's ledger (e.g. an empty PostgreSQL "
                   "database: needed for --pg-restarts); default SQLite in the run's directory")
    p.add_argument("--cluster-home", type=Path,
                   help="the 3-node cluster's home (default .revline/chaos-cluster); used if "
                   "running, else started fresh and stopped at the end")
    p.add_argument("--keep-cluster", action="store_true")
    p.add_argument("--state-dir", type=Path, default=Path(".revline") / "chaos")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the summary here")
    p.set_defaults(func=cmd_chaos)


def cmd_chaos(args: argparse.Namespace, settings: Any) -> int:
    from revline.cli import writable_file
    from revline.tools.chaos import ChaosOptions, run_chaos, table

    if args.json is not None:
        writable_file(args.json, "--json")  # before the cluster starts, not after the run
    ok, summary = run_chaos(ChaosOptions(
        orders=args.orders, seed=args.seed, worker_kills=args.worker_kills,
        sink_kills=args.sink_kills, auditor_kills=args.auditor_kills,
        exceptions_kills=args.exceptions_kills, broker_kills=args.broker_kills,
        scale_to=args.scale_to, broker_down_s=args.broker_down, rate=args.rate,
        erp_outages=args.erp_outages, erp_down_s=args.erp_down, pg_restarts=args.pg_restarts,
        pg_restart_command=args.pg_restart_command,
        stall_s=args.stall, ledger_dsn=args.ledger_dsn, cluster_home=args.cluster_home,
        state_dir=args.state_dir, keep_cluster=args.keep_cluster, json_out=args.json))
    print(table(summary))
    if not ok:
        print(json.dumps({k: summary[k] for k in ("stalls", "unexpected_exits",
                                                   "manifest_problems", "audit_verify")},
                         indent=2, default=str))
    return 0 if ok else 1
