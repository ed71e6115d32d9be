"""``ftedit edit`` end to end, for every registered method: check the output directory, validate the method's
options against its capabilities, load the edits (and fact pool), check them against the model's ledger,
seed, load the model, evaluate before, resolve the location, apply, evaluate after, and save the model or
adapter with its ledger and manifest (one schema for all methods). Never touches the base files."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ftedit.chat import apply_chat_template
from ftedit.checkpoint import Checkpoints, run_fingerprint
from ftedit.config import DEFAULT_RECIPE, EditConfig
from ftedit.data.loaders import load_pool_facts, load_requests
from ftedit.data.requests import request_hash, warn_subjectless
from ftedit.distributed import DataParallel, full_state_dict, shard_model
from ftedit.errors import UsageError
from ftedit.evaluate import compare, evaluate_requests
from ftedit.evaluate.answers import before_after, what_it_says
from ftedit.ledger import check_conflicts, find_ledger
from ftedit.methods import apply_spec
from ftedit.models import load_model
from ftedit.outputs import CHECKPOINT_DIR, build_manifest, prepare_output_dir, report_interruption, save_edit
from ftedit.preflight import check_edit_options
from ftedit.registry import ApplyContext, MethodSpec, get_method
from ftedit.unreached import check_reached

logger = logging.getLogger(__name__)

MISSING = "count"  # a user's facts may come without paraphrases/neighbors: their rates average what is there


@dataclass
class EditOptions:
    """What ``ftedit edit`` was asked to do (its command-line options)."""

    data: str
    out: Path
    model: str = "demo"
    method: str = DEFAULT_RECIPE
    config_file: str | Path | None = None
    overrides: list[str] = field(default_factory=list)
    pool: str | None = None
    n: int | None = None
    offset: int = 0
    skip_invalid: bool = False
    save: str | None = None  # None: the method's default (model; grace: codebook; ike: none)
    evaluate: bool = True
    overwrite: bool = False
    device: str | None = None
    dtype: str = "auto"
    progress: bool = True
    resume: bool = False
    on_conflict: str = "warn"
    quantize: str | None = None
    seed: int | None = None  # overrides the method's seed field (train.seed, a baseline's seed)
    command: list[str] | None = None  # the command-line arguments of this run, for the hint on how to resume


@dataclass
class EditRun:
    """The outcome of :func:`run_edit`: the manifest written (empty on processes other than rank 0)."""

    manifest: dict[str, Any]
    out: Path
    save: str = "model"
    n_edits: int = 0
    wall_seconds: float = 0.0


def _mode(config) -> str:
    return config.mode if isinstance(config, EditConfig) else "mass"


def _check_capabilities(spec: MethodSpec, config, opts: EditOptions, parallel: DataParallel) -> str:
    """Errors for options ``spec`` does not support; returns the save mode to use."""
    caps, name = spec.capabilities, spec.name
    save = opts.save or caps.saves[0]
    _check_save(name, caps, save)
    unsupported = [flag for flag, asked, ok in (("--resume", opts.resume, caps.resume),
                                                ("--quantize", bool(opts.quantize), caps.quantize),
                                                ("FSDP sharding", parallel.sharded, caps.sharded)) if asked and not ok]
    if unsupported:
        raise UsageError(f"{', '.join(unsupported)}: not supported by {name} (it does not train the weights); "
                         "use a fine-tuning recipe")
    if _mode(config) not in caps.modes:
        raise UsageError(f"mode {_mode(config)!r}: {name} supports {', '.join(caps.modes)}")
    if opts.pool and not caps.pool:
        logger.warning("%s does not use a fact pool; ignoring --pool %s", name, opts.pool)
    if not isinstance(config, EditConfig):
        return save
    return _check_recipe(config, opts, parallel, save)


_CANNOT_SAVE = {
    "codebook": "its edits live in the weights; only GRACE keeps a codebook",
    "adapter": "it trains no LoRA adapters",
}


def _check_save(name: str, caps, save: str) -> None:
    """``--save`` must be one the method can write; say why not, and what it can."""
    if save in caps.saves:
        return
    if caps.in_context:
        why = "it edits nothing: each new fact is a prompt prefix, given only when its own record is scored"
    elif "codebook" in caps.saves:
        why = ("its edits are a key-value codebook consulted beside the weights, which cannot be merged into plain "
               "weights; load a saved codebook onto the base model with ftedit.baselines.grace.load_grace")
    else:
        why = _CANNOT_SAVE.get(save, "")
    raise UsageError(f"--save {save}: not supported by {name} ({why}); use --save {' | '.join(caps.saves)}")


def _check_recipe(cfg: EditConfig, opts: EditOptions, parallel: DataParallel, save: str) -> str:
    if parallel.sharded and (opts.resume or opts.quantize or cfg.params.method != "full"):
        raise UsageError("under FSDP sharding ftedit trains full weights (params.method=full), without --quantize, "
                         "and writes no resumable checkpoints (--resume); use DDP (no FSDP config) for those")
    if save == "adapter" and cfg.params.method != "lora":
        raise UsageError("--save adapter needs LoRA training (--set params.method=lora); full-weight edits "
                         "save the model (--save model)")
    if opts.quantize and (cfg.params.method != "lora" or save == "model"):
        raise UsageError(f"--quantize {opts.quantize}: quantized base weights are frozen; train LoRA adapters "
                         "(--set params.method=lora) and save them with --save adapter")
    if (cfg.augment.n_random or cfg.augment.n_similar) and not (opts.pool or cfg.augment.pool):
        raise UsageError(f"recipe {cfg.recipe} draws random/similar facts from a pool: pass --pool FILE "
                         "(e.g. the COUNTERFACT train split), --pool shipped, or --set augment.n_random=0 "
                         "augment.n_similar=0")
    if cfg.mode == "single" and save != "none":
        logger.warning("single mode measures each edit on a fresh copy of the model: nothing edited to save; "
                       "writing the manifest and per-edit metrics only")
        return "none"
    return save


def _device(opts: EditOptions, parallel: DataParallel) -> str | None:
    if parallel.sharded:  # FSDP: load on CPU, then each process keeps its shard on its device
        return "cpu"
    if parallel.distributed:  # under a launcher: one device per process; rank 0 evaluates the result and saves
        return opts.device or str(parallel.device)
    return opts.device


@dataclass
class _Inputs:
    requests: list
    skipped: list
    facts: list | None
    history: list


def _pool_source(config, opts: EditOptions) -> str | None:
    """``--pool``, else the recipe's own (``augment.pool``, e.g. ``shipped``)."""
    return opts.pool or (config.augment.pool if isinstance(config, EditConfig) else None)


