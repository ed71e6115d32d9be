"""Training examples: what the editor actually fine-tunes on (edits plus augmentation)."""

from __future__ import annotations

from dataclasses import dataclass

#: Kinds of training examples. "edit": a requested edit itself; "paraphrase": (z, prompt) -> target_new with a
#: prefix z sampled from the unedited model; "random"/"similar": a pool fact with its TRUE answer (locality).
KINDS = ("edit", "paraphrase", "random", "similar")


@dataclass(frozen=True)
class TrainingExample:
    prompt: str
    target: str
    kind: str = "edit"
    request_index: int = -1  # index of the edit request this example was derived from (-1: none)
    rejected: str | None = None  # dispreferred answer for the optional DPO term (target_true of an edit)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown training example kind {self.kind!r}; expected one of {KINDS}")


@dataclass(frozen=True)
class PoolFact:
    """A known fact (prompt -> its TRUE answer) from a pool, for random/similar-fact augmentation and locality."""

    prompt: str
    target: str
    subject: str
    relation_id: str | None = None
