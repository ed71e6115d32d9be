"""The edit request: one fact to write into a model, plus the prompts that evaluate it."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ProbePrompt:
    """A prompt with the answer the model is expected to give (for neighbors: the answer that must not change)."""

    prompt: str
    target: str


@dataclass(frozen=True)
class Origin:
    """Where a request came from, so errors and reports can point back at the input."""

    file: str = ""
    index: int = -1  # record index in the file (0-based); -1 when built in code


@dataclass(frozen=True)
class EditRequest:
    """Write ``prompt -> target_new`` into the model.

    ``prompt`` is the full prompt text with the subject filled in; the target follows it after one space
    (see :mod:`ftedit.tokenization`). ``target_true`` is the model's original answer when known (COUNTERFACT).
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood: tuple[ProbePrompt, ...] = ()
    generation_prompts: tuple[str, ...] = ()
    case_id: str | int | None = None
    relation_id: str | None = None
    origin: Origin = field(default_factory=Origin, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["neighborhood"] = [asdict(n) for n in self.neighborhood]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EditRequest:
        return cls(
            prompt=d["prompt"],
            subject=d["subject"],
            target_new=d["target_new"],
            target_true=d.get("target_true"),
            paraphrase_prompts=tuple(d.get("paraphrase_prompts", ())),
            neighborhood=tuple(ProbePrompt(**n) for n in d.get("neighborhood", ())),
            generation_prompts=tuple(d.get("generation_prompts", ())),
            case_id=d.get("case_id"),
            relation_id=d.get("relation_id"),
            origin=Origin(**d["origin"]) if d.get("origin") else Origin(),
        )


def request_hash(request: EditRequest) -> str:
    """Stable identity of an edit: prompt and new target (what the model is asked to say)."""
    return hashlib.sha256(f"{request.prompt}\x1f{request.target_new}".encode()).hexdigest()[:16]