def _load_inputs(spec: MethodSpec, config, opts: EditOptions) -> _Inputs:
    """The edits (and fact pool), checked against the ledger of the model they go into."""
    loaded = load_requests(opts.data, n=opts.n, offset=opts.offset, skip_invalid=opts.skip_invalid)
    for issue in loaded.skipped:
        logger.warning("skipped: %s", issue)
    if isinstance(config, EditConfig):
        warn_subjectless(loaded.requests)
    pool = _pool_source(config, opts)
    facts = load_pool_facts(pool) if pool and spec.capabilities.pool else None
    history = find_ledger(opts.model)
    check_conflicts(history, loaded.requests, opts.on_conflict, source=str(opts.data))
    return _Inputs(loaded.requests, loaded.skipped, facts, history)


def _checkpoints(spec: MethodSpec, config, out: Path, requests, identity, opts: EditOptions,
                 parallel: DataParallel) -> Checkpoints | None:
    if not spec.capabilities.resume or _mode(config) == "single" or parallel.sharded:
        return None
    fingerprint = run_fingerprint(config.to_dict(), [request_hash(r) for r in requests], identity.fingerprint)
    return Checkpoints(out / CHECKPOINT_DIR, fingerprint, config.train.checkpoint_every, resume=opts.resume)


def run_edit(opts: EditOptions) -> EditRun:
    """Edit, evaluate and save as ``opts`` says; see the module docstring."""
    check_edit_options(model=opts.model, n=opts.n, offset=opts.offset, save=opts.save, device=opts.device,
                       dtype=opts.dtype, quantize=opts.quantize)
    parallel = DataParallel()
    spec = get_method(opts.method)
    overrides = list(opts.overrides) + ([spec.seed_override(opts.seed)] if opts.seed is not None else [])
    config = spec.resolve_config(opts.config_file, overrides)
    out = prepare_output_dir(opts.out, overwrite=opts.overwrite, resume=opts.resume, base_model=opts.model)
    save = _check_capabilities(spec, config, opts, parallel)
    inputs = _load_inputs(spec, config, opts)
    with report_interruption(out, opts.command):
        run = _edit_and_save(spec, config, save, inputs, out, opts, parallel)
    parallel.close()
    return run


