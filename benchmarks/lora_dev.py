"""Choose LoRA settings on held-out dev edits: the same recipe with full weights and with LoRA variants.

    python benchmarks/lora_dev.py --n 30 --recipe locft-bf --set params.layers=1 --set params.modules=down \
        "full=" "lr2e-3=params.method=lora;lora.lr=2e-3" "mlp=params.method=lora;lora.modules=down,up" \
        --out runs/lora-dev.json

Dev edits: records of ``counterfact_full_union.json`` (2 paraphrases, 10 neighbors each) whose case_id is in
COUNTERFACT's train split (``counterfact-train.json``), first ``--n`` by case_id. They never overlap the edit
split, whose first records are the final test. Every entry starts from the same unedited weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from ftedit.data import load_pool_facts, load_requests
from ftedit.evaluate import evaluate_requests
from ftedit.methods import apply_spec
from ftedit.models import load_model
from ftedit.outputs import write_json_atomic
from ftedit.registry import ApplyContext, get_method
from ftedit.unreached import unreached_edits

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact"
KEYS = ("efficacy", "generalization", "locality", "edit_score")


def dev_requests(n: int, union: Path = DATA / "full" / "counterfact_full_union.json",
                 train: Path = DATA / "easyedit" / "counterfact-train.json") -> list:
    """The first ``n`` full-schema records (by case_id) whose case_id is in the train split."""
    train_ids = {r["case_id"] for r in json.loads(train.read_text())}
    requests = [r for r in load_requests(str(union)).requests if r.case_id in train_ids]
    return sorted(requests, key=lambda r: r.case_id)[:n]


def _entry(spec: str) -> tuple[str, list[str]]:
    label, _, sets = spec.partition("=")
    return label, [s for s in sets.split(";") if s]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("entries", nargs="+", help="LABEL=key=value;key=value (LABEL= for the recipe as it is)")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--recipe", default="locft-bf")
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--pool", default=str(DATA / "easyedit" / "counterfact-train.json"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="override for every entry")
    ap.add_argument("--rows", default=None,
                    help="train on this {prompt, target} file (a user's path: no subject, no probes) and score on "
                         "--scored; default: the dev records themselves")
    ap.add_argument("--scored", default=None, help="the full records of --rows, for scoring (same order)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    model, tok, identity = load_model(args.model)
    if args.rows:
        requests = load_requests(args.rows).requests
        scored = load_requests(args.scored).requests
    else:
        requests = scored = dev_requests(args.n)
    pool = load_pool_facts(args.pool)
    pre = evaluate_requests(model, tok, scored, progress=False).summary
    rows = [{"label": "unedited", **{k: pre[k] for k in KEYS}}]
    print(_line(rows[-1]), flush=True)
    spec = get_method(args.recipe)
    for entry in args.entries:
        label, sets = _entry(entry)
        cfg = spec.resolve_config(overrides=args.overrides + sets)
        torch.manual_seed(cfg.train.seed)
        start = time.perf_counter()
        applied = apply_spec(spec, cfg, model, tok, requests,
                             ApplyContext(pool=pool, progress=False, model_fingerprint=identity.fingerprint,
                                          identity=identity))
        seconds = time.perf_counter() - start
        post = evaluate_requests(applied.model, tok, scored, progress=False).summary
        unreached = unreached_edits(applied.model, tok, requests)
        rows.append({"label": label, **{k: post[k] for k in KEYS}, "seconds": seconds, "unreached": len(unreached),
                     "final_loss": applied.train[-1].final_loss if applied.train else None, "sets": sets,
                     "config": cfg.to_dict()})
        print(_line(rows[-1]), flush=True)
        model = applied.restore()
        if args.out:  # after every entry: an interrupted sweep keeps what it measured
            write_json_atomic(args.out, {"model": identity.to_dict(), "n": args.n, "recipe": args.recipe,
                                         "case_ids": [r.case_id for r in scored], "rows": rows,
                                         "argv": vars(args)})


def _line(row: dict) -> str:
    extra = f" | {row['seconds']:.0f} s | loss {row['final_loss']:.3f} | unreached {row['unreached']}" \
        if "seconds" in row else ""
    return (f"| {row['label']} | {row['efficacy']:.1f} | {row['generalization']:.1f} | {row['locality']:.1f} | "
            f"{row['edit_score']:.1f}{extra}")


if __name__ == "__main__":
    main()
