"""ROME, MEMIT and AlphaEdit on the demo model (gemma-3-270m): ES/PS/NS, edit score and wall time.

    flock /tmp/ftedit-cpu.lock env PYTHONPATH=$PWD/src .venv/bin/python benchmarks/baselines_gemma.py \
        --n 20 --out runs/baselines_gemma.json

Methods run with their default hyperparameters, plus ``memit-scaled``: MEMIT with λ scaled to the key
dimension. MEMIT's λ = 15000 was set for GPT-J's 16384-dimensional keys; a key's weight against λ·C grows
with the dimension (kᵀC⁻¹k ≈ d_in for a typical key), so the same λ on gemma-3-270m's 2048-dimensional keys
writes a much smaller share of each residual. ``memit-scaled`` uses λ = 15000 · d_in / 16384.

Every method starts from the unedited weights (``AppliedEdit.restore()``). The key statistics are collected
once per layer (first run) and read from the cache afterwards; their collection time is reported separately.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from ftedit.baselines.common import down_proj, resolve_layers
from ftedit.baselines.stats import StatsConfig, mom2
from ftedit.data import load_requests
from ftedit.evaluate import evaluate_requests
from ftedit.methods import apply_method
from ftedit.models import load_model
from ftedit.outputs import write_json_atomic
from ftedit.params import find_blocks

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact" / "easyedit"
KEYS = ("efficacy", "generalization", "locality", "edit_score")
logger = logging.getLogger("baselines_gemma")


def _statistics(model, tok, fingerprint: str, layers: list[int], cfg: StatsConfig) -> dict:
    """Collect (or load) C for every layer any method uses; report time and C's spectrum."""
    start = time.perf_counter()
    covs = mom2(model, tok, [down_proj(model, i) for i in layers], cfg, fingerprint, progress=True)
    seconds = time.perf_counter() - start
    spectrum = {}
    for layer, cov in covs.items():
        eig = torch.linalg.eigvalsh(cov.double())
        spectrum[layer] = {q: eig.quantile(q).item() for q in (0.0, 0.1, 0.5, 0.9, 1.0)}
        spectrum[layer]["below_2e-2"] = int((eig < 2e-2).sum())
        logger.info("layer %d: eigenvalues of C %s", layer, spectrum[layer])
    return {"seconds": seconds, "spectrum": spectrum}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--data", default=str(DATA / "counterfact-edit.json"))
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--methods", nargs="+", default=["rome", "memit", "memit-scaled=memit", "alphaedit"],
                    help="method names, or LABEL=METHOD to run a method again under another label")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="LABEL:key=value, e.g. alphaedit:nullspace_threshold=1e-3")
    ap.add_argument("--stats-samples", type=int, default=StatsConfig.n_samples)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    model, tok, identity = load_model(args.model)
    requests = load_requests(args.data, n=args.n).requests
    n_layers = len(find_blocks(model)[1])
    stats_cfg = StatsConfig(n_samples=args.stats_samples)
    layers = sorted(set(resolve_layers("frac:0.3", n_layers)) | set(resolve_layers("frac:0.15:0.4", n_layers)))
    report = {"model": identity.to_dict(), "n": len(requests), "stats": {"n_samples": stats_cfg.n_samples,
              "max_length": stats_cfg.max_length, "corpus": stats_cfg.corpus}}
    report["stats"].update(_statistics(model, tok, identity.fingerprint, layers, stats_cfg))

    start = time.perf_counter()
    pre = evaluate_requests(model, tok, requests, progress=False).summary
    rows = [{"method": "unedited", **{k: pre[k] for k in KEYS}, "edit_seconds": 0.0,
             "eval_seconds": time.perf_counter() - start}]
    d_in = down_proj(model, 0).module.weight.numel() // model.config.get_text_config().hidden_size
    scaled = {"memit-scaled": [f"mom2_update_weight={15000 * d_in / 16384:g}"]}
    for spec in args.methods:
        label, _, method = spec.partition("=")
        method = method or label
        overrides = [f"stats.n_samples={args.stats_samples}"] + scaled.get(label, []) + \
            [s.split(":", 1)[1] for s in args.overrides if s.split(":", 1)[0] == label]
        try:
            rows.append(_run(model, tok, requests, label, method, overrides, identity.fingerprint))
        except Exception as e:  # one failing method must not lose the others' results
            logger.exception("%s failed", label)
            rows.append({"method": label, "error": repr(e), "overrides": overrides})
        report["rows"] = rows
        if args.out:
            write_json_atomic(args.out, report)
    print(f"\n{'method':<13} {'ES':>6} {'PS':>6} {'NS':>6} {'score':>6} {'edit s':>7}")
    for r in rows:
        if "error" in r:
            print(f"{r['method']:<13} failed: {r['error']}")
            continue
        print(f"{r['method']:<13} {r['efficacy']:6.1f} {r['generalization']:6.1f} {r['locality']:6.1f} "
              f"{r['edit_score']:6.1f} {r['edit_seconds']:7.0f}")


def _run(model, tok, requests, label: str, method: str, overrides: list[str], fingerprint: str) -> dict:
    applied = apply_method(method, model, tok, requests, overrides=overrides, progress=False,
                           model_fingerprint=fingerprint)
    try:
        start = time.perf_counter()
        post = evaluate_requests(model, tok, requests, progress=False).summary
    finally:
        applied.restore()
    row = {"method": label, **{k: post[k] for k in KEYS}, "edit_seconds": applied.seconds,
           "eval_seconds": time.perf_counter() - start, "layers": [t.layer for t in applied.touched],
           "overrides": overrides, "details": _details(applied.log)}
    logger.info("%s: %s", label, {k: round(row[k], 1) for k in (*KEYS, "edit_seconds")})
    return row


def _details(log: dict) -> dict:
    """The per-method log without tensors (AlphaEdit's state, ROME's deltas)."""
    return {k: v for k, v in log.items() if k not in ("state", "deltas")}


if __name__ == "__main__":
    main()
