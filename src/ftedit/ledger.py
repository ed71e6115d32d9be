"""The edit ledger: an append-only JSONL record of every edit a model carries.

Each line is one edit: its request hash (:func:`ftedit.data.requests.request_hash`), the fact (prompt, subject,
target), how it was written (method, recipe, config hash), when, and the identity of the model it was written
into. ``save_edit`` writes ``ledger.jsonl`` beside the edited model (and inside ``model/`` or ``adapter/``, so
the history travels with the weights). Editing an edited model copies its ledger line for line and appends the
new edits: nothing is ever rewritten.

Before editing, new requests are checked against the ledger and against each other: the same subject and
relation (or, without relation ids, the same prompt) with a different target is a contradiction.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ftedit.atomic import write_bytes_atomic
from ftedit.data.requests import EditRequest, request_hash
from ftedit.errors import InputError

logger = logging.getLogger(__name__)

LEDGER_NAME = "ledger.jsonl"
ON_CONFLICT = ("warn", "error", "ignore")


@dataclass(frozen=True)
class LedgerEntry:
    """One edit in a model's history."""

    hash: str  # request_hash: prompt + target_new
    prompt: str
    subject: str
    target_new: str
    target_true: str | None
    relation_id: str | None
    case_id: str | int | None
    method: str  # how the weights changed: "full" or "lora" (a manifest's touched.weights)
    recipe: str  # the registered method that wrote the edit (recipe or baseline; a manifest's method)
    config_hash: str  # sha256 of the resolved config, so runs with the same settings can be grouped
    time: str  # UTC, ISO 8601
    run: str  # one id per edit run: the edits written together
    parent: dict[str, Any]  # identity of the model the edit was written into
    previous: str = ""  # sha256 of the ledger lines before this run: ties the run to the exact history it extends
    adapter: str = ""  # the LoRA adapter carrying the edit (its name in a stacked PeftModel); "" = in the weights

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, ensure_ascii=False)


@dataclass(frozen=True)
class Conflict:
    """A new edit that contradicts an earlier one (or another new one)."""

    new: EditRequest
    earlier_target: str
    earlier_prompt: str
    earlier_run: str  # "" when the earlier edit is in the same batch

    def __str__(self) -> str:
        where = f"run {self.earlier_run}" if self.earlier_run else "this batch"
        return (f"{self.new.subject!r}: {self.new.prompt!r} -> {self.new.target_new!r} contradicts "
                f"{self.earlier_prompt!r} -> {self.earlier_target!r} ({where})")


class LedgerError(InputError):
    pass


class ContradictionError(InputError):
    pass


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def history_digest(entries: Iterable[LedgerEntry]) -> str:
    return hashlib.sha256("\n".join(e.to_json() for e in entries).encode()).hexdigest()[:16]


def new_entries(requests: Sequence[EditRequest], *, method: str, recipe: str, config: dict[str, Any],
                parent: dict[str, Any], earlier: Sequence[LedgerEntry] = (),
                when: float | None = None, adapter: str = "") -> list[LedgerEntry]:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when if when is not None else time.time()))
    chash = config_hash(config)
    previous = history_digest(earlier) if earlier else ""
    run = hashlib.sha256(f"{stamp}{chash}{len(requests)}{parent}{previous}".encode()).hexdigest()[:12]
    return [LedgerEntry(hash=request_hash(r), prompt=r.prompt, subject=r.subject, target_new=r.target_new,
                        target_true=r.target_true, relation_id=r.relation_id, case_id=r.case_id, method=method,
                        recipe=recipe, config_hash=chash, time=stamp, run=run, parent=parent, previous=previous,
                        adapter=adapter)
            for r in requests]


def read_ledger(path: str | Path) -> list[LedgerEntry]:
    """Entries of a ledger file, or of ``ledger.jsonl`` in a directory (an output dir or a model dir)."""
    path = Path(path)
    if path.is_dir():
        path = path / LEDGER_NAME
    if not path.is_file():
        raise LedgerError(f"no edit ledger at {path}")
    entries = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entries.append(LedgerEntry(**json.loads(line)))
        except (json.JSONDecodeError, TypeError) as e:
            raise LedgerError(f"{path}, line {line_no}: not a ledger entry ({e})") from e
    return entries


def find_ledger(model_spec: str | Path) -> list[LedgerEntry]:
    """The ledger a model carries: ``ledger.jsonl`` in its directory; [] for a model with no edit history."""
    path = Path(str(model_spec)).expanduser()
    if path.is_dir() and (path / LEDGER_NAME).is_file():
        return read_ledger(path)
    return []


def write_ledger(path: str | Path, earlier: Iterable[LedgerEntry], new: Iterable[LedgerEntry]) -> Path:
    """Write the earlier history unchanged followed by the new entries (atomically)."""
    lines = [e.to_json() for e in earlier] + [e.to_json() for e in new]
    return write_bytes_atomic(path, ("\n".join(lines) + "\n").encode("utf-8") if lines else b"")


def _norm(text: str | None) -> str:
    return " ".join((text or "").split()).casefold()


def _fact_keys(subject: str, relation_id: str | None, prompt: str) -> list[tuple[str, ...]]:
    """Keys under which two edits state the same fact: subject + relation, and subject + prompt."""
    keys = [("prompt", _norm(subject), _norm(prompt))]
    if relation_id:
        keys.append(("relation", _norm(subject), _norm(relation_id)))
    return keys


def find_conflicts(earlier: Sequence[LedgerEntry], requests: Sequence[EditRequest]) -> list[Conflict]:
    """New requests that give a different target for a fact already edited (or edited twice in this batch).

    The latest earlier edit of a fact is what the model holds; a request that repeats it is no conflict.
    """
    known: dict[tuple[str, ...], tuple[str, str, str]] = {}
    for e in earlier:
        for key in _fact_keys(e.subject, e.relation_id, e.prompt):
            known[key] = (e.target_new, e.prompt, e.run)
    conflicts = []
    for r in requests:
        keys = _fact_keys(r.subject, r.relation_id, r.prompt)
        for key in keys:
            hit = known.get(key)
            if hit and _norm(hit[0]) != _norm(r.target_new):
                conflicts.append(Conflict(r, earlier_target=hit[0], earlier_prompt=hit[1], earlier_run=hit[2]))
                break
        for key in keys:
            known[key] = (r.target_new, r.prompt, "")
    return conflicts


def check_conflicts(earlier: Sequence[LedgerEntry], requests: Sequence[EditRequest], on_conflict: str = "warn",
                    source: str = "") -> list[Conflict]:
    """Find contradictions and warn about them, raise :class:`ContradictionError`, or ignore them."""
    if on_conflict not in ON_CONFLICT:
        raise InputError(f"--on-conflict {on_conflict!r}: use one of {', '.join(ON_CONFLICT)}")
    conflicts = find_conflicts(earlier, requests) if on_conflict != "ignore" else []
    if conflicts:
        origin = f" in {source}" if source else ""
        lines = "\n  ".join(str(c) for c in conflicts[:20])
        more = f"\n  ... and {len(conflicts) - 20} more" if len(conflicts) > 20 else ""
        message = f"{len(conflicts)} edit(s){origin} contradict the model's edit history:\n  {lines}{more}"
        if on_conflict == "error":
            raise ContradictionError(message + "\n(pass --on-conflict warn to edit anyway)")
        logger.warning(message)
    return conflicts


__all__ = ["Conflict", "ContradictionError", "LedgerEntry", "LedgerError", "check_conflicts", "config_hash",
           "find_conflicts", "find_ledger", "history_digest", "new_entries", "read_ledger", "write_ledger"]
