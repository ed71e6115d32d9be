"""How the command line reports errors: one place for every command (see :mod:`ftedit.errors` for exit codes).

``typer.Typer(cls=ReportingGroup)`` makes every command of an app report :class:`~ftedit.errors.FteditError`
as one or two lines and its exit code, Ctrl-C as exit 130, and anything else with its traceback plus a line
asking to report it. It sits in the click group, so ``CliRunner`` tests see exactly what users see.
"""

from __future__ import annotations

from typer.core import TyperGroup
from typer.exceptions import Abort, Exit, TyperException

from ftedit.errors import report_errors

_FRAMEWORK_EXITS = (Exit, Abort, TyperException)  # typer's own: --help, usage errors, typer.Exit(code)


class ReportingGroup(TyperGroup):
    """A typer command group whose commands report errors the ftedit way."""

    def invoke(self, ctx):
        with report_errors(verbose=lambda: bool(ctx.params.get("verbose")), passthrough=_FRAMEWORK_EXITS):
            return super().invoke(ctx)


def run_cli(app) -> None:
    """Entry point: run the typer ``app`` (whose group is a :class:`ReportingGroup`)."""
    app()
