"""Validation of edit-request records: issues, the exception that reports them, and field checks."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ftedit.data.requests import EditRequest
from ftedit.errors import InputError


@dataclass(frozen=True)
class ValidationIssue:
    """One problem with an input: which file, which record (0-based; None for the whole file) and which field."""

    file: str
    index: int | None
    field: str | None
    message: str
    line: int | None = None  # 1-based line in the file, for line-oriented files (JSONL, CSV)

    def __str__(self) -> str:
        where = [self.file]
        if self.index is not None:
            where.append(f"record {self.index}")
        if self.line is not None:
            where.append(f"line {self.line}")
        if self.field is not None:
            where.append(f"field '{self.field}'")
        return ", ".join(where) + f": {self.message}"


SKIP_HINT = "--skip-invalid (skip_invalid=True) drops invalid records, reports each, and edits the rest"


class RequestValidationError(InputError):
    """An input file or record that cannot become a valid :class:`EditRequest`."""

    def __init__(self, issue: ValidationIssue, more: int = 0, hint: str | None = None):
        note = f" (and {more} more invalid records)" if more else ""
        if hint is None and issue.index is not None:
            hint = SKIP_HINT
        super().__init__(f"{issue}{note}", hint=hint)
        self.issue = issue


class RequestFileNotFoundError(RequestValidationError, FileNotFoundError):
    """The input file does not exist (catchable as either parent)."""


class FieldError(Exception):
    """Raised by record mappers; the loader adds the file and record index."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def require(record: Mapping[str, Any], key: str, field: str | None = None) -> Any:
    """``record[key]``; a missing key or a null value is a missing required field."""
    if record.get(key) is None:
        raise FieldError(field or key, "missing required field")
    return record[key]


def check_text(value: Any, field: str) -> str:
    """A non-empty string (whitespace-only counts as empty)."""
    if not isinstance(value, str):
        raise FieldError(field, f"must be a string, got {_type_name(value)} {value!r}")
    if not value.strip():
        raise FieldError(field, "is empty")
    return value


def check_target(value: Any, field: str) -> str:
    """A target: non-empty text on one line (the model is trained to say it right after the prompt)."""
    text = check_text(value, field)
    if "\n" in text or "\r" in text:
        raise FieldError(field, f"contains a line break ({text!r}); a target is one line of text")
    return text


def check_case_id(value: Any) -> str | int | None:
    """``case_id``: absent, a string or an integer (it names the record in reports and result files)."""
    if value is None or isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise FieldError("case_id", f"must be a string or an integer, got {_type_name(value)} {value!r}")


def check_distinct_targets(target_new: str, target_true: str | None, field: str) -> None:
    """An edit whose new target is the true one changes nothing (and its efficacy can only be 0)."""
    if target_true is not None and target_new.strip() == target_true.strip():
        raise FieldError(field, f"new target {target_new!r} equals the true target: the edit would change nothing")


def require_text(record: Mapping[str, Any], key: str, field: str | None = None) -> str:
    return check_text(require(record, key, field), field or key)


def optional_text(record: Mapping[str, Any], key: str, field: str | None = None) -> str | None:
    value = record.get(key)
    return None if value is None else check_text(value, field or key)


def text_list(value: Any, field: str) -> tuple[str, ...]:
    """A list of non-empty strings (absent: empty)."""
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise FieldError(field, f"must be a list of strings, got {_type_name(value)}")
    return tuple(check_text(v, f"{field}[{i}]") for i, v in enumerate(value))


def check_subject_in_prompt(prompt: str, subject: str, field: str = "subject", note: str = "") -> None:
    # Case-sensitive on purpose: editors locate the subject's tokens in the prompt by exact text.
    if subject not in prompt:
        raise FieldError(field, f"subject {subject!r} does not occur in prompt {prompt!r}{note}")


def find_duplicates(records: Sequence[Any]) -> list[tuple[int, int]]:
    """Pairs ``(i, j)``, ``i < j``, of positions whose records are identical (``j`` paired with the first)."""
    first: dict[str, int] = {}
    pairs = []
    for j, rec in enumerate(records):
        i = first.setdefault(json.dumps(rec, sort_keys=True, default=str), j)
        if i != j:
            pairs.append((i, j))
    return pairs


def find_conflicts(requests: Sequence[EditRequest]) -> list[tuple[int, int]]:
    """Pairs ``(i, j)``, ``i < j``, of positions whose prompts are equal but whose targets differ.

    Each later position is paired with the first position that had the prompt. Editing such pairs together
    asks the model for two answers to one prompt.
    """
    first: dict[str, int] = {}
    pairs = []
    for j, req in enumerate(requests):
        i = first.setdefault(req.prompt.strip(), j)
        if i != j and requests[i].target_new.strip() != req.target_new.strip():
            pairs.append((i, j))
    return pairs
