"""Pick a hypernetwork editor's initial edit step size on the training split, and time one training step.

For each candidate ``net.init_lr`` the fresh editor (an RMS-normalized gradient step) edits one batch of
training records (``counterfact-train.json``, never the edit split) and the meta-training loss is measured;
the lowest wins. The seconds per training step (forward, backward, update) give the step count that fits a
time budget. Writes {"init_lr": ..., "seconds_per_step": ..., "steps": ..., "losses": {...}} to --out.

    python benchmarks/train_hypernet.py --method mend --model demo --budget-minutes 12 --out runs/hypernet/mend_calibration.json
"""

from __future__ import annotations

import argparse
import logging
import math
import time

import torch

from ftedit.atomic import write_json_atomic
from ftedit.baselines.editors import shift_rule
from ftedit.baselines.hypernet import Hypernet, edited_targets, target_shape
from ftedit.baselines.hypernet_train import _batch, _optimizer, step_loss
from ftedit.data.loaders import load_requests
from ftedit.models import load_model
from ftedit.registry import get_method

logger = logging.getLogger("train_hypernet")


def _loss_at(model, tok, method, hparams, requests, init_lr: float) -> float:
    hparams.net.init_lr = init_lr
    targets = edited_targets(model, hparams.net)
    net = Hypernet([target_shape(t) for t in targets], hparams.net)
    with torch.no_grad():
        _, info = step_loss(model, tok, targets, net, shift_rule(method), hparams, requests)
    return info["loss"]


def _seconds_per_step(model, tok, method, hparams, requests) -> float:
    targets = edited_targets(model, hparams.net)
    net = Hypernet([target_shape(t) for t in targets], hparams.net)
    opt = _optimizer(net, hparams.train)
    start = time.perf_counter()
    loss, _ = step_loss(model, tok, targets, net, shift_rule(method), hparams, requests)
    loss.backward()
    opt.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="mend")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--lrs", default="1e-6,3e-6,1e-5,3e-5,1e-4,3e-4")
    parser.add_argument("--budget-minutes", type=float, default=12.0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model, tok, _ = load_model(args.model, device="cpu")
    hparams = get_method(args.method).resolve_config(None, args.overrides)
    requests = load_requests(hparams.train.data, n=hparams.train.n_records).requests
    batch = _batch(requests, hparams.train, 0)
    losses = {lr: _loss_at(model, tok, args.method, hparams, batch, float(lr)) for lr in args.lrs.split(",")}
    best = min(losses, key=lambda lr: losses[lr] if math.isfinite(losses[lr]) else math.inf)
    seconds = _seconds_per_step(model, tok, args.method, hparams, _batch(requests, hparams.train, 1))
    steps = max(1, int(args.budget_minutes * 60 / seconds))
    logger.info("losses by init_lr %s; best %s; %.1f s per step", losses, best, seconds)
    write_json_atomic(args.out, {"init_lr": float(best), "seconds_per_step": seconds, "steps": steps, "losses": losses})


if __name__ == "__main__":
    main()
