"""Records/second of ``evaluate_requests`` against a plain per-prompt loop, side by side, same metrics.

The reference does what a straightforward implementation of the ROME/MEMIT protocol does: one full forward
(full LM head over every position) per (prompt, target), log_softmax, mean target NLL, then ES/PS/NS and the
magnitudes. The script asserts both give the same metrics and reports the speed ratio.

    python benchmarks/bench_eval.py --n 50              # demo model (gemma-3-270m), counterfact-edit.json
    python benchmarks/bench_eval.py --tiny              # tiny random model: a quick smoke run
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

import torch

from _models import load_bench_model
from ftedit.data.loaders import load_requests
from ftedit.evaluate import evaluate_requests
from ftedit.tokenization import encode_pair

logger = logging.getLogger("bench_eval")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "counterfact" / "easyedit" / "counterfact-edit.json"
METRICS = ("efficacy", "generalization", "locality", "efficacy_magnitude", "generalization_magnitude",
           "locality_magnitude", "edit_score")


@torch.inference_mode()
def reference_nll(model, tok, prompt: str, target: str) -> float:
    pair = encode_pair(tok, prompt, target)
    logits = model(input_ids=torch.tensor([pair.input_ids])).logits[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    total = 0.0
    for i, token in enumerate(pair.target_ids):
        total -= logprobs[pair.target_start - 1 + i, token].item()
    return total / pair.target_len


def reference_metrics(model, tok, requests) -> dict[str, float]:
    """ROME/MEMIT COUNTERFACT metrics, one unbatched forward per (prompt, target)."""
    sums = {k: 0.0 for k in METRICS if k != "edit_score"}
    for req in requests:
        groups = {"efficacy": [req.prompt], "generalization": list(req.paraphrase_prompts),
                  "locality": [nb.prompt for nb in req.neighborhood]}
        for name, prompts in groups.items():
            wins, diffs = [], []
            for prompt in prompts:
                new, true = reference_nll(model, tok, prompt, req.target_new), reference_nll(model, tok, prompt, req.target_true)
                sign = -1.0 if name == "locality" else 1.0
                wins.append((true < new) if name == "locality" else (new < true))
                diffs.append(sign * (math.exp(-new) - math.exp(-true)))
            sums[name] += sum(wins) / len(wins)
            sums[f"{name}_magnitude"] += sum(diffs) / len(diffs)
    out = {k: 100.0 * v / len(requests) for k, v in sums.items()}
    es, ps, ns = out["efficacy"], out["generalization"], out["locality"]
    out["edit_score"] = 0.0 if min(es, ps, ns) == 0 else 3 / (1 / es + 1 / ps + 1 / ns)
    return out


def load(args):
    return load_bench_model(args.model, tiny=args.tiny, dtype="fp32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--tiny", action="store_true", help="tiny random Gemma-3 model (smoke run)")
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 is much faster when other jobs share the cores)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    if args.threads:
        torch.set_num_threads(args.threads)
    logger.info("torch threads: %d", torch.get_num_threads())

    model, tok = load(args)
    requests = load_requests(args.data, n=args.n).requests
    evaluate_requests(model, tok, requests[:2], progress=False)  # warm-up both paths (incl. one-time checks)
    reference_metrics(model, tok, requests[:2])

    t0 = time.perf_counter()
    ref = reference_metrics(model, tok, requests)
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    fast = evaluate_requests(model, tok, requests, batch_size=args.batch_size, progress=False).summary
    t_fast = time.perf_counter() - t0

    for key in METRICS:
        logger.info("%-26s reference %10.5f   batched %10.5f", key, ref[key], fast[key])
        assert abs(ref[key] - fast[key]) < 1e-4, f"{key}: reference {ref[key]} != batched {fast[key]}"
    n = len(requests)
    pairs = 2 * (fast["n_rewrite_prompts"] + fast["n_paraphrase_prompts"] + fast["n_neighborhood_prompts"])
    logger.info("records: %d  ((prompt, target) pairs: %d)", n, pairs)
    logger.info("reference loop:    %7.2f s  %7.2f records/s", t_ref, n / t_ref)
    logger.info("evaluate_requests: %7.2f s  %7.2f records/s", t_fast, n / t_fast)
    logger.info("speed-up: %.1fx  (metrics equal)", t_ref / t_fast)


if __name__ == "__main__":
    main()
