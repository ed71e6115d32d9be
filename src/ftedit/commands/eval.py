"""``ftedit eval``: evaluate a model (and optionally its base) on edit requests; print a table, write JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ftedit.commands import options
from ftedit.commands.console import console
from ftedit.evaluate import EvalResult

HEADLINE = ("efficacy", "generalization", "locality", "edit_score", "efficacy_magnitude",
            "generalization_magnitude", "locality_magnitude", "efficacy_acc", "generalization_acc",
            "locality_acc", "efficacy_exact", "generalization_exact", "locality_exact", "fluency",
            "consistency", "perplexity")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return "-" if value is None else str(value)


def print_table(result: EvalResult, base: EvalResult | None, deltas: dict | None, title: str) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("model", justify="right")
    if base is not None:
        table.add_column("base", justify="right")
        table.add_column("delta", justify="right")
    rows = [k for k in HEADLINE if k in result.summary]
    counts = [k for k in result.summary if k.startswith("n_")]
    for key in rows + counts:
        row = [key, _fmt(result.summary[key])]
        if base is not None:
            row += [_fmt(base.summary.get(key)), _fmt(deltas.get(key, {}).get("delta"))]
        table.add_row(*row, end_section=key == rows[-1])
    console.print(table)


def eval_command(
    model: Annotated[str, typer.Option(help="Model: bundled name (demo), HF dir, .gguf file or hub name.")] = "demo",
    data: Annotated[str, typer.Option(help="Edit requests: COUNTERFACT/ZsRE JSON, JSONL or CSV.")] = "",
    n: Annotated[int | None, typer.Option(help="Number of records (default: all).")] = None,
    offset: Annotated[int, typer.Option(help="First record index.")] = 0,
    seed: Annotated[int, typer.Option(help="Seed (torch, and sampling for fluency).")] = 0,
    protocol: Annotated[str, typer.Option(help="auto | counterfact | zsre.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Pairs per forward pass.")] = 32,
    out: Annotated[Path | None, typer.Option(help="Write the results as JSON here.")] = None,
    base_model: Annotated[str | None, typer.Option(help="Also evaluate this (unedited) model: pre/post deltas.")] = None,
    details: Annotated[bool, typer.Option(help="Include per-record details in the JSON.")] = False,
    fluency: Annotated[bool, typer.Option(help="Generate from generation_prompts: fluency (+ consistency).")] = False,
    gen_max_len: Annotated[int | None, typer.Option(help="Tokens per generated text, prompt included "
                                                         "(MEMIT: 100; default 100 on GPU, 40 on CPU).")] = None,
    gen_top_k: Annotated[int, typer.Option(help="Sample from the top-k tokens (MEMIT: 5); 0 = greedy.")] = 5,
    snippets: Annotated[Path | None, typer.Option(help="attribute_snippets.json, for consistency.")] = None,
    idf: Annotated[Path | None, typer.Option(help="idf.npy (with --tfidf-vocab); else fit on snippets.")] = None,
    tfidf_vocab: Annotated[Path | None, typer.Option(help="tfidf_vocab.json (with --idf).")] = None,
    ppl_data: Annotated[Path | None, typer.Option(help="JSONL with a 'text' field: also report perplexity.")] = None,
    ppl_n: Annotated[int, typer.Option(help="Texts for perplexity.")] = 200,
    ppl_max_length: Annotated[int, typer.Option(help="Tokens per perplexity text (truncation).")] = 256,
    missing: Annotated[str, typer.Option(help="Records without paraphrases/neighbors: count (average each metric "
                                              "over the records that have its prompts; counts reported) | error.")] = "count",
    chat_template: Annotated[str, typer.Option(help="Prompts as chat turns: auto (instruct model and question "
                                                    "prompts) | on | off.")] = "auto",
    device: options.Device = None,
    dtype: options.Dtype = "auto",
    progress: options.Progress = True,
) -> dict[str, Any]:
    """Evaluate edits the way the literature does (COUNTERFACT ES/PS/NS, ZsRE token accuracy)."""
    from ftedit.errors import Interrupted, UsageError, on_interrupt
    from ftedit.evaluate.run import EvalSettings, run_evaluation

    if not data:
        raise UsageError("ftedit eval needs --data FILE (the edit requests to score)")
    settings = EvalSettings(
        model=model, data=data, n=n, offset=offset, seed=seed, protocol=protocol, batch_size=batch_size, out=out,
        base_model=base_model, details=details, fluency=fluency, gen_max_len=gen_max_len, gen_top_k=gen_top_k,
        snippets=snippets, idf=idf, tfidf_vocab=tfidf_vocab, ppl_data=ppl_data, ppl_n=ppl_n,
        ppl_max_length=ppl_max_length, missing=missing, chat_template=chat_template, device=device, dtype=dtype,
        progress=progress)
    written = f"; {out} was not written" if out else ""
    with on_interrupt(lambda: Interrupted(f"interrupted: scoring did not finish{written}",
                                          hint="scoring keeps no partial results: run the same command again")):
        outcome = run_evaluation(settings)
    print_table(outcome.result, outcome.base_result, outcome.deltas,
                f"{model} on {Path(data).name} ({outcome.n_requests} records)")
    return outcome.payload
