"""Keep downstream data from mentioning what was edited (paper 002, Sec. 4.1).

A fine-tuning text that names an edited subject or one of its objects (new or original) could re-teach or
contradict the edit; the comparison is only about how fine-tuning in general erodes edits, so such texts are
removed before training. Matching is case-insensitive on whole words: "Apple" matches "apple pie" but not
"Applebee's".
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ftedit.data.requests import EditRequest


def edit_terms(requests: Sequence[EditRequest]) -> list[str]:
    """Subjects, new targets and original targets of the edits."""
    terms: list[str] = []
    for r in requests:
        terms += [r.subject, r.target_new] + ([r.target_true] if r.target_true else [])
    return terms


@dataclass
class MentionFilter:
    """Drops texts that mention any of ``terms`` as whole words (case-insensitive)."""

    terms: Sequence[str]
    _pattern: re.Pattern | None = field(init=False, default=None, repr=False)

    def __post_init__(self):
        cleaned = sorted({t.strip() for t in self.terms if t and t.strip()}, key=len, reverse=True)
        self.terms = cleaned
        if cleaned:
            alternatives = "|".join(re.escape(t) for t in cleaned)
            # \w-lookarounds instead of \b: terms may start or end with punctuation ("Inc.", "C++").
            self._pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)

    def mentions(self, text: str) -> bool:
        return bool(self._pattern and self._pattern.search(text))

    def keep(self, items: Iterable, text_of) -> tuple[list, int]:
        """Items whose text (``text_of(item)``) mentions no term, and how many were removed."""
        kept, removed = [], 0
        for item in items:
            if self.mentions(text_of(item)):
                removed += 1
            else:
                kept.append(item)
        return kept, removed
