"""Rich tables and progress for the command line (the report files are built elsewhere)."""
from __future__ import annotations

import errno
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

#: The ``where`` column's width: ``file:line`` is shortened from the left to fit, so that the
#: line number stays visible on an 80-column terminal.
WHERE_WIDTH = 26
#: The guards' ``value`` column folds past this width, leaving the room to the expression.
VALUE_WIDTH = 12


class _Console(Console):
    def on_broken_pipe(self) -> None:
        # rich would exit with code 1, which here means "validation failed"; the CLI's main
        # turns a closed pipe (`surgery models | head -1`) into a quiet exit 0 instead.
        self.quiet = True
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")


def console(stderr: bool = False) -> Console:
    """A console bound to the *current* sys.stdout/sys.stderr (so pytest's capture sees it)."""
    # soft_wrap: long diff lines and change descriptions stay on one line (copyable, greppable).
    return _Console(stderr=stderr, highlight=False, soft_wrap=True)


def verbatim(value: Any) -> Text:
    """A cell showing model code or names exactly: rich would read ``[self.x]`` as markup and drop it."""
    return Text(str(value))


def short_where(where: str, width: int = WHERE_WIDTH) -> str:
    """``file:line`` cut from the left to ``width`` characters, at a path separator where possible."""
    if len(where) <= width:
        return where
    tail = where[len(where) - (width - 1):]
    cut = tail.find("/")
    return "…" + (tail[cut:] if 0 <= cut < len(tail) - 1 and ":" in tail[cut:] else tail)


def matches_table(matches: Sequence[Any]) -> Table:
    table = Table(title=f"Matches ({len(matches)})", title_justify="left")
    for col in ("#", "module", "class", "index"):
        table.add_column(col)
    for m in matches:
        table.add_row(str(m.position), verbatim(m.name), verbatim(m.cls), "-" if m.index is None else str(m.index))
    return table


def grafted_table(grafted: Sequence[Any]) -> Table:
    total = sum(g.params for g in grafted)
    table = Table(title=f"Grafted modules ({len(grafted)}, {total:,} parameters)", title_justify="left")
    table.add_column("module")
    table.add_column("parameters", justify="right")
    for g in grafted:
        table.add_row(verbatim(g.name), f"{g.params:,}")
    return table


def guards_table(guards: Sequence[Any]) -> Table:
    """Guards with their source line; ``where`` never wraps, so ``file:line`` survives 80 columns."""
    table = Table(title=f"Guards ({len(guards)})", title_justify="left")
    table.add_column("kind", no_wrap=True)
    table.add_column("expression", overflow="fold")
    table.add_column("value", overflow="fold", max_width=VALUE_WIDTH)
    wheres = [short_where(str(g.where)) for g in guards]
    table.add_column("where", no_wrap=True, min_width=max((len(w) for w in wheres), default=5))
    for g, where in zip(guards, wheres):
        table.add_row(verbatim(g.kind), verbatim(g.expr), verbatim(g.value), verbatim(where))
    return table


def validation_table(validation: Mapping[str, Any]) -> Table:
    verdict = "[green]passed[/]" if validation["passed"] else "[red]FAILED[/]"
    table = Table(title=f"Validation: {verdict}", title_justify="left")
    table.add_column("case")
    table.add_column("max abs diff", justify="right")
    table.add_column("tolerance", justify="right")
    table.add_column("result")
    for c in validation["cases"]:
        diff = "n/a" if c["max_abs_diff"] is None else f"{c['max_abs_diff']:.3g}"
        result = Text("pass", style="green") if c["passed"] else \
            Text.assemble(("FAIL", "red"), f" {c.get('error') or ''}".rstrip())
        table.add_row(verbatim(c["name"]), diff, f"{c['tolerance']:.3g}", result)
    return table


def rows_table(title: str, rows: Sequence[tuple[str, str]]) -> Table:
    """Two-column ``field | value`` table (e.g. ``LoadReport.as_rows()``)."""
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column("field")
    table.add_column("value")
    for key, value in rows:
        table.add_row(verbatim(key), verbatim(value))
    return table


def progress(out: Console) -> Progress:
    """The progress bar shown while validation cases run."""
    return Progress(
        TextColumn("[bold]validating[/] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=out,
        transient=True,
    )


__all__ = [
    "console",
    "grafted_table",
    "guards_table",
    "matches_table",
    "progress",
    "rows_table",
    "short_where",
    "validation_table",
    "verbatim",
]
