"""The downstream fine-tuning loop: same optimizer, batch size and stopping rule for every edit method.

Small on purpose: it validates on the task's metric every ``eval_every`` steps, calls ``on_checkpoint`` every
``probe_every`` steps and when it stops, and records whether the threshold or the step cap ended the run.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ftedit.errors import InputError
from ftedit.retention.protection import Protection, pair_loss
from ftedit.retention.stopping import StoppingRule
from ftedit.retention.tasks import DownstreamTask

logger = logging.getLogger(__name__)


@dataclass
class DownstreamConfig:
    """Hyperparameters shared by every run of a study (paper 002, App. B uses AdamW, lr 2e-5..5e-5, wd 0.01)."""

    lr: float = 2e-5
    batch_size: int = 8
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0  # 0 disables clipping
    max_steps: int = 30  # the cap of the stopping rule
    eval_every: int = 5  # validation period (steps)
    probe_every: int = 10  # retention checkpoint period (steps)
    seed: int = 0


@dataclass
class RunLog:
    steps: int = 0
    stopped_by: str = ""  # "threshold" or "max_steps"
    validation: list[tuple[int, float]] = field(default_factory=list)  # (step, metric)
    train_loss: list[tuple[int, float]] = field(default_factory=list)  # the task's own loss
    trainable_parameters: int = 0
    epochs: float = 0.0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def _batches(items: list, batch_size: int, seed: int):
    rng = random.Random(seed)
    while True:
        order = list(range(len(items)))
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
            yield [items[j] for j in order[i:i + batch_size]]


def _validate(model: nn.Module, task: DownstreamTask) -> float:
    model.eval()
    try:
        with torch.no_grad():
            return float(task.validate(model))
    finally:
        model.train()


def _step_loss(model: nn.Module, task: DownstreamTask, items: list, protection: Protection | None,
               batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss to minimise, and the task's own loss (for the log)."""
    task_loss = task.loss(model, items)
    loss = task_loss
    if protection is not None and protection.rehearsal is not None:
        n = protection.rehearsal.n_items(batch_size)
        # a mini-batch of batch_size items, n of them rehearsal pairs: each item weighs the same
        loss = (len(items) * task_loss + n * pair_loss(model, task.tok, protection.rehearsal.take(n))) / batch_size
    extra = protection.extra_loss() if protection is not None else None
    return (loss + extra if extra is not None else loss), task_loss


def finetune(model: nn.Module, task: DownstreamTask, rule: StoppingRule, cfg: DownstreamConfig,
             on_checkpoint: Callable[[int], None] | None = None, protection: Protection | None = None) -> RunLog:
    """Train ``model`` (only parameters with ``requires_grad``) plus the task's head until ``rule`` stops it.

    ``protection``: rehearsal items take their share of every mini-batch, and its penalty joins the loss.
    """
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    head = task.fresh_head(model)
    params = [p for p in model.parameters() if p.requires_grad] + (list(head.parameters()) if head else [])
    log = RunLog(trainable_parameters=sum(p.numel() for p in params))
    if not params:
        raise InputError("nothing to train: every parameter is frozen")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    rehearsed = protection.rehearsal.n_items(cfg.batch_size) if protection and protection.rehearsal else 0
    batches = _batches(task.train_items, cfg.batch_size - rehearsed, cfg.seed)
    model.train()
    value = _validate(model, task)
    log.validation.append((0, value))
    step, stop = 0, rule.decide(0, value)
    while stop is None:
        loss, task_loss = _step_loss(model, task, next(batches), protection, cfg.batch_size)
        loss.backward()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        log.train_loss.append((step, float(task_loss.detach())))
        value = None
        if rule.due(step):
            value = _validate(model, task)
            log.validation.append((step, value))
            logger.info("%s step %d: task loss %.3f, %s %.4f", task.config.kind, step, float(task_loss.detach()),
                        rule.metric, value)
        stop = rule.decide(step, value)
        if on_checkpoint is not None and (stop is not None or step % cfg.probe_every == 0):
            on_checkpoint(step)
    model.eval()
    log.steps, log.stopped_by = step, stop
    log.epochs = step * (cfg.batch_size - rehearsed) / max(len(task.train_items), 1)  # task items only
    log.seconds = time.perf_counter() - start
    return log


def downstream_config(**kwargs) -> DownstreamConfig:
    """A DownstreamConfig from keyword options; ``None`` values keep the defaults."""
    return DownstreamConfig(**{k: v for k, v in kwargs.items() if v is not None})
