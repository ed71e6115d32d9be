"""Training a hypernetwork editor (MEND, MALMEN) for a model and storing it where editing finds it."""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ftedit.baselines.hypernet_train import (
    ShiftRule,
    TrainedEditor,
    checkpoint_path,
    editor_path,
    save_editor,
    train_editor,
)
from ftedit.cache import model_fingerprint
from ftedit.errors import UsageError

logger = logging.getLogger(__name__)

RULES = {"mend": "ftedit.baselines.mend:mend_shifts", "malmen": "ftedit.baselines.malmen:malmen_shifts"}


def shift_rule(method: str) -> ShiftRule:
    if method not in RULES:
        raise UsageError(f"--method {method!r}: trainable editors are {', '.join(RULES)}")
    module, _, name = RULES[method].partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass
class TrainingRun:
    trained: TrainedEditor
    editor: Path | None  # None: stopped before the last step (resume from the checkpoint)
    checkpoint: Path


def train_and_save(method: str, model: nn.Module, tok, hparams, *, editor: str | Path | None = None,
                   checkpoint: str | Path | None = None, resume: bool = False, stop_after: int | None = None,
                   progress: bool = True) -> TrainingRun:
    """Train ``method``'s editor for ``model`` and save it to ``editor`` (default: the cache entry that
    ``ftedit edit/bench --recipe METHOD`` with the same settings looks up)."""
    rule = shift_rule(method)
    fingerprint = model_fingerprint(model)
    checkpoint = Path(checkpoint) if checkpoint else checkpoint_path(method, fingerprint, hparams)
    trained = train_editor(model, tok, method, rule, hparams, checkpoint=checkpoint, resume=resume,
                           stop_after=stop_after, progress=progress)
    if trained.steps < hparams.train.steps:
        logger.info("stopped after %d of %d steps; continue with --resume (checkpoint %s)", trained.steps,
                    hparams.train.steps, checkpoint)
        return TrainingRun(trained, None, checkpoint)
    path = Path(editor) if editor else editor_path(method, fingerprint, hparams)
    save_editor(path, trained.net, method, fingerprint, hparams, trained.targets, trained.steps)
    logger.info("saved the %s editor to %s", method, path)
    return TrainingRun(trained, path, checkpoint)
