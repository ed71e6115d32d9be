"""Why AlphaEdit and MEMIT under-write on gemma-3-270m, and which settings fix it: one set of target values,
many solves.

    python benchmarks/alphaedit_calibration.py --n 20 --out runs/alphaedit_calibration.json

The target values z (the expensive part: an optimization per edit) depend only on the value settings, so they
are computed once; then for each AlphaEdit (null-space threshold, ridge α) and each MEMIT λ the band is
written from the same z, evaluated on the edits (ES/PS/NS) and restored. Per layer it also logs how much of
the edit keys' energy lies in the null space (``|P k|² / |k|²``) next to α: when ``|P k|²`` is not large
against α, the ridge term, not the fit, decides the update and the edits are under-written.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from ftedit.atomic import write_json_atomic
from ftedit.baselines.alphaedit import AlphaEditHyperParams, null_space_projection, projected_update
from ftedit.baselines.common import Snapshot, context_prefixes, least_squares_update, mean_keys
from ftedit.baselines.memit import band_targets, spread_over_layers, target_values
from ftedit.baselines.stats import mom2
from ftedit.data import load_requests
from ftedit.evaluate import evaluate_requests
from ftedit.models import load_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact" / "easyedit" / "counterfact-edit.json"
KEYS = ("efficacy", "generalization", "locality", "edit_score")
logger = logging.getLogger("alphaedit_calibration")


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--thresholds", default="2e-2,2e-3", help="AlphaEdit null-space thresholds")
    ap.add_argument("--l2", default="10,1,0.1", help="AlphaEdit ridge terms α")
    ap.add_argument("--memit-lambda", default="15000,1875,500", help="MEMIT λ values (same z as AlphaEdit)")
    ap.add_argument("--layers", default=None, help="band of edited layers (default: AlphaEdit's)")
    ap.add_argument("--value-steps", type=int, default=None, help="target value optimization steps (default: 20)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    model, tok, identity = load_model(args.model)
    requests = load_requests(args.data, n=args.n).requests
    hp = AlphaEditHyperParams()
    if args.layers:
        hp.layers = args.layers
    if args.value_steps:
        hp.value.steps = args.value_steps
    targets = band_targets(model, hp.layers)
    covs = mom2(model, tok, targets, hp.stats, identity.fingerprint, progress=True)
    prefixes = context_prefixes(model, tok, hp.value)
    start = time.perf_counter()
    # z depends on the model, edits, band top and value settings only: kept beside --out for later sweeps
    zs_path = args.out.with_name(f"{args.out.stem}.z-{identity.fingerprint[:12]}-n{len(requests)}-"
                                 f"l{targets[-1].layer}-s{hp.value.steps}.pt")
    if zs_path.is_file():
        zs = torch.load(zs_path)
    else:
        zs, _ = target_values(model, tok, requests, prefixes, targets[-1].layer, hp.value, progress=True)
        torch.save(zs, zs_path)
    report = {"model": identity.to_dict(), "n": len(requests), "layers": [t.layer for t in targets],
              "value_steps": hp.value.steps,
              "value_seconds": time.perf_counter() - start, "keys": {}, "rows": []}

    pre = evaluate_requests(model, tok, requests, progress=False).summary
    report["rows"].append({"method": "unedited", **{k: pre[k] for k in KEYS}})
    keys0 = {t.layer: mean_keys(model, tok, requests, prefixes, t.layer) for t in targets}

    def run(label: str, solve, **settings) -> None:
        snapshot = Snapshot(model)
        for t in targets:
            snapshot.keep(t)
        try:
            layers = spread_over_layers(model, tok, requests, prefixes, targets, zs, solve)
            post = evaluate_requests(model, tok, requests, progress=False).summary
        finally:
            snapshot.restore()
        row = {"method": label, **settings, **{k: post[k] for k in KEYS},
               "fit_error": [round(x["relative_fit_error"], 3) for x in layers]}
        report["rows"].append(row)
        logger.info("%s %s: %s", label, settings, {k: round(row[k], 1) for k in KEYS})
        write_json_atomic(args.out, report)

    for threshold in _floats(args.thresholds):
        projections = {t.layer: null_space_projection(covs[t.layer], threshold) for t in targets}
        report["keys"][str(threshold)] = {
            t.layer: {"null_dims": round(torch.trace(projections[t.layer]).item()),
                      "key_sq_norm": (keys0[t.layer] ** 2).sum(0).mean().item(),
                      "projected_sq_norm": ((projections[t.layer] @ keys0[t.layer]) ** 2).sum(0).mean().item()}
            for t in targets}
        logger.info("threshold %g: %s", threshold, report["keys"][str(threshold)])
        for l2 in _floats(args.l2):
            def solve(i, target, keys, residuals, l2=l2, projections=projections):
                previous = torch.zeros_like(projections[target.layer])
                return projected_update(keys, residuals, projections[target.layer], previous, l2)
            run("alphaedit", solve, nullspace_threshold=threshold, l2=l2)
    for lam in _floats(args.memit_lambda):
        run("memit", lambda i, target, keys, residuals, lam=lam: least_squares_update(
            keys, residuals, lam * covs[target.layer]), mom2_update_weight=lam)
    print(f"\n{'method':<10} {'setting':<34} {'ES':>6} {'PS':>6} {'NS':>6} {'score':>6}")
    for r in report["rows"]:
        setting = ", ".join(f"{k}={r[k]:g}" for k in ("nullspace_threshold", "l2", "mom2_update_weight") if k in r)
        print(f"{r['method']:<10} {setting:<34} {r['efficacy']:6.1f} {r['generalization']:6.1f} "
              f"{r['locality']:6.1f} {r['edit_score']:6.1f}")


if __name__ == "__main__":
    main()
