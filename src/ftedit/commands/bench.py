"""``ftedit bench``: several methods on the same model and edits; a comparison table, JSON and a plot."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ftedit.commands import options
from ftedit.commands.console import console


def bench_command(
    entries: Annotated[list[str] | None, typer.Argument(
        help="Entries LABEL=METHOD[:key=value,...], e.g. 'mine=locft-bf:train.lr=1e-4,params.layers=-2'.")] = None,
    data: Annotated[str, typer.Option(help="Edit requests: COUNTERFACT/ZsRE JSON, JSONL/CSV or hf:NAME.")] = "",
    out: Annotated[Path, typer.Option(help="Output directory (results/, table.md/.csv, results.json, plot.png).")] = Path("bench"),
    model: options.Model = "demo",
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
    device: options.Device = None,
    dtype: options.Dtype = "auto",
    progress: options.Progress = False,
) -> None:
    """Run several methods/recipes on the same model and edits; write a comparison table, JSON and a plot.

    Finished entries are kept in OUT/results and reused on a rerun with the same configuration.
    """
    from ftedit.bench import BenchSettings, resolve_entries, run_bench
    from ftedit.errors import UsageError

    if not data:
        raise UsageError("ftedit bench needs --data FILE (the edit requests every entry is run on)")
    # errors (BenchError and the others) are reported by the command line's one error reporter
    chosen = resolve_entries(entries or [], ablation or [])
    generation = {"max_out_len": gen_max_len, "top_k": 5, "seed": seed, "batch_size": max(1, batch_size // 2)}
    settings = BenchSettings(model=model, data=data, out=str(out), n=n, offset=offset, pool=pool,
                             overrides=set_ or [], device=device, dtype=dtype, protocol=protocol,
                             batch_size=batch_size, generation=generation if fluency else None, seed=seed,
                             progress=progress)
    payload = run_bench(settings, chosen, isolate=isolate)
    print_summary(payload, out)
    if any(r["status"] == "failed" for r in payload["rows"]):
        raise typer.Exit(1)


def print_summary(payload: dict[str, Any], out: Path) -> None:
    """The headline columns as a rich table (the full table is in OUT/table.md)."""
    from ftedit.bench import METRICS, cell, table_rows

    table = Table(title=f"ftedit bench: {payload['config']['model']}, {payload['config']['n_requests']} edits")
    columns = ("label", "method", "status", *METRICS, "edit_s", "eval_s", "peak_rss_mb")
    headers = ("label", "method", "status", "ES", "PS", "NS", "score", "edit s", "eval s", "peak MB")
    for c, h in zip(columns, headers, strict=True):
        table.add_column(h, justify="left" if c in ("label", "method", "status") else "right")
    for r in table_rows(payload):
        table.add_row(*(cell(r[c]) for c in columns))
    console.print(table)
    console.print(f"wrote {out}/table.md, table.csv, results.json, plot.png")
