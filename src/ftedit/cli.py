"""The ``ftedit`` command line: demo, edit, eval, recipes, bench."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from ftedit.config import DEFAULT_RECIPE
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
    recipe: Annotated[str, typer.Option(help="Editing recipe (see `ftedit recipes`).")] = DEFAULT_RECIPE,
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
    recipe: Annotated[str, typer.Option(help="Named recipe (see `ftedit recipes`) or baseline: rome, memit, "
                                              "alphaedit.")] = DEFAULT_RECIPE,
    config: Annotated[Path | None, typer.Option(help="YAML/TOML file overriding recipe fields.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override one field, e.g. train.lr=1e-4.")] = None,
    pool: Annotated[str | None, typer.Option(help="Fact pool for random/similar augmentation (default: the "
                                                  "recipe's, e.g. the shipped COUNTERFACT train-split pool).")] = None,
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


@app.command("generate")
def generate_command(
    prompts: Annotated[list[str], typer.Argument(help="One or more prompts.")],
    model: Annotated[str, typer.Option(help="Model: an edit's OUT/model, bundled name, HF dir, .gguf or hub name.")
                     ] = "demo",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate (greedy).")] = 24,
    chat_template: Annotated[bool, typer.Option(
        "--chat-template/--no-chat-template", help="Wrap prompts in the tokenizer's chat template when it has one "
                                                   "(instruct models).")] = True,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, ... (default: cuda if available).")] = None,
    dtype: Annotated[str, typer.Option(help="auto | fp32 | bf16 | fp16.")] = "auto",
) -> None:
    """Greedy answers of any model to PROMPTS (as chat turns for instruct models)."""
    from ftedit.evaluate.answers import generate_answers
    from ftedit.models import load_model
    from ftedit.tokenization import has_chat_template

    loaded, tok, _ = load_model(model, device=device, dtype=dtype)
    chat = chat_template and has_chat_template(tok)
    console.print(f"[dim]{model}: greedy, {max_new_tokens} tokens, "
                  f"{'chat template' if chat else 'plain text'}[/dim]")
    for prompt, text in zip(prompts, generate_answers(loaded, tok, prompts, max_new_tokens, chat), strict=True):
        console.print(f"[bold]{prompt}[/bold] -> {text!r}")


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


@app.command("bench")
def bench_command(
    entries: Annotated[list[str] | None, typer.Argument(
        help="Entries LABEL=METHOD[:key=value,...], e.g. 'mine=locft-bf:train.lr=1e-4,params.layers=-2'.")] = None,
    data: Annotated[str, typer.Option(help="Edit requests: COUNTERFACT/ZsRE JSON, JSONL/CSV or hf:NAME.")] = "",
    out: Annotated[Path, typer.Option(help="Output directory (results/, table.md/.csv, results.json, plot.png).")] = Path("bench"),
    model: Annotated[str, typer.Option(help="Base model: demo, smollm2, HF dir, .gguf file or hub name.")] = "demo",
    ablation: Annotated[list[str] | None, typer.Option(help="Built-in entry list: paper000 | paper001.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override for every entry that does not pin the "
                                                   "field itself, e.g. augment.n_paraphrases=3.")] = None,
    pool: Annotated[str | None, typer.Option(help="Fact pool for random/similar augmentation.")] = None,
    n: Annotated[int | None, typer.Option(help="Number of edit records (default: all).")] = None,
    offset: Annotated[int, typer.Option(help="First record index.")] = 0,
    isolate: Annotated[bool, typer.Option(help="Each entry in a fresh process (per-method peak memory).")] = True,
    protocol: Annotated[str, typer.Option(help="auto | counterfact | zsre.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Evaluation pairs per forward pass.")] = 32,
    fluency: Annotated[bool, typer.Option(help="Also generate from generation_prompts: fluency.")] = False,
    gen_max_len: Annotated[int | None, typer.Option(help="Tokens per generated text (default 100 GPU, 40 CPU).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for every entry.")] = 0,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, ... (default: cuda if available).")] = None,
    dtype: Annotated[str, typer.Option(help="auto | fp32 | bf16 | fp16.")] = "auto",
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = False,
) -> None:
    """Run several methods/recipes on the same model and edits; write a comparison table, JSON and a plot.

    Finished entries are kept in OUT/results and reused on a rerun with the same configuration.
    """
    from ftedit.bench import BenchError, BenchSettings, print_summary, resolve_entries, run_bench

    if not data:
        raise typer.BadParameter("--data is required")
    try:
        chosen = resolve_entries(entries or [], ablation or [])
        generation = {"max_out_len": gen_max_len, "top_k": 5, "seed": seed, "batch_size": max(1, batch_size // 2)}
        settings = BenchSettings(model=model, data=data, out=str(out), n=n, offset=offset, pool=pool,
                                 overrides=set_ or [], device=device, dtype=dtype, protocol=protocol,
                                 batch_size=batch_size, generation=generation if fluency else None, seed=seed,
                                 progress=progress)
        payload = run_bench(settings, chosen, isolate=isolate)
    except BenchError as e:
        raise typer.BadParameter(str(e)) from e
    print_summary(console, payload, out)
    if any(r["status"] == "failed" for r in payload["rows"]):
        raise typer.Exit(1)


@app.command("retention")
def retention_command(
    out: Annotated[Path, typer.Option(help="Output folder: report.md, result.json, retention_<task>.png.")],
    task: Annotated[list[str], typer.Option(help="Downstream task KIND=SOURCE (lm, facts, classification, sft); "
                                                 "SOURCE: .jsonl/.json/.csv/.txt file or hf:NAME. Repeatable.")],
    intrinsic_pool: Annotated[str, typer.Option(help="Facts for the intrinsic set (e.g. COUNTERFACT train).")],
    edits: Annotated[str | None, typer.Option(help="Edit requests (COUNTERFACT/ZsRE JSON, JSONL/CSV).")] = None,
    from_edit: Annotated[str | None, typer.Option(help="Start from an `ftedit edit` output folder instead.")] = None,
    model: Annotated[str | None, typer.Option(help="Base model (default: demo, or the manifest's).")] = None,
    method: Annotated[str, typer.Option(help="Edit method: a recipe or a registered baseline.")] = "locft-bf",
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override one method field.")] = None,
    pool: Annotated[str | None, typer.Option(help="Fact pool for recipes with random/similar augmentation.")] = None,
    n: Annotated[int | None, typer.Option(help="Number of edits.")] = 50,
    offset: Annotated[int, typer.Option(help="First edit record.")] = 0,
    strategy: Annotated[list[str] | None, typer.Option(
        help="Freezing strategy: none | below:K | window:LAYERS | edits. Repeatable.")] = None,
    protocol: Annotated[str, typer.Option(help="mass (all edits, one run) or single (each edit alone).")] = "mass",
    threshold: Annotated[list[str] | None, typer.Option(help="Stopping threshold KIND=VALUE (loss: below, "
        "accuracy: above) or KIND=rel:F (F x the base model's validation metric).")] = None,
    max_steps: Annotated[int, typer.Option(help="Step cap of every downstream run.")] = 30,
    eval_every: Annotated[int, typer.Option(help="Validate every N steps.")] = 5,
    probe_every: Annotated[int, typer.Option(help="Measure retention every N steps.")] = 10,
    lr: Annotated[float, typer.Option(help="Downstream learning rate (AdamW).")] = 2e-5,
    batch_size: Annotated[int, typer.Option(help="Downstream batch size.")] = 8,
    n_train: Annotated[int, typer.Option(help="Training records per task (after filtering).")] = 2000,
    n_val: Annotated[int, typer.Option(help="Validation records per task.")] = 64,
    max_length: Annotated[int, typer.Option(help="Tokens per downstream sequence.")] = 64,
    n_intrinsic: Annotated[int, typer.Option(help="Intrinsic facts to track.")] = 50,
    filter_intrinsic: Annotated[bool, typer.Option(help="Also filter texts naming intrinsic facts.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing study in --out.")] = False,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, ...")] = None,
    dtype: Annotated[str, typer.Option(help="auto | fp32 | bf16 | fp16.")] = "auto",
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Edit, fine-tune downstream under freezing strategies, and report how much edited vs intrinsic knowledge
    survives (paper 002)."""
    from ftedit.retention.cli import downstream_config, parse_tasks, run_retention
    from ftedit.retention.study import StudyConfig

    tasks = parse_tasks(task, threshold or [], {"n_train": n_train, "n_val": n_val, "max_length": max_length})
    cfg = StudyConfig(tasks=tasks, intrinsic_pool=intrinsic_pool, edits=edits, n_edits=n, offset=offset,
                      method=method, overrides=set_ or [], method_pool=pool, from_edit=from_edit,
                      strategies=strategy or ["none", "edits"], protocol=protocol, n_intrinsic=n_intrinsic,
                      filter_intrinsic=filter_intrinsic,
                      downstream=downstream_config(lr=lr, batch_size=batch_size, max_steps=max_steps,
                                                   eval_every=eval_every, probe_every=probe_every))
    run_retention(cfg, model=model, out=out, overwrite=overwrite, device=device, dtype=dtype, progress=progress,
                  console=console)


