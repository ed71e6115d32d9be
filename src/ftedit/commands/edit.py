"""``ftedit edit``: options -> :func:`ftedit.pipeline.run_edit`, then the before/after table."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ftedit.commands import options
from ftedit.commands.console import console
from ftedit.config import DEFAULT_RECIPE

HEADLINE = ("efficacy", "generalization", "locality", "edit_score")


def print_eval(pre: dict, post: dict, seconds: float) -> None:
    table = Table(title=f"COUNTERFACT/ZsRE protocol, before and after ({seconds:.0f}s of training)")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for key in HEADLINE:
        if key in post:
            table.add_row(key, _fmt(pre.get(key)), _fmt(post[key]))
    console.print(table)
    for name, what in (("generalization", "paraphrase"), ("locality", "neighborhood")):
        counted = post.get(f"n_records_{name}")
        if counted is not None and counted < post["n_records"]:
            console.print(f"{name}: over the {counted} of {post['n_records']} requests that have {what} prompts")


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def print_location(location: dict | None) -> None:
    if location and "why" in location:
        console.print(f"[bold]location[/bold] layer {location['layer']} {location['module']}: {location['why']}")


def print_generations(generations: dict) -> None:
    table = Table(title=f"What the model says (greedy, {generations['max_new_tokens']} tokens): before -> after")
    for col in ("prompt", "new target", "before", "after", "match"):
        table.add_column(col)
    for r in generations["rows"]:
        mark = "[green]yes[/green]" if r["match_after"] else "[red]no[/red]"
        table.add_row(f"{r['kind']}: {r['prompt']}", r["target_new"], repr(r["before"].strip()),
                      repr(r["after"].strip()), mark)
    console.print(table)
    console.print("exact match of the new target (%): " + ", ".join(
        f"{k} {v:.0f}" for k, v in generations["summary"].items()))


def edit_command(
    data: Annotated[str, typer.Option(help="Edit requests: COUNTERFACT/ZsRE JSON, JSONL/CSV or hf:NAME.")],
    out: Annotated[Path, typer.Option(help="Output directory (model or adapter, manifest.json, config.yaml).")],
    model: options.Model = "demo",
    recipe: Annotated[str, typer.Option(help="Named recipe (see `ftedit recipes`) or baseline: rome, memit, "
                                              "alphaedit, grace, ike, mend, malmen (editors from `ftedit train-editor`).")] = DEFAULT_RECIPE,
    config: Annotated[Path | None, typer.Option(help="YAML/TOML file overriding recipe fields.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override one field, e.g. train.lr=1e-4.")] = None,
    pool: Annotated[str | None, typer.Option(help="Fact pool for random/similar augmentation (default: the "
                                                  "recipe's, e.g. the shipped COUNTERFACT train-split pool).")] = None,
    layers: Annotated[str | None, typer.Option(
        help="Layers to train (params.layers), e.g. -3: or 15; 'auto' picks layer and module by a trial sweep.")] = None,
    n: Annotated[int | None, typer.Option(help="Number of edit records (default: all).")] = None,
    offset: Annotated[int, typer.Option(help="First record index.")] = 0,
    skip_invalid: Annotated[bool, typer.Option(help="Skip invalid records (reported) instead of failing.")] = False,
    save: Annotated[str | None, typer.Option(
        help="model | adapter | codebook | none (default: the method's; model, grace: codebook, ike: none).")] = None,
    evaluate: Annotated[bool, typer.Option("--eval/--no-eval", help="Evaluate before and after editing.")] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
    device: Annotated[str | None, typer.Option(
        help="cpu, cuda, ..., or auto: layers spread over all GPUs (default: cuda if available).")] = None,
    dtype: options.Dtype = "auto",
    progress: options.Progress = True,
    quantize: Annotated[str | None, typer.Option(
        help="4bit | 8bit base weights (bitsandbytes, CUDA only) for LoRA edits of large models.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run from OUT/checkpoint.")] = False,
    on_conflict: Annotated[str, typer.Option(help="Edits contradicting the model's ledger: warn | error | ignore.")]
    = "warn",
    seed: Annotated[int | None, typer.Option(
        help="Seed for this edit (overrides train.seed, or a baseline's seed; default: the config's).")] = None,
) -> None:
    """Edit a model by fine-tuning and write the edited model, its manifest and (optionally) its evaluation."""
    from ftedit.pipeline import EditOptions, run_edit

    overrides = (set_ or []) + ([f"params.layers={layers}"] if layers else [])
    run = run_edit(EditOptions(
        data=data, out=out, model=model, method=recipe, config_file=config, overrides=overrides, pool=pool, n=n,
        offset=offset, skip_invalid=skip_invalid, save=save, evaluate=evaluate, overwrite=overwrite, device=device,
        dtype=dtype, progress=progress, resume=resume, on_conflict=on_conflict, quantize=quantize, seed=seed,
        command=sys.argv[1:]))
    manifest = run.manifest
    if not manifest:  # not the main process of a distributed run
        return
    print_location(manifest["touched"].get("location"))
    if manifest.get("generations"):
        print_generations(manifest["generations"])
    evaluation = manifest.get("evaluation") or {}
    if "post" in evaluation:
        seconds = manifest["seconds"].get("train", manifest["seconds"].get("edit", 0.0))
        print_eval(evaluation["pre"], evaluation["post"], seconds)
    touched = manifest["touched"]
    console.print(f"wrote {run.out} ({run.save}); {run.n_edits} edits with {manifest['method']}, "
                  f"{touched['trainable_parameters']:,} trainable parameters in {len(touched['modules'])} modules, "
                  f"{run.wall_seconds:.0f}s")
    unreached = manifest.get("unreached") or {}
    if unreached.get("n"):
        console.print(f"[yellow]{unreached['n']} of {unreached['of']} edits unreached[/yellow] (their own prompt "
                      "does not prefer the new target; see the warning above and manifest.json: unreached)")
