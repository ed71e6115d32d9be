"""Wall time of ftedit's locft-bf training against a straightforward reference loop, side by side in one run.

The reference does what research scripts do: every step runs the whole model forward (all layers, LM head over
every position) and backward. ftedit runs the frozen blocks below the first trainable one once (activation
cache) and applies the LM head only at target positions. Same model, edits, epochs, batch order, optimizer and
loss (mean target NLL per example, averaged over the batch); the script checks that both end with the same
ES/PS/NS and prints the ratio.

    python benchmarks/bench_train.py --n 100 --epochs 5
    python benchmarks/bench_train.py --tiny          # tiny random model: a quick smoke run
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import torch

from bench_models import bench_model
from ftedit.config import resolve_config
from ftedit.data import load_requests
from ftedit.editor import edit
from ftedit.evaluate import evaluate_requests
from ftedit.params import freeze_all_but, select_targets, trainable_parameters
from ftedit.tokenization import IGNORE_INDEX, encode_pair, pad_right

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact" / "easyedit" / "counterfact-edit.json"
KEYS = ("efficacy", "generalization", "locality", "edit_score")


def reference_train(model, tok, requests, cfg) -> None:
    """Plain loop: full forward + full LM head every step, then the same per-example loss and AdamW."""
    params = trainable_parameters(select_targets(model, cfg.params.layers, cfg.params.modules))
    freeze_all_but(model, params)
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    pairs = [encode_pair(tok, r.prompt, r.target_new) for r in requests]
    rng = random.Random(cfg.train.seed)
    n_batches = math.ceil(len(pairs) / cfg.train.batch_size)
    for _ in range(cfg.train.epochs):
        order = list(range(len(pairs)))
        rng.shuffle(order)
        for b in range(n_batches):
            batch = pad_right([pairs[i] for i in order[b * cfg.train.batch_size:(b + 1) * cfg.train.batch_size]],
                              tok.pad_token_id)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            labels = batch.labels[:, 1:]
            mask = labels != IGNORE_INDEX
            token_logp = logp.gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1) * mask
            loss = (-token_logp.sum(1) / mask.sum(1)).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--tiny", action="store_true", help="tiny random Llama and in-process tokenizer")
    args = ap.parse_args()

    model, tok = bench_model(args.model, args.tiny)
    requests = load_requests(args.data, n=args.n).requests
    cfg = resolve_config("locft-bf", overrides=[f"train.epochs={args.epochs}", "params.layers=" + ("-1" if args.tiny else "-3")])
    original = {k: v.clone() for k, v in model.state_dict().items()}

    start = time.perf_counter()
    reference_train(model, tok, requests, cfg)
    t_ref = time.perf_counter() - start
    ref = evaluate_requests(model, tok, requests, progress=False).summary
    model.load_state_dict(original)

    start = time.perf_counter()
    result = edit(model, tok, requests, cfg, progress=False)
    t_ours = time.perf_counter() - start
    ours = evaluate_requests(result.model, tok, requests, progress=False).summary

    for k in KEYS:
        print(f"{k:15s} reference {ref[k]:7.2f}   ftedit {ours[k]:7.2f}")
    print(f"edits: {len(requests)}, epochs: {args.epochs}, batch: {cfg.train.batch_size}, "
          f"layers {cfg.params.layers} {cfg.params.modules}")
    print(f"reference loop: {t_ref:8.2f} s\nftedit locft-bf: {t_ours:7.2f} s\nspeed-up: {t_ref / t_ours:.1f}x")
    same = all(ref[k] == ours[k] for k in KEYS)
    print("metrics equal" if same else "metrics differ (float rounding can flip a near-tie record)")
    if any(abs(ref[k] - ours[k]) > 1.0 + 1e-9 for k in KEYS):
        raise SystemExit("metrics differ by more than one record in a hundred: the two loops do not train alike")


if __name__ == "__main__":
    main()
