"""``ftedit recipes``: list the named editing recipes and the other registered methods."""

from __future__ import annotations

from rich.table import Table

from ftedit.commands.console import console


def recipes_command() -> None:
    """List the named editing recipes."""
    from ftedit.config import recipe_names, resolve_config

    table = Table(title="recipes (override any field with --config FILE or --set key=value)")
    table.add_column("name")
    table.add_column("what it does")
    for name in recipe_names():
        table.add_row(name, " ".join(resolve_config(name).description.split()))
    console.print(table)
