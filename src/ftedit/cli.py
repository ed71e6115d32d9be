"""The ``ftedit`` command line: demo, edit, eval, recipes."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from ftedit.evaluate.cli import eval_command

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Edit the factual knowledge of causal language models by fine-tuning, and measure it.")
console = Console()


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=Console(stderr=True), show_path=False)])
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.command()
def demo(
    model: Annotated[str, typer.Option(help="Model to edit (default: the bundled gemma-3-270m).")] = "demo",
    recipe: Annotated[str, typer.Option(help="Editing recipe (see `ftedit recipes`).")] = "ft-mask-para-rand",
) -> None:
    """Edit a few real COUNTERFACT facts in gemma-3-270m and show predictions before and after."""
    from ftedit.demo import run_demo

    run_demo(model, recipe, console)


@app.command()
def recipes() -> None:
    """List the named editing recipes."""
    from ftedit.config import recipe_names, resolve_config

    table = Table(title="recipes (override any field with --config FILE or --set key=value)")
    table.add_column("name")
    table.add_column("what it does")
    for name in recipe_names():
        table.add_row(name, " ".join(resolve_config(name).description.split()))
    console.print(table)


@app.command("edit")
def edit_command(
    data: Annotated[str, typer.Option(help="Edit requests: COUNTERFACT/ZsRE JSON, JSONL/CSV or hf:NAME.")],
    out: Annotated[Path, typer.Option(help="Output directory (model or adapter, manifest.json, config.yaml).")],
    model: Annotated[str, typer.Option(help="Base model: demo, smollm2, HF dir, .gguf file or hub name.")] = "demo",
    recipe: Annotated[str, typer.Option(help="Named recipe (see `ftedit recipes`).")] = "ft-mask-para-rand",
    config: Annotated[Path | None, typer.Option(help="YAML/TOML file overriding recipe fields.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override one field, e.g. train.lr=1e-4.")] = None,
    pool: Annotated[str | None, typer.Option(help="Fact pool for random/similar augmentation.")] = None,
    layers: Annotated[str | None, typer.Option(
        help="Layers to train (params.layers), e.g. -3: or 15; 'auto' picks layer and module by a trial sweep.")] = None,
    n: Annotated[int | None, typer.Option(help="Number of edit records (default: all).")] = None,
    offset: Annotated[int, typer.Option(help="First record index.")] = 0,
    skip_invalid: Annotated[bool, typer.Option(help="Skip invalid records (reported) instead of failing.")] = False,
    save: Annotated[str, typer.Option(help="model | adapter | none.")] = "model",
    evaluate: Annotated[bool, typer.Option("--eval/--no-eval", help="Evaluate before and after editing.")] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
    device: Annotated[str | None, typer.Option(
        help="cpu, cuda, ..., or auto: layers spread over all GPUs (default: cuda if available).")] = None,
    dtype: Annotated[str, typer.Option(help="auto | fp32 | bf16 | fp16.")] = "auto",
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    quantize: Annotated[str | None, typer.Option(
        help="4bit | 8bit base weights (bitsandbytes, CUDA only) for LoRA edits of large models.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run from OUT/checkpoint.")] = False,
    on_conflict: Annotated[str, typer.Option(help="Edits contradicting the model's ledger: warn | error | ignore.")]
    = "warn",
) -> None:
    """Edit a model by fine-tuning and write the edited model, its manifest and (optionally) its evaluation."""
    from ftedit.runner import run_edit

    overrides = (set_ or []) + ([f"params.layers={layers}"] if layers else [])
    run_edit(data=data, out=out, model=model, recipe=recipe, config_file=config, overrides=overrides,
             pool=pool, n=n, offset=offset, skip_invalid=skip_invalid, save=save, evaluate=evaluate,
             overwrite=overwrite, device=device, dtype=dtype, progress=progress, console=console,
             resume=resume, on_conflict=on_conflict, quantize=quantize)


@app.command("ledger")
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
    for column in ("#", "hash", "subject", "prompt -> target", "recipe", "run", "time"):
        table.add_column(column, no_wrap=column in ("hash", "run", "time"))
    for i, e in enumerate(entries, start=1):
        table.add_row(str(i), e.hash, e.subject, f"{e.prompt} -> {e.target_new}", e.recipe, e.run, e.time)
    console.print(table)


app.command("eval")(eval_command)


@app.command("locate")
def locate_command(
    data: Annotated[str, typer.Option(help="Edit requests to try (COUNTERFACT/ZsRE JSON, JSONL/CSV, hf:NAME).")],
    out: Annotated[Path, typer.Option(help="Directory for sweep.json/.md/.csv and heatmap.png.")],
    model: Annotated[str, typer.Option(help="Base model: demo, smollm2, HF dir, .gguf file or hub name.")] = "demo",
    recipe: Annotated[str, typer.Option(help="Recipe whose training the trials use (augmentation off).")] = "locft-bf",
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a field, e.g. locate.layer_stride=2, locate.modules=down,up, train.epochs=10.")] = None,
    strategy: Annotated[str, typer.Option(help="exhaustive | halving | both (halving, then checked exhaustively).")
                        ] = "exhaustive",
    n: Annotated[int | None, typer.Option(help="Edits sampled for the trials (locate.n_edits).")] = None,
    offset: Annotated[int, typer.Option(help="First record index.")] = 0,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, ... (default: cuda if available).")] = None,
    dtype: Annotated[str, typer.Option(help="auto | fp32 | bf16 | fp16.")] = "auto",
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Sweep layers x modules with short trial edits; write a heatmap and table and recommend a location."""
    from ftedit.locate_cli import run_locate

    run_locate(data=data, out=out, model=model, recipe=recipe, overrides=set_ or [], strategy=strategy, n=n,
               offset=offset, device=device, dtype=dtype, progress=progress, console=console)


if __name__ == "__main__":
    app()
