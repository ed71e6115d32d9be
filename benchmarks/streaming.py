"""Streaming edits with replay vs plain sequential fine-tuning: how well do old edits hold up as batches arrive?

Edits arrive in ``--batches`` batches of ``--batch-size``. After each batch both editors are scored (COUNTERFACT
protocol: ES/PS/NS) on the first batch (the oldest edits), on every edit so far, and on the newest batch.

* ``sequential``: each batch trained breadth-first on its own (``mode=sequential``; a stream with replay 0, which
  tests/test_streaming.py shows gives the same weights);
* ``replay R``: each batch trained with a random sample of R x batch-size earlier edits (``ftedit.streaming``).

Both use the same recipe (default ``locft-bf``: one late down projection) and its epochs, so replay also spends
more optimizer steps per batch (reported).

    python benchmarks/streaming.py                      # gemma-3-270m, 5 batches of 20 COUNTERFACT edits
    python benchmarks/streaming.py --tiny --batches 3 --batch-size 4    # smoke run on a tiny random model
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench_models import bench_model
from ftedit.atomic import write_json_atomic
from ftedit.config import resolve_config
from ftedit.data import load_requests
from ftedit.evaluate import evaluate_requests
from ftedit.streaming import StreamConfig, StreamingEditor

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact" / "easyedit" / "counterfact-edit.json"
KEYS = ("efficacy", "generalization", "locality")


def _scores(model, tok, requests) -> dict[str, float]:
    summary = evaluate_requests(model, tok, requests, progress=False).summary
    return {k: round(summary[k], 2) for k in KEYS}


def run_stream(model, tok, batches, cfg, replay: float, seed: int) -> list[dict]:
    stream = StreamingEditor(model, tok, cfg, StreamConfig(replay_ratio=replay, seed=seed))
    curve, seen = [], []
    for k, batch in enumerate(batches, start=1):
        step = stream.add(batch)
        seen += batch
        curve.append({"batch": k, "replayed": step.replayed_edits, "steps": step.train.steps,
                      "train_s": round(step.seconds, 1), "first_batch": _scores(model, tok, batches[0]),
                      "all_so_far": _scores(model, tok, seen), "newest": _scores(model, tok, batch)})
        print(json.dumps({"replay": replay, **curve[-1]}), flush=True)
    stream.restore()
    return curve


def _table(results: dict[str, list[dict]]) -> str:
    lines = ["| editor | after batch | steps | ES first batch | ES all so far | PS all | NS all | ES newest |",
             "|---|---|---|---|---|---|---|---|"]
    for name, curve in results.items():
        for row in curve:
            lines.append(f"| {name} | {row['batch']} | {row['steps']} | {row['first_batch']['efficacy']:.1f} | "
                         f"{row['all_so_far']['efficacy']:.1f} | {row['all_so_far']['generalization']:.1f} | "
                         f"{row['all_so_far']['locality']:.1f} | {row['newest']['efficacy']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--recipe", default="locft-bf")
    ap.add_argument("--set", dest="overrides", action="append", default=["params.layers=-3"],
                    help="config override, e.g. train.epochs=10 (default location: layer -3, as measured in the README)")
    ap.add_argument("--batches", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--replay", type=float, action="append", help="replay ratios to compare (default: 1.0)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="write the curves as JSON here")
    ap.add_argument("--tiny", action="store_true", help="tiny random Llama and in-process tokenizer")
    args = ap.parse_args()

    model, tok = bench_model(args.model, args.tiny)
    if args.tiny:
        args.overrides.append("params.layers=-1")
    cfg = resolve_config(args.recipe, overrides=args.overrides)
    requests = load_requests(args.data, n=args.batches * args.batch_size, offset=args.offset).requests
    batches = [requests[i:i + args.batch_size] for i in range(0, len(requests), args.batch_size)]
    start = time.perf_counter()
    results = {"unedited (all edits)": [{"batch": 0, "replayed": 0, "steps": 0, "train_s": 0,
                                         "first_batch": _scores(model, tok, batches[0]),
                                         "all_so_far": _scores(model, tok, requests),
                                         "newest": _scores(model, tok, batches[-1])}]}
    for replay in [0.0] + (args.replay or [1.0]):
        name = "sequential" if replay == 0 else f"replay {replay:g}"
        results[name] = run_stream(model, tok, batches, cfg, replay, args.seed)
    print(_table(results))
    print(f"recipe {args.recipe} ({cfg.params.layers} {cfg.params.modules}, {cfg.train.epochs} epochs), "
          f"{len(batches)} batches of {args.batch_size}; wall {time.perf_counter() - start:.0f} s")
    if args.out:
        write_json_atomic(args.out, {"args": {k: str(v) for k, v in vars(args).items()}, "results": results})


if __name__ == "__main__":
    main()
