"""``ftedit locate``: sweep layers x modules, write the report, print the recommendation."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ftedit.commands import options
from ftedit.commands.console import console
from ftedit.errors import Interrupted, UsageError, on_interrupt
from ftedit.locate import SweepResult


def locate_command(
    out: Annotated[Path, typer.Option(help="Directory for sweep.json/.md/.csv and heatmap.png.")],
    data: Annotated[str, typer.Option(help="Edit requests to try (COUNTERFACT/ZsRE JSON, JSONL/CSV, hf:NAME).")]
    = "",
    calibration: Annotated[bool, typer.Option(help="Run the search of --layers auto on the shipped calibration set "
                                                   "(reproduces the shipped result of a bundled model).")] = False,
    model: options.Model = "demo",
    recipe: Annotated[str, typer.Option(help="Recipe whose training the trials use (augmentation off).")] = "locft-bf",
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a field, e.g. locate.layer_stride=2, locate.modules=down,up, train.epochs=10.")] = None,
    strategy: Annotated[str | None, typer.Option(
        help="exhaustive | halving | both (halving, then checked exhaustively); default: exhaustive with --data, "
             "the recipe's with --calibration.")] = None,
    n: Annotated[int | None, typer.Option(help="Edits sampled for the trials (locate.n_edits).")] = None,
    offset: Annotated[int, typer.Option(help="First record index.")] = 0,
    device: options.Device = None,
    dtype: options.Dtype = "auto",
    progress: options.Progress = True,
) -> None:
    """Sweep layers x modules with short trial edits; write a heatmap and table and recommend a location."""
    from ftedit.locate import run_calibration_sweep, run_sweeps

    if calibration == bool(data):
        raise UsageError("pass either --data FILE (a search on those edits) or --calibration (the search "
                         "that --layers auto runs, on the shipped calibration set)")
    interrupted = Interrupted("interrupted: the search did not finish",
                              hint=f"a search's report (in {out}) and cache entry are written when it completes: "
                                   "run the same command to start it over")
    with on_interrupt(lambda: interrupted):
        if calibration:
            result, shipped = run_calibration_sweep(out=out, model=model, recipe=recipe, overrides=set_ or [],
                                                    strategy=strategy, n=n, device=device, dtype=dtype,
                                                    progress=progress)
            _print(result, Path(out))
            _against_shipped(result, shipped)
            return
        strategy = strategy or "exhaustive"
        results = run_sweeps(data=data, out=out, model=model, recipe=recipe, overrides=set_ or [],
                             strategy=strategy, n=n, offset=offset, device=device, dtype=dtype, progress=progress)
    for name, result in results.items():
        _print(result, Path(out) / name)
    if strategy == "both":
        _compare(results["halving"], results["exhaustive"])


def _print(result: SweepResult, where: Path) -> None:
    table = Table(title=f"{result.strategy} sweep: top locations ({len(result.trials)} trials, {result.seconds:.0f}s"
                        f"{', cached' if result.cached else ''})")
    for col in ("layer", "module", "epochs", "ES", "PS", "NS", "score"):
        table.add_column(col, justify="right")
    top = sorted(result.final_trials(), key=lambda t: (t.epochs, t.metrics["edit_score"]), reverse=True)[:8]
    for t in top:
        m = t.metrics
        table.add_row(str(t.candidate.layer), t.candidate.module, str(t.epochs), f"{m['efficacy']:.1f}",
                      f"{m['generalization']:.1f}", f"{m['locality']:.1f}", f"{m['edit_score']:.1f}")
    console.print(table)
    console.print(f"recommended: --set params.layers={result.best.layer} --set params.modules={result.best.module}"
                  f"   (report: {where})")


def _against_shipped(result: SweepResult, shipped: dict | None) -> None:
    if shipped:
        best = shipped["search"]["best"]
        same = (best["layer"], best["module"]) == (result.best.layer, result.best.module)
        console.print(f"shipped result for {shipped['model']}: layer {best['layer']} {best['module']} "
                      f"({'reproduced' if same else 'NOT reproduced'})")


def _compare(pruned: SweepResult, full: SweepResult) -> None:
    exhaustive = {t.candidate: t.metrics["edit_score"] for t in full.trials}
    best = exhaustive[full.best]
    picked = exhaustive[pruned.best]
    console.print(f"halving picked {pruned.best.label} (exhaustive score {picked:.1f}) vs exhaustive best "
                  f"{full.best.label} ({best:.1f}): gap {best - picked:.1f} points, "
                  f"{len(pruned.trials)} vs {len(full.trials)} trials, {pruned.seconds:.0f}s vs {full.seconds:.0f}s")
