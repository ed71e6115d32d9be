"""fp32 against bf16 scoring of the same COUNTERFACT records, side by side: every flipped decision, and the time of each.

Four passes over the same records with one model (fp32 weights):

* ``before``: scoring as it was before bf16 scoring: fp32, the old batch routine, kept here verbatim;
* ``fp32``: the exact path (``--dtype fp32``), which must match ``before`` bit for bit;
* ``bf16``: plain bf16 autocast, near-tie re-scoring off;
* ``bf16+rescore``: bf16 autocast with the near-ties re-scored in fp32 (ftedit's default on CPUs with bf16 units).

The passes take turns on chunks of records (``--chunk``), so that other jobs' load falls on all of them
alike; wall and CPU seconds are both reported. A flip is a prompt whose success (ES/PS/NS) differs from the fp32 pass, or a record kind whose accuracy
(``*_acc``) differs. The script also reports how far bf16 moved each compared NLL margin (``nll_new - nll_true``),
the quantity :data:`ftedit.evaluate.scoring.NEAR_TIE` must cover, and the work that sharing saves: (prompt,
target) requests, distinct pairs, sequences run, head rows, and padded tokens with batches sorted by length
against batches in input order.

    python benchmarks/bf16_agreement.py --n 1000                 # demo model, counterfact-edit.json records 0..999
    python benchmarks/bf16_agreement.py --data .../counterfact-train.json --n 300   # choose NEAR_TIE here
    python benchmarks/bf16_agreement.py --tiny --n 20            # tiny random model: a quick smoke run
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import torch

from _models import load_bench_model
from ftedit.atomic import write_json_atomic
from ftedit.data.loaders import load_requests
from ftedit.evaluate import evaluate_requests, scoring
from ftedit.evaluate.counterfact import KINDS, _plan, summarize_records
from ftedit.precision import ENV_OVERRIDE, set_requested
from ftedit.tokenization import EncodedPair, encode_pair, pad_right

logger = logging.getLogger("bf16_agreement")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "counterfact" / "easyedit" / "counterfact-edit.json"
METRICS = ("efficacy", "generalization", "locality", "efficacy_acc", "generalization_acc", "locality_acc",
           "efficacy_magnitude", "locality_magnitude", "edit_score")
PASSES = ("before", "fp32", "bf16", "bf16+rescore")


def load(args):
    return load_bench_model(args.model, tiny=args.tiny, dtype="fp32")


def _run_batch_before(model, parts, batch, pad_token_id, out, starts, margins):
    """The batch routine before bf16 scoring: one head row and softmax per query, fp32."""
    padded = pad_right([EncodedPair(c.ids, len(c.ids)) for c in batch], pad_token_id)
    queries = [(row, *q) for row, c in enumerate(batch) for q in c.queries]
    rows, cols = torch.tensor([q[0] for q in queries]), torch.tensor([q[1] for q in queries])
    targets = torch.tensor([q[2] for q in queries])
    where = torch.tensor([starts[q[3]] + q[4] for q in queries])
    logprobs, argmax = [], []
    for start, logits in zip(range(0, len(queries), scoring.HEAD_CHUNK), scoring._position_logits(
            model, parts, padded.input_ids, padded.attention_mask, rows, cols)):
        chunk_targets = targets[start:start + len(logits)]
        logprobs.append(torch.log_softmax(logits, dim=-1).gather(1, chunk_targets[:, None]).squeeze(1))
        argmax.append(logits.argmax(dim=-1))
    out.lp[where] = torch.cat(logprobs).double()
    out.am[where] = torch.cat(argmax)


CURRENT_RUN_BATCH = scoring._run_batch


def configure(model, name: str, threshold: float) -> None:
    """Put the model and the scorer into one of PASSES (bf16 is forced on, whatever the CPU flags say)."""
    os.environ[ENV_OVERRIDE] = "1"
    set_requested(model, "fp32" if name in ("before", "fp32") else "auto")
    scoring.NEAR_TIE = threshold if name == "bf16+rescore" else 0.0
    scoring._run_batch = _run_batch_before if name == "before" else CURRENT_RUN_BATCH


def _padded_tokens(lengths: list[int], batches: list[list[int]]) -> int:
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


def work(tok, requests, batch_size: int) -> dict:
    """What the shared work saves on these records (counts only; no model needed)."""
    pairs = [encode_pair(tok, p, t) for p, t in _plan(requests).pairs]
    distinct = list(dict.fromkeys(pairs))
    carriers = scoring._carriers(distinct)
    lengths = [len(c.ids) for c in carriers]
    in_order = [list(range(i, min(i + batch_size, len(lengths)))) for i in range(0, len(lengths), batch_size)]
    return {"requests": len(pairs), "distinct_pairs": len(distinct), "sequences": len(carriers),
            "head_rows_fp32": sum(len(c.queries) for c in carriers),
            "head_rows_bf16": sum(len({q[0] for q in c.queries}) for c in carriers),
            "padded_tokens_sorted": _padded_tokens(lengths, scoring._length_batches(lengths, batch_size)),
            "padded_tokens_input_order": _padded_tokens(lengths, in_order), "real_tokens": sum(lengths)}


def run_chunk(model, tok, chunk, name: str, args, total: dict) -> None:
    """Score ``chunk`` in pass ``name``; add its wall and CPU seconds, records and re-scored pairs to ``total``."""
    configure(model, name, args.threshold)
    wall, cpu = time.perf_counter(), time.process_time()
    result = evaluate_requests(model, tok, chunk, batch_size=args.batch_size, details=True, progress=False)
    total["seconds"] += time.perf_counter() - wall
    total["cpu_seconds"] += time.process_time() - cpu
    total["records"] += result.records
    total["rescored"] += result.config["pairs_rescored_fp32"]


def run_passes(model, tok, requests, args) -> dict:
    """Every pass on each chunk of records in turn, so that load from other jobs falls on all passes alike."""
    totals = {name: {"seconds": 0.0, "cpu_seconds": 0.0, "records": [], "rescored": 0} for name in PASSES}
    for name in PASSES:  # warm-up (one-time checks, allocations)
        configure(model, name, args.threshold)
        evaluate_requests(model, tok, requests[:2], progress=False)
    for start in range(0, len(requests), args.chunk):
        for name in PASSES:
            run_chunk(model, tok, requests[start:start + args.chunk], name, args, totals[name])
    for name, total in totals.items():
        total["summary"] = summarize_records(total["records"])
        logger.info("%-13s %7.1f s wall, %7.1f s CPU, pairs re-scored in fp32: %d", name, total["seconds"],
                    total["cpu_seconds"], total["rescored"])
    return totals


def flips(exact: list[dict], other: list[dict]) -> list[dict]:
    """Every prompt whose success differs, and every record kind whose accuracy differs."""
    out = []
    for a, b in zip(exact, other, strict=True):
        for kind in KINDS:
            if a[kind] is None:
                continue
            for pa, pb in zip(a[kind]["prompts"], b[kind]["prompts"], strict=True):
                if pa["success"] != pb["success"]:
                    out.append({"case_id": a["case_id"], "kind": kind, "prompt": pa["prompt"],
                                "margin_fp32": pa["nll_new"] - pa["nll_true"],
                                "margin_other": pb["nll_new"] - pb["nll_true"]})
            if a[kind]["acc"] != b[kind]["acc"]:
                out.append({"case_id": a["case_id"], "kind": kind + "_acc", "fp32": a[kind]["acc"],
                            "other": b[kind]["acc"]})
    return out


def margin_shifts(exact: list[dict], other: list[dict]) -> dict:
    """How far bf16 moved ``nll_new - nll_true`` over all compared prompts."""
    shifts = torch.tensor([abs((pa["nll_new"] - pa["nll_true"]) - (pb["nll_new"] - pb["nll_true"]))
                           for a, b in zip(exact, other) for kind in KINDS if a[kind] is not None
                           for pa, pb in zip(a[kind]["prompts"], b[kind]["prompts"])], dtype=torch.float64)
    q = torch.quantile(shifts, torch.tensor([0.5, 0.99, 0.999], dtype=torch.float64)).tolist()
    return {"n": len(shifts), "median": q[0], "p99": q[1], "p999": q[2], "max": shifts.max().item()}


def report(results: dict, shifts: dict, all_flips: dict) -> None:
    logger.info("%-24s %12s %12s %12s %14s", "metric", *PASSES)
    for key in METRICS:
        logger.info("%-24s %12.4f %12.4f %12.4f %14.4f", key, *(results[p]["summary"][key] for p in PASSES))
    logger.info("|shift of nll_new - nll_true| under bf16 over %d prompts: median %.4f, p99 %.4f, p99.9 %.4f, "
                "max %.4f", shifts["n"], shifts["median"], shifts["p99"], shifts["p999"], shifts["max"])
    for name in PASSES:
        r, before = results[name], results["before"]
        logger.info("%s: %d flips against fp32; %.1f s wall (%.2fx faster than before), %.1f s CPU (%.2fx)", name,
                    len(all_flips[name]), r["seconds"], before["seconds"] / r["seconds"], r["cpu_seconds"],
                    before["cpu_seconds"] / r["cpu_seconds"])
        for f in all_flips[name]:
            logger.info("  flip %s", f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--tiny", action="store_true", help="tiny random Gemma-3 model (smoke run)")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=100, help="records scored by every pass in turn")
    parser.add_argument("--threshold", type=float, default=scoring.NEAR_TIE, help="near-tie margin (NEAR_TIE)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures and flips as JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    logger.info("torch %s, threads %d, NEAR_TIE %.3g", torch.__version__, torch.get_num_threads(), args.threshold)
    model, tok = load(args)
    requests = load_requests(args.data, n=args.n, offset=args.offset).requests
    logger.info("%d records of %s from %d", len(requests), args.data, args.offset)
    results = run_passes(model, tok, requests, args)
    exact = results["fp32"]["records"]
    all_flips = {name: flips(exact, results[name]["records"]) for name in PASSES}
    shifts = margin_shifts(exact, results["bf16"]["records"])
    shared = work(tok, requests, args.batch_size)
    logger.info("work: %s", shared)
    report(results, shifts, all_flips)
    same = results["before"]["summary"] == results["fp32"]["summary"]
    logger.info("fp32 summary bit-identical to before: %s", same)
    if args.out:
        write_json_atomic(args.out, {
            "data": args.data, "n": len(requests), "offset": args.offset, "threshold": args.threshold,
            "threads": torch.get_num_threads(), "margin_shift": shifts, "flips": all_flips, "work": shared,
            "passes": {k: {"seconds": v["seconds"], "cpu_seconds": v["cpu_seconds"], "rescored": v["rescored"],
                           "summary": v["summary"]}
                       for k, v in results.items()}})


if __name__ == "__main__":
    main()
