"""``ftedit edit`` end to end: load, evaluate before, edit, evaluate after, save. Never touches the base files."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from ftedit.chat import apply_chat_template
from ftedit.checkpoint import Checkpoints, run_fingerprint
from ftedit.config import resolve_config
from ftedit.data.loaders import load_pool_facts, load_requests
from ftedit.data.requests import warn_subjectless
from ftedit.distributed import DataParallel, full_state_dict, shard_model
from ftedit.editor import edit
from ftedit.evaluate import compare, evaluate_requests
from ftedit.evaluate.answers import before_after, what_it_says
from ftedit.ledger import check_conflicts, find_ledger
from ftedit.locate import resolve_location
from ftedit.models import load_model
from ftedit.outputs import build_manifest, request_hash, save_edit

logger = logging.getLogger(__name__)

HEADLINE = ("efficacy", "generalization", "locality", "edit_score")
MISSING = "count"  # a user's facts may come without paraphrases/neighbors: their rates average what is there
CHECKPOINT_DIR = "checkpoint"  # inside --out while training; replaced by the finished edit


def _check_out_dir(out: Path, model_spec: str) -> None:
    base = Path(model_spec).expanduser().resolve()
    target = out.resolve()
    if base.exists() and (target == base or base.is_relative_to(target) or target.is_relative_to(base)):
        raise ValueError(f"--out {out} would overwrite the base model at {base}; choose another directory")


def _check_existing(out: Path, overwrite: bool, resume: bool) -> None:
    """An existing --out is replaced only with --overwrite, or continued with --resume if it holds a checkpoint."""
    if not out.exists():
        if resume:
            logger.warning("--resume: %s does not exist; starting from the beginning", out)
        return
    if (out / "manifest.json").is_file() and not overwrite:
        raise FileExistsError(f"output directory {out} already exists (a finished edit); pass --overwrite to replace it")
    if resume or overwrite:
        return
    hint = " or --resume to continue it" if (out / CHECKPOINT_DIR).is_dir() else ""
    raise FileExistsError(f"output directory {out} already exists; pass --overwrite to replace it{hint}")


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def print_eval(console: Console, pre: dict, post: dict, seconds: float) -> None:
    table = Table(title=f"COUNTERFACT/ZsRE protocol, before and after ({seconds:.0f}s of training)")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for key in HEADLINE:
        if post.get(key) is not None:
            table.add_row(key, _fmt(pre.get(key)), _fmt(post[key]))
    console.print(table)


def print_location(console: Console, location: dict | None) -> None:
    if location:
        console.print(f"[bold]location[/bold] layer {location['layer']} {location['module']}: {location['why']}")


def print_generations(console: Console, generations: dict) -> None:
    table = Table(title=f"What the model says (greedy, {generations['max_new_tokens']} tokens): before -> after")
    for col in ("prompt", "new target", "before", "after", "match"):
        table.add_column(col)
    for r in generations["rows"]:
        mark = ("[green]yes[/green]" if r["match_after"] else "[red]no[/red]")
        table.add_row(f"{r['kind']}: {r['prompt']}", r["target_new"], repr(r["before"].strip()),
                      repr(r["after"].strip()), mark)
    console.print(table)
    console.print("exact match of the new target (%): " + ", ".join(
        f"{k} {v:.0f}" for k, v in generations["summary"].items()))


def run_edit(*, data, out: Path, model, recipe, config_file, overrides, pool, n, offset, skip_invalid, save,
             evaluate, overwrite, device, dtype, progress, console: Console, resume: bool = False,
             on_conflict: str = "warn", quantize: str | None = None) -> dict:
    from ftedit.config import recipe_names
    from ftedit.methods import BASELINES

    if recipe in BASELINES and recipe not in recipe_names():  # rome, memit, alphaedit: no recipe config
        if resume or quantize:
            raise ValueError(f"--resume and --quantize apply to fine-tuning recipes, not to {recipe}")
        from ftedit.baselines.run import run_baseline_edit

        return run_baseline_edit(data=data, out=out, model=model, recipe=recipe, config_file=config_file,
                                 overrides=overrides, pool=pool, n=n, offset=offset, skip_invalid=skip_invalid,
                                 save=save, evaluate=evaluate, overwrite=overwrite, device=device, dtype=dtype,
                                 progress=progress, console=console)
    out = Path(out)
    _check_out_dir(out, model)
    _check_existing(out, overwrite, resume)
    parallel = DataParallel()
    if parallel.sharded:  # FSDP: load on CPU, then each process keeps its shard on its device
        device = "cpu"
    elif parallel.distributed:  # under a launcher: one device per process; rank 0 evaluates the result and saves
        device = device or str(parallel.device)
    cfg = resolve_config(recipe, config_file, overrides)
    if parallel.sharded and (resume or quantize or cfg.params.method != "full"):
        raise ValueError("under FSDP sharding ftedit trains full weights (params.method=full), without --quantize, "
                         "and writes no resumable checkpoints (--resume); use DDP (no FSDP config) for those")
    if quantize and (cfg.params.method != "lora" or save == "model"):
        raise ValueError(f"--quantize {quantize}: quantized base weights are frozen; train LoRA adapters "
                         "(--set params.method=lora) and save them with --save adapter")
    if cfg.mode == "single" and save != "none":
        logger.warning("single mode measures each edit on a fresh copy of the model: nothing edited to save; "
                       "writing the manifest and per-edit metrics only")
        save = "none"
    if (cfg.augment.n_random or cfg.augment.n_similar) and not (pool or cfg.augment.pool):
        raise ValueError(f"recipe {cfg.recipe} draws random/similar facts from a pool: pass --pool FILE "
                         "(e.g. the COUNTERFACT train split), --pool shipped, or --set augment.n_random=0 "
                         "augment.n_similar=0")
    loaded = load_requests(data, n=n, offset=offset, skip_invalid=skip_invalid)
    for issue in loaded.skipped:
        logger.warning("skipped: %s", issue)
    warn_subjectless(loaded.requests)
    facts = load_pool_facts(pool or cfg.augment.pool) if (pool or cfg.augment.pool) else None
    history = find_ledger(model)
    check_conflicts(history, loaded.requests, on_conflict, source=str(data))
    torch.manual_seed(cfg.train.seed)
    base, tok, identity = load_model(model, device=device, dtype=dtype, quantize=quantize)
    if parallel.sharded:
        shard_model(base, parallel)
    requests, facts, chat = apply_chat_template(tok, loaded.requests, facts, cfg.objective.chat_template)
    cfg, location = resolve_location(base, tok, cfg, identity, progress=progress and parallel.is_main)
    if parallel.is_main:
        print_location(console, location)
    said_before = what_it_says(base, tok, loaded.requests, chat) if evaluate and parallel.is_main else None
    # every process scores the unedited model, so that none waits at the first gradient sum for longer
    # than the process group's timeout while rank 0 evaluates
    pre = evaluate_requests(base, tok, requests, progress=progress and parallel.is_main, missing=MISSING) if evaluate else None
    checkpoints = None
    if cfg.mode != "single" and not parallel.sharded:
        fingerprint = run_fingerprint(cfg.to_dict(), [request_hash(r) for r in loaded.requests], identity.fingerprint)
        checkpoints = Checkpoints(out / CHECKPOINT_DIR, fingerprint, cfg.train.checkpoint_every, resume=resume)
    start = time.perf_counter()
    result = edit(base, tok, requests, cfg, pool=facts, progress=progress,
                  model_fingerprint=identity.fingerprint, checkpoints=checkpoints)
    result.location = location
    wall = time.perf_counter() - start
    post, state_dict = None, None
    if parallel.sharded:  # every process takes part in a sharded model's forwards and in gathering it
        if evaluate and cfg.mode != "single":
            post = evaluate_requests(result.model, tok, requests, progress=progress and parallel.is_main,
                                     missing=MISSING)
        state_dict = full_state_dict(result.model) if save == "model" else None
    if not parallel.is_main:
        return {}
    extra = {"data": {"source": str(data), "n": n, "offset": offset, "skipped": [vars(s) for s in loaded.skipped]},
             "pool": pool or cfg.augment.pool, "chat_template": chat, "wall_seconds": wall}
    if evaluate and cfg.mode != "single":
        post = post or evaluate_requests(result.model, tok, requests, progress=progress, missing=MISSING)
        extra["evaluation"] = {"pre": pre.summary, "post": post.summary, "compare": compare(pre, post)}
        extra["generations"] = before_after(loaded.requests, said_before,
                                            what_it_says(result.model, tok, loaded.requests, chat))
        print_generations(console, extra["generations"])
        print_eval(console, pre.summary, post.summary, result.seconds["train"])
    elif cfg.mode == "single":
        extra["evaluation"] = {"pre": pre.summary if pre else None, "single_edit": result.single_edit_metrics}
    manifest = build_manifest(result, loaded.requests, identity.to_dict(), extra)
    # the directory may hold this run's checkpoint (checked above): the finished edit replaces it
    save_edit(out, result, tok, manifest, save=save, overwrite=True, history=history, state_dict=state_dict)
    console.print(f"wrote {out} ({save}); {len(loaded.requests)} edits, "
                  f"{result.trainable_parameters:,} trainable parameters, {wall:.0f}s")
    return manifest
