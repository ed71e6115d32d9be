"""``ftedit edit`` end to end: load, evaluate before, edit, evaluate after, save. Never touches the base files."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from ftedit.config import resolve_config
from ftedit.data.loaders import load_pool_facts, load_requests
from ftedit.editor import edit
from ftedit.evaluate import compare, evaluate_requests
from ftedit.models import load_model
from ftedit.outputs import build_manifest, save_edit

logger = logging.getLogger(__name__)

HEADLINE = ("efficacy", "generalization", "locality", "edit_score")


def _check_out_dir(out: Path, model_spec: str) -> None:
    base = Path(model_spec).expanduser().resolve()
    target = out.resolve()
    if base.exists() and (target == base or base.is_relative_to(target) or target.is_relative_to(base)):
        raise ValueError(f"--out {out} would overwrite the base model at {base}; choose another directory")


def print_eval(console: Console, pre: dict, post: dict, seconds: float) -> None:
    table = Table(title=f"COUNTERFACT/ZsRE protocol, before and after ({seconds:.0f}s of training)")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for key in HEADLINE:
        if key in post:
            table.add_row(key, f"{pre.get(key, float('nan')):.1f}", f"{post[key]:.1f}")
    console.print(table)


def run_edit(*, data, out: Path, model, recipe, config_file, overrides, pool, n, offset, skip_invalid, save,
             evaluate, overwrite, device, dtype, progress, console: Console) -> dict:
    from ftedit.config import recipe_names
    from ftedit.methods import BASELINES

    if recipe in BASELINES and recipe not in recipe_names():  # rome, memit, alphaedit: no recipe config
        from ftedit.baselines.run import run_baseline_edit

        return run_baseline_edit(data=data, out=out, model=model, recipe=recipe, config_file=config_file,
                                 overrides=overrides, pool=pool, n=n, offset=offset, skip_invalid=skip_invalid,
                                 save=save, evaluate=evaluate, overwrite=overwrite, device=device, dtype=dtype,
                                 progress=progress, console=console)
    out = Path(out)
    _check_out_dir(out, model)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output directory {out} already exists; pass --overwrite to replace it")
    cfg = resolve_config(recipe, config_file, overrides)
    if cfg.mode == "single" and save != "none":
        logger.warning("single mode measures each edit on a fresh copy of the model: nothing edited to save; "
                       "writing the manifest and per-edit metrics only")
        save = "none"
    if (cfg.augment.n_random or cfg.augment.n_similar) and not (pool or cfg.augment.pool):
        raise ValueError(f"recipe {cfg.recipe} draws random/similar facts from a pool: pass --pool FILE "
                         "(e.g. the COUNTERFACT train split) or --set augment.n_random=0 augment.n_similar=0")
    loaded = load_requests(data, n=n, offset=offset, skip_invalid=skip_invalid)
    for issue in loaded.skipped:
        logger.warning("skipped: %s", issue)
    facts = load_pool_facts(pool) if pool else None
    torch.manual_seed(cfg.train.seed)
    base, tok, identity = load_model(model, device=device, dtype=dtype)
    pre = evaluate_requests(base, tok, loaded.requests, progress=progress) if evaluate else None
    start = time.perf_counter()
    result = edit(base, tok, loaded.requests, cfg, pool=facts, progress=progress,
                  model_fingerprint=identity.fingerprint)
    wall = time.perf_counter() - start
    extra = {"data": {"source": str(data), "n": n, "offset": offset, "skipped": [vars(s) for s in loaded.skipped]},
             "pool": pool, "wall_seconds": wall}
    if evaluate and cfg.mode != "single":
        post = evaluate_requests(result.model, tok, loaded.requests, progress=progress)
        extra["evaluation"] = {"pre": pre.summary, "post": post.summary, "compare": compare(pre, post)}
        print_eval(console, pre.summary, post.summary, result.seconds["train"])
    elif cfg.mode == "single":
        extra["evaluation"] = {"pre": pre.summary if pre else None, "single_edit": result.single_edit_metrics}
    manifest = build_manifest(result, loaded.requests, identity.to_dict(), extra)
    save_edit(out, result, tok, manifest, save=save, overwrite=overwrite)
    console.print(f"wrote {out} ({save}); {len(loaded.requests)} edits, "
                  f"{result.trainable_parameters:,} trainable parameters, {wall:.0f}s")
    return manifest
