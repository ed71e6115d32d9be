"""The ``ftedit`` command line: one module per command; ``main()`` is the console-script entry point."""

from __future__ import annotations

import logging
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler

from ftedit.commands import (
    bench,
    demo,
    edit,
    eval,
    generate,
    ledger,
    locate,
    recipes,
    retention,
    train_editor,
)
from ftedit.commands.reporting import ReportingGroup, run_cli

app = typer.Typer(cls=ReportingGroup, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Edit the factual knowledge of causal language models by fine-tuning, and measure it.")


@app.callback()
def _configure(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=Console(stderr=True), show_path=False)])
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


app.command("demo")(demo.demo_command)
app.command("recipes")(recipes.recipes_command)
app.command("edit")(edit.edit_command)
app.command("ledger")(ledger.ledger_command)
app.command("bench")(bench.bench_command)
app.command("retention")(retention.retention_command)
app.command("eval")(eval.eval_command)
app.command("generate")(generate.generate_command)
app.command("locate")(locate.locate_command)
app.command("train-editor")(train_editor.train_editor_command)


def main() -> None:
    run_cli(app)
