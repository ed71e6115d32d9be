"""Length grouping (``train.group_by_length``): training wall time and ES/PS/NS with and without, same edits.

Grouping batches examples of similar length (transformers' mega-batch grouping, batch order shuffled), so less
padding runs through the trainable blocks. It changes which examples share a batch, so the two runs are not
bitwise equal; the metrics show whether that matters.

    python benchmarks/bench_grouping.py --n 200 --epochs 10
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ftedit.config import resolve_config
from ftedit.data import load_requests
from ftedit.editor import edit
from ftedit.evaluate import evaluate_requests
from ftedit.models import load_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact" / "easyedit" / "counterfact-edit.json"
KEYS = ("efficacy", "generalization", "locality", "edit_score")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    model, tok, _ = load_model(args.model)
    requests = load_requests(args.data, n=args.n).requests
    for grouped in (False, True):
        cfg = resolve_config("locft-bf", overrides=[f"train.epochs={args.epochs}", "params.layers=-3",
                                                    f"train.group_by_length={grouped}", *args.overrides])
        result = edit(model, tok, requests, cfg, progress=False)
        seconds = result.seconds["train"]
        summary = evaluate_requests(result.model, tok, requests, progress=False).summary
        result.restore()
        metrics = "  ".join(f"{k} {summary[k]:6.2f}" for k in KEYS)
        print(f"group_by_length={grouped!s:5}  train {seconds:6.1f} s  {metrics}", flush=True)


if __name__ == "__main__":
    main()
