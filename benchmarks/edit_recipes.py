"""Run several editing recipes on the same model and edits; print ES/PS/NS, edit score and wall time.

    python benchmarks/edit_recipes.py --n 100 --recipes ft ft-m locft-bf locft-df=locft-bf ft-mask-para-rand \
        --recipe-set locft-df:train.pipeline=depth --set augment.n_paraphrases=5 --out runs/recipes.json

Each recipe starts from the same unedited weights (the edit is undone with ``EditResult.restore()``).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from ftedit.config import resolve_config
from ftedit.data import load_pool_facts, load_requests
from ftedit.evaluate import evaluate_requests
from ftedit.evaluate.common import harmonic_mean
from ftedit.methods import apply_spec
from ftedit.models import load_model
from ftedit.outputs import write_json_atomic
from ftedit.registry import ApplyContext, get_method

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact" / "easyedit"
KEYS = ("efficacy", "generalization", "locality", "edit_score")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--data", default=str(DATA / "counterfact-edit.json"))
    ap.add_argument("--pool", default=str(DATA / "counterfact-train.json"))
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--offset", type=int, default=0, help="first record (e.g. 100 for a held-out slice)")
    ap.add_argument("--recipes", nargs="+", default=["ft", "ft-m", "locft-bf", "ft-mask-para-rand"],
                    help="recipe names, or LABEL=RECIPE to run a recipe again under another label")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="override applied to every recipe (augment.* only matters where the recipe augments)")
    ap.add_argument("--recipe-set", action="append", default=[], help="LABEL:key=value, one recipe only")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    model, tok, identity = load_model(args.model)
    requests = load_requests(args.data, n=args.n, offset=args.offset).requests
    pool = load_pool_facts(args.pool)
    pre = evaluate_requests(model, tok, requests, progress=False).summary
    rows = [{"recipe": "unedited", **{k: pre[k] for k in KEYS}, "seconds": 0.0}]
    for spec in args.recipes:
        name, _, recipe = spec.partition("=")  # "label=recipe" runs a recipe under another label
        recipe = recipe or name
        own = [s.split(":", 1)[1] for s in args.recipe_set if s.split(":", 1)[0] == name]
        cfg = resolve_config(recipe, overrides=_applicable(recipe, args.overrides) + own)
        torch.manual_seed(cfg.train.seed)
        start = time.perf_counter()
        context = ApplyContext(pool=pool, progress=False, model_fingerprint=identity.fingerprint)
        result = apply_spec(get_method(recipe), cfg, model, tok, requests, context)  # resolves layers: auto
        seconds = time.perf_counter() - start
        post = _single_mean(result.single_edit_metrics) if cfg.mode == "single" else \
            evaluate_requests(result.model, tok, requests, progress=False).summary
        rows.append({"recipe": name, **{k: post[k] for k in KEYS}, "seconds": seconds,
                     "examples": result.examples_by_kind, "config": cfg.to_dict()})
        print(_line(rows[-1]), flush=True)
        model = result.restore()
    print("\n| recipe | ES | PS | NS | score | wall s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['recipe']} | {r['efficacy']:.1f} | {r['generalization']:.1f} | {r['locality']:.1f} | "
              f"{r['edit_score']:.1f} | {r['seconds']:.0f} |")
    if args.out:
        write_json_atomic(args.out, {"model": identity.to_dict(), "n": args.n, "rows": rows, "argv": vars(args)})


def _applicable(recipe: str, overrides: list[str]) -> list[str]:
    """Shared augment.* overrides apply only to recipes that augment (they would turn augmentation on)."""
    base = resolve_config(recipe)
    augments = base.augment.n_paraphrases or base.augment.n_random or base.augment.n_similar
    return [o for o in overrides if augments or not o.startswith("augment.")]


def _single_mean(metrics: list[dict]) -> dict:
    """Single editing: each edit was measured alone on a fresh model; average those records (ROME's protocol)."""
    out = {k: sum(m[k] for m in metrics) / len(metrics) for k in ("efficacy", "generalization", "locality")}
    out["edit_score"] = harmonic_mean([out[k] for k in ("efficacy", "generalization", "locality")])
    return out


def _line(r: dict) -> str:
    return f"{r['recipe']}: " + " ".join(f"{k}={r[k]:.1f}" for k in KEYS) + f" ({r['seconds']:.0f}s)"


if __name__ == "__main__":
    main()
