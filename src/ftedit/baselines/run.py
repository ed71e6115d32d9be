"""``ftedit edit --recipe rome|memit|alphaedit``: the runner's steps (load, evaluate, edit, evaluate, save) for
the closed-form baselines, which have hyperparameters of their own instead of a recipe config."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import yaml
from rich.console import Console

from ftedit import __version__
from ftedit.atomic import atomic_directory, write_json_atomic
from ftedit.data.loaders import load_requests
from ftedit.errors import UsageError
from ftedit.evaluate import compare, evaluate_requests
from ftedit.methods import apply_method, check_method_config
from ftedit.models import load_model
from ftedit.outputs import prepare_output_dir, report_interruption, request_hash
from ftedit.preflight import check_edit_options


def run_baseline_edit(*, data, out: Path, model, recipe, config_file, overrides, pool, n, offset, skip_invalid,
                      save, evaluate, overwrite, device, dtype, progress, console: Console) -> dict:
    from ftedit.runner import logger, print_eval

    check_edit_options(model=model, n=n, offset=offset, save=save, device=device, dtype=dtype, quantize=None)
    if save not in ("model", "none"):
        raise UsageError(f"--save {save}: {recipe} edits weights directly; use --save model or none")
    check_method_config(recipe, config_file, overrides)
    out = prepare_output_dir(out, overwrite=overwrite, base_model=model)
    if pool:
        logger.warning("%s does not use a fact pool; ignoring --pool %s", recipe, pool)
    loaded = load_requests(data, n=n, offset=offset, skip_invalid=skip_invalid)
    for issue in loaded.skipped:
        logger.warning("skipped: %s", issue)
    with report_interruption(out, sys.argv[1:]):
        torch.manual_seed(0)
        base, tok, identity = load_model(model, device=device, dtype=dtype)
        pre = evaluate_requests(base, tok, loaded.requests, progress=progress, missing="count") if evaluate else None
        start = time.perf_counter()
        applied = apply_method(recipe, base, tok, loaded.requests, overrides=overrides, config_file=config_file,
                               progress=progress, model_fingerprint=identity.fingerprint)
        wall = time.perf_counter() - start
        manifest = {
            "ftedit_version": __version__, "base_model": identity.to_dict(), "recipe": recipe, "config": applied.config,
            "touched": {"method": recipe, "layers": sorted({t["layer"] for t in applied.touched}),
                        "modules": applied.touched},
            "seconds": {"edit": applied.seconds}, "wall_seconds": wall,
            "edits": [{"hash": request_hash(r), **r.to_dict()} for r in loaded.requests],
            "data": {"source": str(data), "n": n, "offset": offset, "skipped": [vars(s) for s in loaded.skipped]},
        }
        if evaluate:
            post = evaluate_requests(base, tok, loaded.requests, progress=progress, missing="count")
            manifest["evaluation"] = {"pre": pre.summary, "post": post.summary, "compare": compare(pre, post)}
            print_eval(console, pre.summary, post.summary, applied.seconds)
        with atomic_directory(out, overwrite) as tmp:
            if save == "model":
                base.save_pretrained(tmp / "model", safe_serialization=True)
                tok.save_pretrained(tmp / "model")
            (tmp / "config.yaml").write_text(yaml.safe_dump(applied.config, sort_keys=False))
            write_json_atomic(tmp / "manifest.json", manifest)
        console.print(f"wrote {out} ({save}); {len(loaded.requests)} edits with {recipe}, "
                      f"{len(applied.touched)} modules, {wall:.0f}s")
        return manifest
