"""``ftedit ledger``: the edits a model carries."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ftedit.commands.console import console


def ledger_command(
    path: Annotated[Path, typer.Argument(help="An edit's output directory, its model/ directory or a ledger file.")],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per edit instead of a table.")] = False,
) -> None:
    """List the edits a model carries, oldest first (from its ledger.jsonl)."""
    from ftedit.ledger import read_ledger

    entries = read_ledger(path)
    if as_json:
        for e in entries:
            typer.echo(e.to_json())
        return
    table = Table(title=f"{len(entries)} edits in {path}")
    adapters = any(e.adapter for e in entries)  # a LoRA adapter (or a stack of them) carries some edits
    for column in ("#", "hash", "subject", "prompt -> target", "recipe", "run", "time") + (("adapter",) if adapters else ()):
        table.add_column(column, no_wrap=column in ("hash", "run", "time"))
    for i, e in enumerate(entries, start=1):
        table.add_row(str(i), e.hash, e.subject, f"{e.prompt} -> {e.target_new}", e.recipe, e.run, e.time,
                      *((e.adapter or "(weights)",) if adapters else ()))
    console.print(table)
