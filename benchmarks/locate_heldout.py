"""Where to edit, checked on held-out edits: does ``params.layers=auto`` find the sweep's best location?

    python benchmarks/locate_heldout.py --model demo --layers 1,5,9,13,15,17 --out runs/locate-gemma

1. Exhaustive sweep (every layer x module candidate at the full trial budget) on held-out edits H.
2. The search of ``params.layers=auto`` (successive halving) on a sample S of *other* edits (the editor runs
   it on the shipped calibration set).
3. The auto choice's edit score on H (looked up in 1) against H's best by edit score (the 0/1 rates, what
   users are scored on), and the pruned sweep's cost. ``--rank`` sets how the auto search ranks its trials.
Both sweeps write heatmaps and tables under --out; summary.json holds the comparison.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import torch

from ftedit import locate
from ftedit.atomic import write_json_atomic
from ftedit.config import resolve_config
from ftedit.data import load_requests
from ftedit.locate import sweep, write_report
from ftedit.models import load_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact" / "full" / "counterfact_full_union.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--recipe", default="locft-bf")
    ap.add_argument("--layers", default="all", help="candidate layers (locate.layers)")
    ap.add_argument("--modules", default="down,up,attn,block")
    ap.add_argument("--epochs", type=int, default=10, help="full trial budget")
    ap.add_argument("--n-sample", type=int, default=50, help="edits S the auto search sees")
    ap.add_argument("--n-heldout", type=int, default=50, help="held-out edits H")
    ap.add_argument("--heldout-offset", type=int, default=100)
    ap.add_argument("--rank", default="soft", choices=["soft", "discrete"], help="locate.rank of the auto search")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)

    model, tok, identity = load_model(args.model)
    sample = load_requests(args.data, n=args.n_sample).requests
    heldout = load_requests(args.data, n=args.n_heldout, offset=args.heldout_offset).requests
    cfg = resolve_config(args.recipe, overrides={
        "train": {"epochs": args.epochs},  # the recipe's batch size: what params.layers=auto runs
        "locate": {"layers": args.layers, "layer_stride": 1, "modules": args.modules, "n_edits": args.n_sample,
                   "rank": args.rank}})
    title = f"{args.model}, trials: {args.recipe} {args.epochs} epochs"

    full_search = dataclasses.replace(cfg.locate, strategy="exhaustive", n_edits=args.n_heldout)
    exhaustive = sweep(model, tok, heldout, cfg, full_search, model_fingerprint=identity.fingerprint)
    write_report(Path(args.out) / "exhaustive-heldout", exhaustive, identity.to_dict(),
                 f"{title}, {len(heldout)} held-out edits")

    auto = sweep(model, tok, sample, cfg, model_fingerprint=identity.fingerprint)
    write_report(Path(args.out) / "auto-halving-sample", auto, identity.to_dict(),
                 f"{title}, {len(sample)} sample edits")

    on_heldout = {t.candidate: t.metrics for t in exhaustive.trials}
    heldout_best = max(exhaustive.trials, key=lambda t: locate.rank_key(t, "discrete")).candidate
    best = on_heldout[heldout_best]
    picked = on_heldout[auto.best]
    summary = {
        "model": identity.to_dict(), "settings": vars(args),
        "exhaustive_best": {"location": heldout_best.label, **best, "trials": len(exhaustive.trials),
                            "seconds": exhaustive.seconds},
        "auto_choice": {"location": auto.best.label, "heldout": picked, "trials": len(auto.trials),
                        "seconds": auto.seconds},
        "gap_points": best["edit_score"] - picked["edit_score"],
        "ranking_heldout": sorted(({"location": c.label, **m} for c, m in on_heldout.items()),
                                  key=lambda r: -r["edit_score"]),
    }
    write_json_atomic(Path(args.out) / "summary.json", summary)
    print(f"held-out best {heldout_best.label} {best['edit_score']:.1f}; auto picked {auto.best.label} "
          f"{picked['edit_score']:.1f} on held-out (gap {summary['gap_points']:.1f}); "
          f"auto search {auto.seconds:.0f}s/{len(auto.trials)} trials vs exhaustive {exhaustive.seconds:.0f}s/"
          f"{len(exhaustive.trials)} trials")


if __name__ == "__main__":
    main()
