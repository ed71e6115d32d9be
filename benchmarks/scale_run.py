"""Scale run: thousands of COUNTERFACT edits in one breadth-first edit, then ES/PS/NS over every edit.

Stages, each resumable (rerun the same command after an interruption; finished work is kept):

1. ``edit``: one mass edit with a lean ``locft-bf`` configuration, checkpointed every ``--checkpoint-every``
   optimizer steps (``OUT/edit/checkpoint``), then saved with its manifest and ledger (``OUT/edit``);
2. ``eval``: COUNTERFACT protocol over all edits in chunks (``OUT/eval_chunks.jsonl``, one line per chunk);
3. ``pre``: the unedited model on the first ``--pre-n`` edits, for reference.

``OUT/report.json`` and ``OUT/report.md`` gather the metrics, wall time per stage and peak memory (max RSS of
each process that worked on a stage).

    python benchmarks/scale_run.py --model smollm2 --n 10000 --out runs/scale-smollm2
    python benchmarks/scale_run.py --tiny --n 40 --out /tmp/scale-tiny          # smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from pathlib import Path

from ftedit.atomic import write_bytes_atomic, write_json_atomic
from ftedit.checkpoint import Checkpoints, run_fingerprint
from ftedit.config import resolve_config
from ftedit.data import load_requests
from ftedit.editor import apply_recipe
from ftedit.evaluate import evaluate_requests
from ftedit.evaluate.common import harmonic_mean
from ftedit.models import load_model
from ftedit.outputs import build_manifest, request_hash, save_edit
from ftedit.registry import ApplyContext

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact" / "easyedit"
LEAN = ["params.layers=-3:", "params.modules=down,up", "train.epochs=10", "train.batch_size=64", "train.lr=1e-3",
        "train.group_by_length=true"]
KEYS = ("efficacy", "generalization", "locality", "edit_score")
logger = logging.getLogger("scale_run")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Progress:
    """OUT/progress.json: stage wall times and peak memory, accumulated over resumed processes."""

    def __init__(self, out: Path):
        self.path = out / "progress.json"
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {"stages": {}}

    def add(self, stage: str, seconds: float, **extra) -> None:
        entry = self.data["stages"].setdefault(stage, {"seconds": 0.0, "peak_rss_mb": 0.0, "processes": 0})
        entry["seconds"] += seconds
        entry["peak_rss_mb"] = max(entry["peak_rss_mb"], peak_rss_mb())
        entry["processes"] += 1
        entry.update(extra)
        write_json_atomic(self.path, self.data)


def load_all(paths: list[str], n: int):
    requests = []
    for path in paths:
        loaded = load_requests(path, skip_invalid=True)
        logger.info("%s: %d requests (%d skipped)", path, len(loaded.requests), len(loaded.skipped))
        requests += loaded.requests
    if len(requests) < n:
        raise SystemExit(f"asked for {n} edits, the files hold {len(requests)}")
    return requests[:n]


def stage_edit(args, requests, progress: Progress):
    edit_dir = args.out / "edit"
    if (edit_dir / "manifest.json").is_file():
        logger.info("edit: done earlier (%s); loading the edited model", edit_dir)
        model, tok, _ = _load(args, str(edit_dir / "model"))
        return model, tok
    model, tok, identity = _load(args, args.model)
    cfg = resolve_config("locft-bf", overrides=LEAN + args.overrides)
    fingerprint = run_fingerprint(cfg.to_dict(), [request_hash(r) for r in requests], identity.fingerprint)
    checkpoints = Checkpoints(edit_dir / "checkpoint", fingerprint, args.checkpoint_every, resume=True)
    start = time.perf_counter()
    result = apply_recipe(model, tok, requests, cfg, ApplyContext(progress=True, model_fingerprint=identity.fingerprint,
                                                                  checkpoints=checkpoints))
    seconds = time.perf_counter() - start
    manifest = build_manifest(result, requests, identity.to_dict(), {"wall_seconds_this_process": seconds})
    save_edit(edit_dir, result, tok, manifest, save="model", overwrite=True)
    progress.add("edit", seconds, steps=result.train[0].steps, final_loss=result.train[0].final_loss,
                 trainable_parameters=result.trainable_parameters, targets=[t.name for t in result.touched])
    return result.model, tok


def _load(args, spec: str):
    if args.tiny:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        import tiny
        from ftedit.models import identity_of, prepare_tokenizer

        if spec != args.model:
            return load_model(spec, device="cpu")
        tok = prepare_tokenizer(tiny.metaspace_tokenizer())
        model = tiny.tiny_llama(tok)
        return model, tok, identity_of(model, "tiny")
    return load_model(spec)


def stage_eval(args, model, tok, requests, progress: Progress, name: str, path: Path) -> dict:
    """Evaluate in chunks; each finished chunk is one line of ``path`` (rewritten atomically)."""
    lines = path.read_text().splitlines() if path.is_file() else []
    done = [json.loads(line) for line in lines]
    start = time.perf_counter()
    for first in range(len(done) * args.chunk, len(requests), args.chunk):
        chunk = requests[first:first + args.chunk]
        summary = evaluate_requests(model, tok, chunk, progress=False).summary
        done.append({"first": first, "n": len(chunk), **{k: summary[k] for k in KEYS[:3]}})
        write_bytes_atomic(path, "".join(json.dumps(d) + "\n" for d in done).encode())
        logger.info("%s: %d/%d edits scored (%.0f s)", name, first + len(chunk), len(requests),
                    time.perf_counter() - start)
    progress.add(name, time.perf_counter() - start)
    total = sum(d["n"] for d in done)
    metrics = {k: sum(d[k] * d["n"] for d in done) / total for k in KEYS[:3]}
    metrics["edit_score"] = harmonic_mean([metrics[k] for k in KEYS[:3]])
    return {"n": total, **metrics}


def report(args, post: dict, pre: dict | None, progress: Progress) -> None:
    stages = progress.data["stages"]
    rows = [("edited", post)] + ([(f"unedited (first {pre['n']})", pre)] if pre else [])
    lines = [f"# Scale run: {post['n']} COUNTERFACT edits, {args.model}", "",
             "| model | edits scored | ES | PS | NS | edit score |", "|---|---|---|---|---|---|"]
    lines += [f"| {name} | {m['n']} | {m['efficacy']:.1f} | {m['generalization']:.1f} | {m['locality']:.1f} | "
              f"{m['edit_score']:.1f} |" for name, m in rows]
    lines += ["", "| stage | wall s | peak RSS MB | processes |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['seconds']:.0f} | {v['peak_rss_mb']:.0f} | {v['processes']} |" for k, v in stages.items()]
    lines += ["", f"config: locft-bf with {' '.join(LEAN + args.overrides)}"]
    write_bytes_atomic(args.out / "report.md", ("\n".join(lines) + "\n").encode())
    write_json_atomic(args.out / "report.json", {"post": post, "pre": pre, "stages": stages,
                                                 "overrides": LEAN + args.overrides, "model": args.model})
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", action="append", help="request files, concatenated in order (default: the "
                    "COUNTERFACT edit split, then the train split)")
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override")
    ap.add_argument("--checkpoint-every", type=int, default=100)
    ap.add_argument("--chunk", type=int, default=500, help="edits per evaluation chunk")
    ap.add_argument("--pre-n", type=int, default=1000, help="edits scored on the unedited model (0: skip)")
    ap.add_argument("--tiny", action="store_true", help="tiny random Llama (smoke run)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.data or [str(DATA / "counterfact-edit.json"), str(DATA / "counterfact-train.json")]
    requests = load_all(data, args.n)
    progress = Progress(args.out)
    model, tok = stage_edit(args, requests, progress)
    post = stage_eval(args, model, tok, requests, progress, "eval", args.out / "eval_chunks.jsonl")
    pre = None
    if args.pre_n:
        base, tok, _ = _load(args, args.model)
        pre = stage_eval(args, base, tok, requests[:args.pre_n], progress, "pre", args.out / "pre_chunks.jsonl")
    report(args, post, pre, progress)


if __name__ == "__main__":
    main()
