"""Rich tables the command line and the demo share."""

from __future__ import annotations

from rich.table import Table


def counts_table(title: str, counts: dict[str, int]) -> Table:
    table = Table(title=title)
    table.add_column("outcome")
    table.add_column("inputs", justify="right")
    for name, value in counts.items():
        table.add_row(name, f"{value:,}")
    return table
