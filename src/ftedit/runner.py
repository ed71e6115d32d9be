"""``ftedit edit`` end to end: load, evaluate before, edit, evaluate after, save. Never touches the base files."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from ftedit.checkpoint import Checkpoints, run_fingerprint
from ftedit.config import resolve_config
from ftedit.data.loaders import load_pool_facts, load_requests
from ftedit.distributed import DataParallel, full_state_dict, shard_model
from ftedit.editor import edit
from ftedit.errors import UsageError
from ftedit.evaluate import compare, evaluate_requests
from ftedit.ledger import check_conflicts, find_ledger
from ftedit.models import load_model
from ftedit.outputs import (
    CHECKPOINT_DIR,
    build_manifest,
    prepare_output_dir,
    report_interruption,
    request_hash,
    save_edit,
)
from ftedit.preflight import check_edit_options

logger = logging.getLogger(__name__)

HEADLINE = ("efficacy", "generalization", "locality", "edit_score")
def print_eval(console: Console, pre: dict, post: dict, seconds: float) -> None:
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



def run_edit(*, data, out: Path, model, recipe, config_file, overrides, pool, n, offset, skip_invalid, save,
             evaluate, overwrite, device, dtype, progress, console: Console, resume: bool = False,
             on_conflict: str = "warn", quantize: str | None = None) -> dict:
    from ftedit.config import recipe_names
    from ftedit.methods import BASELINES

    if recipe in BASELINES and recipe not in recipe_names():  # rome, memit, alphaedit: no recipe config
        if resume or quantize:
            raise UsageError(f"--resume and --quantize apply to fine-tuning recipes, not to {recipe}")
        from ftedit.baselines.run import run_baseline_edit

        return run_baseline_edit(data=data, out=out, model=model, recipe=recipe, config_file=config_file,
                                 overrides=overrides, pool=pool, n=n, offset=offset, skip_invalid=skip_invalid,
                                 save=save, evaluate=evaluate, overwrite=overwrite, device=device, dtype=dtype,
                                 progress=progress, console=console)
    cfg = resolve_config(recipe, config_file, overrides)
    check_edit_options(model=model, n=n, offset=offset, save=save, device=device, dtype=dtype, quantize=quantize)
    if save == "adapter" and cfg.params.method != "lora":
        raise UsageError("--save adapter needs LoRA training (--set params.method=lora); full-weight edits "
                         "save the model (--save model)")
    if quantize and (cfg.params.method != "lora" or save == "model"):
        raise UsageError(f"--quantize {quantize}: quantized base weights are frozen; train LoRA adapters "
                         "(--set params.method=lora) and save them with --save adapter")
    out = prepare_output_dir(out, overwrite=overwrite, resume=resume, base_model=model)
    parallel = DataParallel()
    if parallel.sharded:  # FSDP: load on CPU, then each process keeps its shard on its device
        device = "cpu"
    elif parallel.distributed:  # under a launcher: one device per process; rank 0 evaluates the result and saves
        device = device or str(parallel.device)
    if parallel.sharded and (resume or quantize or cfg.params.method != "full"):
        raise UsageError("under FSDP sharding ftedit trains full weights (params.method=full), without --quantize, "
                         "and writes no resumable checkpoints (--resume); use DDP (no FSDP config) for those")
    if cfg.mode == "single" and save != "none":
        logger.warning("single mode measures each edit on a fresh copy of the model: nothing edited to save; "
                       "writing the manifest and per-edit metrics only")
        save = "none"
    if (cfg.augment.n_random or cfg.augment.n_similar) and not (pool or cfg.augment.pool):
        raise UsageError(f"recipe {cfg.recipe} draws random/similar facts from a pool: pass --pool FILE "
                         "(e.g. the COUNTERFACT train split) or --set augment.n_random=0 augment.n_similar=0")
    loaded = load_requests(data, n=n, offset=offset, skip_invalid=skip_invalid)
    for issue in loaded.skipped:
        logger.warning("skipped: %s", issue)
    facts = load_pool_facts(pool) if pool else None
    history = find_ledger(model)
    check_conflicts(history, loaded.requests, on_conflict, source=str(data))
    with report_interruption(out, sys.argv[1:]):
        torch.manual_seed(cfg.train.seed)
        base, tok, identity = load_model(model, device=device, dtype=dtype, quantize=quantize)
        if parallel.sharded:
            shard_model(base, parallel)
        # every process scores the unedited model, so that none waits at the first gradient sum for longer
        # than the process group's timeout while rank 0 evaluates
        pre = evaluate_requests(base, tok, loaded.requests, progress=progress and parallel.is_main,
                                    missing="count") if evaluate else None
        checkpoints = None
        if cfg.mode != "single" and not parallel.sharded:
            fingerprint = run_fingerprint(cfg.to_dict(), [request_hash(r) for r in loaded.requests], identity.fingerprint)
            checkpoints = Checkpoints(out / CHECKPOINT_DIR, fingerprint, cfg.train.checkpoint_every, resume=resume)
        start = time.perf_counter()
        result = edit(base, tok, loaded.requests, cfg, pool=facts, progress=progress,
                      model_fingerprint=identity.fingerprint, checkpoints=checkpoints)
        wall = time.perf_counter() - start
        post, state_dict = None, None
        if parallel.sharded:  # every process takes part in a sharded model's forwards and in gathering it
            if evaluate and cfg.mode != "single":
                post = evaluate_requests(result.model, tok, loaded.requests, progress=progress and parallel.is_main,
                                         missing="count")
            state_dict = full_state_dict(result.model) if save == "model" else None
        if not parallel.is_main:
            return {}
        extra = {"data": {"source": str(data), "n": n, "offset": offset, "skipped": [vars(s) for s in loaded.skipped]},
                 "pool": pool, "wall_seconds": wall}
        if evaluate and cfg.mode != "single":
            post = post or evaluate_requests(result.model, tok, loaded.requests, progress=progress, missing="count")
            extra["evaluation"] = {"pre": pre.summary, "post": post.summary, "compare": compare(pre, post)}
            print_eval(console, pre.summary, post.summary, result.seconds["train"])
        elif cfg.mode == "single":
            extra["evaluation"] = {"pre": pre.summary if pre else None, "single_edit": result.single_edit_metrics}
        manifest = build_manifest(result, loaded.requests, identity.to_dict(), extra)
        # the directory may hold this run's checkpoint (checked above): the finished edit replaces it
        save_edit(out, result, tok, manifest, save=save, overwrite=True, history=history, state_dict=state_dict)
        console.print(f"wrote {out} ({save}); {len(loaded.requests)} edits, "
                      f"{result.trainable_parameters:,} trainable parameters, {wall:.0f}s")
        return manifest
