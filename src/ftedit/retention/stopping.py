"""The downstream stopping rule: a validation threshold, shared by every edit method, plus a step cap.

Paper 002 trains every post-edit model until the same validation criterion is met, so that each receives the
same amount of fine-tuning "influence" (Sec. 3.1, 4.1). ``max_steps`` guarantees termination; the run records
which of the two stopped it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ftedit.errors import InputError

DIRECTIONS = ("below", "above")


@dataclass
class StoppingRule:
    metric: str  # "val_loss" or "val_accuracy": what the task's validate() returns
    threshold: float | None  # stop once the metric passes it; None: train for max_steps
    direction: str  # "below": loss-like (stop when metric < threshold); "above": accuracy-like (metric > threshold)
    max_steps: int = 30  # hard cap on optimizer steps
    eval_every: int = 5  # validate every this many steps (and at step 0)

    def __post_init__(self):
        if self.direction not in DIRECTIONS:
            raise InputError(f"stopping direction must be one of {DIRECTIONS}, got {self.direction!r}")
        if self.max_steps < 0 or self.eval_every < 1:
            raise InputError(f"need max_steps >= 0 and eval_every >= 1, got {self.max_steps}, {self.eval_every}")

    def reached(self, value: float) -> bool:
        if self.threshold is None:
            return False
        return value < self.threshold if self.direction == "below" else value > self.threshold

    def due(self, step: int) -> bool:
        """Whether to validate after ``step`` optimizer steps."""
        return step % self.eval_every == 0 or step >= self.max_steps

    def decide(self, step: int, value: float | None) -> str | None:
        """``"threshold"`` or ``"max_steps"`` when training stops after ``step`` steps, else None."""
        if value is not None and self.reached(value):
            return "threshold"
        if step >= self.max_steps:
            return "max_steps"
        return None