def _edit_and_save(spec: MethodSpec, config, save: str, inputs: _Inputs, out: Path, opts: EditOptions,
                   parallel: DataParallel) -> EditRun:
    torch.manual_seed(spec.seed_of(config))
    base, tok, identity = load_model(opts.model, device=_device(opts, parallel), dtype=opts.dtype,
                                     quantize=opts.quantize)
    if parallel.sharded:
        shard_model(base, parallel)
    chat_setting = config.objective.chat_template if isinstance(config, EditConfig) else "off"
    requests, facts, chat = apply_chat_template(tok, inputs.requests, inputs.facts, chat_setting)
    single = _mode(config) == "single"
    in_context = spec.capabilities.in_context  # IKE: no generation or reach check outside the scoring harness
    # a sharded model's forwards need every process (each holds a shard): all of them generate, like they score
    speaks = opts.evaluate and not single and not in_context and (parallel.is_main or parallel.sharded)
    said = what_it_says(base, tok, inputs.requests, chat) if speaks else None
    # every process scores the unedited model, so that none waits at the first gradient sum for longer
    # than the process group's timeout while rank 0 evaluates
    pre = evaluate_requests(base, tok, requests, progress=opts.progress and parallel.is_main, missing=MISSING) \
        if opts.evaluate else None
    context = ApplyContext(pool=facts, progress=opts.progress, model_fingerprint=identity.fingerprint,
                           checkpoints=_checkpoints(spec, config, out, inputs.requests, identity, opts, parallel),
                           identity=identity, pool_source=_pool_source(config, opts))
    start = time.perf_counter()
    applied = apply_spec(spec, config, base, tok, requests, context)
    wall = time.perf_counter() - start
    # single mode undid each edit after measuring it: nothing left to check
    unreached = None if single or in_context else check_reached(applied.model, tok, requests, config,
                                                                 warn=parallel.is_main)
    post, said_after, state_dict = None, None, None
    if parallel.sharded:  # every process takes part in a sharded model's forwards and in gathering it
        if opts.evaluate and not single:
            post = evaluate_requests(applied.model, tok, requests, progress=opts.progress and parallel.is_main,
                                     missing=MISSING)
            said_after = what_it_says(applied.model, tok, inputs.requests, chat)
        state_dict = full_state_dict(applied.model) if save == "model" else None
    if not parallel.is_main:
        return EditRun({}, out, save)
    extra = {"data": {"source": str(opts.data), "n": opts.n, "offset": opts.offset,
                      "skipped": [vars(s) for s in inputs.skipped]},
             "pool": _pool_source(config, opts), "chat_template": chat, "wall_seconds": wall,
             "unreached": unreached}
    if opts.evaluate and not single:
        post = post or evaluate_requests(applied.model, tok, requests, progress=opts.progress, missing=MISSING)
        extra["evaluation"] = {"pre": pre.summary, "post": post.summary, "compare": compare(pre, post)}
        if speaks:
            said_after = said_after or what_it_says(applied.model, tok, inputs.requests, chat)
            extra["generations"] = before_after(inputs.requests, said, said_after)
    elif single:
        extra["evaluation"] = {"pre": pre.summary if pre else None, "single_edit": applied.single_edit_metrics}
    manifest = build_manifest(applied, inputs.requests, identity.to_dict(), extra)
    # the directory may hold this run's checkpoint (checked above): the finished edit replaces it
    save_edit(out, applied, tok, manifest, save=save, overwrite=True, history=inputs.history, state_dict=state_dict)
    return EditRun(manifest, out, save, len(inputs.requests), wall)
