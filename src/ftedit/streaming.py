"""Streaming edits: batches of edits arrive over time; each is trained breadth-first with a replay of earlier ones.

Paper 001's breadth-first training needs every edit at once. A stream cannot wait, and plain sequential
fine-tuning (``mode=sequential``: each batch on its own) lets later batches overwrite earlier edits. Here each
new batch is trained together with a random sample of the edits already written (their training examples,
augmentation included), so the optimizer keeps seeing old facts while it writes new ones.

    stream = StreamingEditor(model, tok, resolve_config("locft-bf"), StreamConfig(replay_ratio=1.0))
    for batch in batches:
        stream.add(batch)
    stream.restore()  # undo everything

With ``replay_ratio=0`` this is exactly sequential mode.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from torch import nn

from ftedit.augment import build_training_set
from ftedit.config import EditConfig
from ftedit.data.examples import PoolFact, TrainingExample
from ftedit.data.requests import EditRequest
from ftedit.editor import Attached, attach_config
from ftedit.train import TrainResult

logger = logging.getLogger(__name__)


@dataclass
class StreamConfig:
    replay_ratio: float = 1.0  # earlier edits replayed per new edit (0: plain sequential fine-tuning)
    replay_max: int = 0  # cap on replayed edits per batch (0: no cap)
    seed: int = 0  # replay sampling

    def validate(self) -> None:
        if self.replay_ratio < 0 or self.replay_max < 0:
            raise ValueError("replay_ratio and replay_max must be non-negative")


@dataclass
class StreamStep:
    """What one ``add()`` did."""

    batch: int
    new_edits: int
    replayed_edits: int
    examples: int
    train: TrainResult
    seconds: float


@dataclass
class StreamingEditor:
    """Edits ``model`` in place, batch after batch, on one set of trainable weights (full or LoRA)."""

    model: nn.Module
    tok: object
    config: EditConfig
    stream: StreamConfig = field(default_factory=StreamConfig)
    pool: Sequence[PoolFact] | None = None
    progress: bool = False
    model_fingerprint: str = ""
    requests: list[EditRequest] = field(default_factory=list, init=False)
    steps: list[StreamStep] = field(default_factory=list, init=False)
    _examples: dict[int, list[TrainingExample]] = field(default_factory=dict, init=False, repr=False)
    _attached: Attached | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.config.validate()
        self.stream.validate()
        if self.config.mode != "mass":
            raise ValueError("a stream trains each batch breadth-first: use mode=mass in the edit config")
        if self.config.params.layers == "auto":
            raise ValueError("params.layers=auto picks layers from a batch of edits; a stream fixes them up front: "
                             "run `ftedit locate` on a sample and set params.layers (and params.modules)")
        self._rng = random.Random(self.stream.seed)
        self._attached, _ = attach_config(self.model, self.config)

    @property
    def edited_model(self) -> nn.Module:
        return self._attached.model

    def replay_count(self, new: int) -> int:
        count = round(self.stream.replay_ratio * new)
        if self.stream.replay_max:
            count = min(count, self.stream.replay_max)
        return min(count, len(self.requests))

    def add(self, requests: Sequence[EditRequest]) -> StreamStep:
        """Write a new batch of edits, replaying a random sample of the earlier ones alongside it."""
        requests = list(requests)
        if not requests:
            raise ValueError("empty batch of edit requests")
        start = time.perf_counter()
        offset = len(self.requests)
        new_examples = self._augment(requests, offset)
        replayed = sorted(self._rng.sample(range(offset), self.replay_count(len(requests))))
        examples = [e for i in replayed for e in self._examples[i]] + new_examples
        run = self._attached.train(self.tok, examples, self.config, self.progress)
        self.requests += requests
        for e in new_examples:
            self._examples.setdefault(e.request_index, []).append(e)
        step = StreamStep(len(self.steps), len(requests), len(replayed), len(examples), run,
                          time.perf_counter() - start)
        self.steps.append(step)
        logger.info("stream batch %d: %d new + %d replayed edits, %d examples, %d steps, %.1fs", step.batch,
                    step.new_edits, step.replayed_edits, step.examples, run.steps, step.seconds)
        return step

    def _augment(self, requests: list[EditRequest], offset: int) -> list[TrainingExample]:
        """Training examples of a batch, drawn from the unedited model (as the editor does), indexed globally."""
        with self._attached.unedited():  # augmentation samples from the unedited weights
            examples = build_training_set(self.model, self.tok, requests, self.config.augment, pool=self.pool,
                                          progress=self.progress, model_fingerprint=self.model_fingerprint)
        return [replace(e, request_index=e.request_index + offset) if e.request_index >= 0 else e
                for e in examples]

    def restore(self) -> nn.Module:
        """Undo every edit of the stream and return the original model."""
        return self._attached.detach()


__all__ = ["StreamConfig", "StreamStep", "StreamingEditor"]
