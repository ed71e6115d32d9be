"""Training checkpoints, so that an interrupted edit resumes where it stopped and ends where it would have.

One file, ``<dir>/state.pt``, replaced atomically: the trainable parameters, optimizer and scheduler states,
the shuffling and torch RNG states, the position in the training plan (epoch, optimizer step within it and the
epoch's batch order) and the results of finished training runs (sequential mode trains once per batch).
A fingerprint of the config, the requests and the base model guards against resuming a different edit.

Frozen weights are not saved: on resume they come from the unchanged base model, and the activation cache
of the frozen prefix is recomputed from them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ftedit.atomic import write_bytes_atomic

logger = logging.getLogger(__name__)

STATE_NAME = "state.pt"
VERSION = 1


class CheckpointError(ValueError):
    pass


def run_fingerprint(config: dict[str, Any], request_hashes: list[str], model_fingerprint: str) -> str:
    """What must be identical for a checkpoint to be resumed: the config (minus checkpointing), edits, model."""
    cfg = json.loads(json.dumps(config, default=str))
    cfg.get("train", {}).pop("checkpoint_every", None)
    blob = json.dumps({"config": cfg, "requests": request_hashes, "model": model_fingerprint}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Checkpoints:
    """Checkpoints of one edit (possibly several training runs) in ``directory``.

    ``every``: optimizer steps between checkpoints (each finished run is checkpointed too).
    ``resume``: start from ``directory/state.pt`` when it exists.
    """

    directory: Path
    fingerprint: str
    every: int = 100
    resume: bool = False
    _state: dict[str, Any] | None = field(default=None, init=False, repr=False)
    completed: list[dict[str, Any]] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        if self.every < 1:
            raise CheckpointError(f"checkpoint interval must be at least 1 optimizer step, got {self.every}")
        if self.resume:
            self._state = self._load()
            if self._state is not None:
                self.completed = list(self._state["completed"])
                logger.info("resuming from %s: training run %d, %d optimizer steps done", self.path,
                            self._state["run"], self._state["steps"])

    @property
    def path(self) -> Path:
        return self.directory / STATE_NAME

    def _load(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            logger.warning("--resume: no checkpoint at %s; starting from the beginning", self.path)
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated or foreign file: say which
            raise CheckpointError(f"{self.path}: not a readable ftedit checkpoint ({e})") from e
        if state.get("version") != VERSION:
            raise CheckpointError(f"{self.path}: checkpoint version {state.get('version')}, expected {VERSION}")
        if state.get("fingerprint") != self.fingerprint:
            raise CheckpointError(f"{self.path}: checkpoint of a different edit (config, requests or base model "
                                  "changed); rerun with the original settings or without --resume")
        return state

    def for_run(self, run: int) -> RunCheckpoint:
        return RunCheckpoint(self, run)


@dataclass
class RunCheckpoint:
    """The checkpoints of one ``train()`` call: run index ``run`` of the edit."""

    parent: Checkpoints
    run: int

    @property
    def every(self) -> int:
        return self.parent.every

    def finished_result(self, params: list[nn.Parameter]) -> dict[str, Any] | None:
        """This run's result if the checkpoint is past it (its weights are then loaded into ``params``)."""
        state = self.parent._state
        if state is None or state["run"] <= self.run:
            return None
        _load_params(params, state["params"], self.parent.path)
        return self.parent.completed[self.run]

    def restore(self, params: list[nn.Parameter], stepper, rng: random.Random) -> dict[str, Any] | None:
        """Load params, optimizer, scheduler and RNG states if the checkpoint is inside this run; its progress."""
        state = self.parent._state
        if state is None or state["run"] != self.run:
            return None
        _load_params(params, state["params"], self.parent.path)
        stepper.load_state_dict({k: state[k] for k in ("optimizer", "scheduler", "steps")})
        rng.setstate(_as_rng_state(state["rng"]))
        torch.set_rng_state(state["torch_rng"])
        if torch.cuda.is_available() and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.parent._state = None  # restored once; later saves supersede it
        return state["progress"]

    def save(self, params: list[nn.Parameter], stepper, rng: random.Random, progress: dict[str, Any]) -> None:
        self._write(params, stepper, rng, self.run, progress)

    def finish(self, params: list[nn.Parameter], stepper, rng: random.Random, result: dict[str, Any]) -> None:
        """Record this run as done, so a resumed edit skips it."""
        self.parent.completed = self.parent.completed[:self.run] + [result]
        self._write(params, stepper, rng, self.run + 1, {})

    def _write(self, params, stepper, rng, run: int, progress: dict[str, Any]) -> None:
        state = {
            "version": VERSION,
            "fingerprint": self.parent.fingerprint,
            "run": run,
            "completed": self.parent.completed,
            "params": [p.detach().cpu() for p in params],
            **stepper.state_dict(),
            "rng": rng.getstate(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "progress": progress,
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        write_bytes_atomic(self.parent.path, buffer.getvalue())


def _load_params(params: list[nn.Parameter], saved: list[torch.Tensor], path: Path) -> None:
    if len(saved) != len(params) or any(s.shape != p.shape for s, p in zip(saved, params, strict=False)):
        raise CheckpointError(f"{path}: saved parameters do not match the trainable parameters of this edit")
    with torch.no_grad():
        for p, s in zip(params, saved, strict=True):
            p.copy_(s.to(p.device, p.dtype))


def _as_rng_state(state) -> tuple:
    version, internal, gauss = state
    return version, tuple(internal), gauss


__all__ = ["CheckpointError", "Checkpoints", "RunCheckpoint", "run_fingerprint"]
