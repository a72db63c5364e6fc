"""Tables for people, rendered by rich as plain text: no colour codes and wide enough never to wrap, so a
table reads the same in a terminal, a redirected file and a log (grade, info, verify, the export gate,
bench)."""

from __future__ import annotations

import io
from typing import Iterable, Sequence


def plain_text(*renderables, width: int = 10_000) -> list[str]:
    """Render rich objects (tables, text) one after another as lines of plain text."""
    from rich.console import Console

    console = Console(file=io.StringIO(), width=width, color_system=None, highlight=False)
    for renderable in renderables:
        console.print(renderable, markup=False)
    return [line.rstrip() for line in console.file.getvalue().strip("\n").splitlines()]


def simple_table(rows: Iterable[Sequence[str]], justify: Sequence[str], header: Sequence[str] | None = None):
    """A borderless rich Table: one column per `justify` entry ("left"/"right"), an optional header."""
    from rich.table import Table

    table = Table(box=None, show_header=header is not None, header_style="", pad_edge=False)
    for index, side in enumerate(justify):
        table.add_column(header[index] if header else "", justify=side, no_wrap=True)
    for row in rows:
        table.add_row(*row)
    return table


def table_lines(rows: Iterable[Sequence[str]], justify: Sequence[str],
                header: Sequence[str] | None = None) -> list[str]:
    return plain_text(simple_table(rows, justify, header))
