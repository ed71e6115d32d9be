"""``ftedit locate``: load, sweep, write the report, print the recommendation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ftedit.config import resolve_config
from ftedit.data.loaders import load_requests
from ftedit.locate import SweepResult, calibration_search, sweep, write_report
from ftedit.models import load_model

STRATEGIES = ("exhaustive", "halving", "both")


def run_locate(*, data, out: Path, model, recipe, overrides, strategy, n, offset, device, dtype, progress,
               console: Console, calibration: bool = False) -> dict[str, SweepResult]:
    if calibration == bool(data):
        raise ValueError("pass either --data FILE (a search on those edits) or --calibration (the search that "
                         "params.layers=auto runs, on the shipped calibration set)")
    cfg = resolve_config(recipe, None, overrides)
    strategy = strategy or (cfg.locate.strategy if calibration else "exhaustive")
    if strategy not in STRATEGIES or (calibration and strategy == "both"):
        raise ValueError(f"--strategy {strategy!r}: expected one of {STRATEGIES} ('both' only with --data)")
    cfg.locate.strategy = strategy if calibration else cfg.locate.strategy
    if n is not None:
        cfg.locate.n_edits = n
    base, tok, identity = load_model(model, device=device, dtype=dtype)
    if calibration:
        return {"calibration": _calibration(base, tok, identity, cfg, out, progress, console)}
    loaded = load_requests(data, n=cfg.locate.n_edits, offset=offset)
    title = f"{identity.name_or_path.split('/')[-1]}, {len(loaded.requests)} edits, trials: {recipe}"
    results = {}
    for name in ("halving", "exhaustive") if strategy == "both" else (strategy,):
        settings = dataclasses.replace(cfg.locate, strategy=name)
        result = sweep(base, tok, loaded.requests, cfg, settings, progress=progress,
                       model_fingerprint=identity.fingerprint)
        write_report(Path(out) / name, result, identity.to_dict(), title)
        results[name] = result
        _print(console, result, Path(out) / name)
    if strategy == "both":
        _compare(console, results["halving"], results["exhaustive"])
    return results


def _calibration(model, tok, identity, cfg, out: Path, progress: bool, console: Console) -> SweepResult:
    """The search of params.layers=auto, run afresh (cache off), and how it compares with the shipped result."""
    from ftedit.calibration import calibration_sha256
    from ftedit.locate import search_settings, settings_key, shipped_result

    cfg.locate.cache = False
    result = calibration_search(model, tok, cfg, progress=progress)
    write_report(out, result, identity.to_dict(), f"{identity.spec}, calibration set, trials: {cfg.recipe}")
    _print(console, result, out)
    shipped = shipped_result(identity, settings_key(search_settings(cfg), calibration_sha256()))
    if shipped:
        best = shipped["search"]["best"]
        same = (best["layer"], best["module"]) == (result.best.layer, result.best.module)
        console.print(f"shipped result for {shipped['model']}: layer {best['layer']} {best['module']} "
                      f"({'reproduced' if same else 'NOT reproduced'})")
    return result


def _print(console: Console, result: SweepResult, where: Path) -> None:
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


def _compare(console: Console, pruned: SweepResult, full: SweepResult) -> None:
    exhaustive = {t.candidate: t.metrics["edit_score"] for t in full.trials}
    best = exhaustive[full.best]
    picked = exhaustive[pruned.best]
    console.print(f"halving picked {pruned.best.label} (exhaustive score {picked:.1f}) vs exhaustive best "
                  f"{full.best.label} ({best:.1f}): gap {best - picked:.1f} points, "
                  f"{len(pruned.trials)} vs {len(full.trials)} trials, {pruned.seconds:.0f}s vs {full.seconds:.0f}s")