app.command("eval")(eval_command)


@app.command("locate")
def locate_command(
    out: Annotated[Path, typer.Option(help="Directory for sweep.json/.md/.csv and heatmap.png.")],
    data: Annotated[str, typer.Option(help="Edit requests to try (COUNTERFACT/ZsRE JSON, JSONL/CSV, hf:NAME).")]
    = "",
    calibration: Annotated[bool, typer.Option(help="Run the search of --layers auto on the shipped calibration set "
                                                   "(reproduces the shipped result of a bundled model).")] = False,
    model: Annotated[str, typer.Option(help="Base model: demo, smollm2, HF dir, .gguf file or hub name.")] = "demo",
    recipe: Annotated[str, typer.Option(help="Recipe whose training the trials use (augmentation off).")] = "locft-bf",
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a field, e.g. locate.layer_stride=2, locate.modules=down,up, train.epochs=10.")] = None,
    strategy: Annotated[str | None, typer.Option(
        help="exhaustive | halving | both (halving, then checked exhaustively); default: the recipe's.")] = None,
    n: Annotated[int | None, typer.Option(help="Edits sampled for the trials (locate.n_edits).")] = None,
    offset: Annotated[int, typer.Option(help="First record index.")] = 0,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, ... (default: cuda if available).")] = None,
    dtype: Annotated[str, typer.Option(help="auto | fp32 | bf16 | fp16.")] = "auto",
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Sweep layers x modules with short trial edits; write a heatmap and table and recommend a location."""
    from ftedit.locate_cli import run_locate

    run_locate(data=data, out=out, model=model, recipe=recipe, overrides=set_ or [], strategy=strategy, n=n,
               offset=offset, device=device, dtype=dtype, progress=progress, console=console,
               calibration=calibration)


if __name__ == "__main__":
    app()
