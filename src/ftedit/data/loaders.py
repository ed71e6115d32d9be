"""Load edit requests and pool facts from benchmark files (COUNTERFACT, ZsRE), users' own JSONL/CSV, or the Hub.

Schemas (detected from the keys of the first selected record unless ``format=`` forces one):

* ``counterfact``: the full ROME schema (``requested_rewrite`` with ``"{}"`` for the subject, paraphrase,
  neighborhood and generation prompts); neighbors expect ``target_true``.
* ``counterfact-easyedit``: EasyEdit's reduced schema (``prompt``, ``target_new``, ``subject``, ``ground_truth``,
  ``rephrase_prompt``, ``locality_prompt``, ``locality_ground_truth``).
* ``zsre``: MEND's ZsRE schema (``subject``, ``src``, ``answers``, ``rephrase``, ``loc``, ``loc_ans``), mapped as
  MEMIT's ``MENDQADataset`` does.
* ``jsonl`` / ``csv``: users' own facts: ``prompt``, ``target`` (or ``target_new``) and optionally ``subject``,
  ``target_true``, ``paraphrases`` (or ``paraphrase_prompts``), ``neighborhood`` (``[{"prompt", "target"}]``),
  ``generation_prompts``, ``case_id``, ``relation_id``; so ``EditRequest.to_dict()`` rows load back. In CSV a
  ``paraphrases`` cell holds a JSON list or one paraphrase per line.

The file type comes from the extension (``.json`` array, ``.jsonl``/``.ndjson``, ``.csv``), else from the
content; ``format="jsonl"``/``"csv"`` also force the parser. ``"hf:owner/name"`` loads a Hub dataset.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ftedit.data.examples import PoolFact
from ftedit.data.requests import EditRequest, Origin, ProbePrompt
from ftedit.data.text import FileReadError, read_text
from ftedit.data.validation import (
    FieldError,
    RequestFileNotFoundError,
    RequestValidationError,
    ValidationIssue,
    check_case_id,
    check_distinct_targets,
    check_subject_in_prompt,
    check_target,
    check_text,
    find_conflicts,
    find_duplicates,
    optional_text,
    require,
    require_text,
    text_list,
)
from ftedit.errors import InputError

logger = logging.getLogger(__name__)

FORMATS = ("auto", "counterfact", "counterfact-easyedit", "zsre", "jsonl", "csv")
CONFLICT_MODES = ("auto", "error", "warn")
HF_PREFIX = "hf:"


@dataclass
class LoadResult:
    """The valid requests, in file order, and the records dropped with ``skip_invalid=True``."""

    requests: list[EditRequest]
    skipped: list[ValidationIssue] = field(default_factory=list)


@dataclass(frozen=True)
class _Raw:
    index: int  # the record's own index in the file
    data: Any
    line: int | None = None
    error: str | None = None  # why the record could not be parsed


# ---------------------------------------------------------------------------------------------- reading


def _window(offset: int, n: int | None) -> Callable[[int], bool]:
    stop = None if n is None else offset + n
    return lambda i: i >= offset and (stop is None or i < stop)


def _file_error(file: str, message: str, line: int | None = None, hint: str | None = None) -> RequestValidationError:
    return RequestValidationError(ValidationIssue(file, None, None, message, line), hint=hint)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _loads(text: str) -> Any:
    """``json.loads`` that refuses NaN and Infinity (Python's json accepts them; no other JSON reader does)."""
    return json.loads(text, parse_constant=_no_constants)


def _read_json(file: str, text: str, offset: int, n: int | None) -> list[_Raw]:
    try:
        data = _loads(text)
    except json.JSONDecodeError as e:
        hint = "for one object per line use a .jsonl name or format='jsonl'" if e.msg == "Extra data" else None
        raise _file_error(file, f"not valid JSON: {e.msg} (column {e.colno})", e.lineno, hint) from None
    except ValueError as e:
        raise _file_error(file, f"not valid JSON: {e}") from None
    if isinstance(data, dict):
        raise _file_error(file, "top-level JSON must be a list of objects, got dict (one object)",
                          hint="wrap the records in [ ... ], or write one object per line in a .jsonl file")
    if not isinstance(data, list):
        raise _file_error(file, f"top-level JSON must be a list of objects, got {type(data).__name__}")
    keep = _window(offset, n)
    return [_Raw(i, rec) for i, rec in enumerate(data) if keep(i)]


def _read_jsonl(file: str, text: str, offset: int, n: int | None) -> list[_Raw]:
    keep, raws, index = _window(offset, n), [], -1
    for line_no, line in enumerate(io.StringIO(text), start=1):
        if not line.strip():
            continue
        index += 1
        if n is not None and index >= offset + n:
            break
        if keep(index):
            raws.append(_parse_json_line(index, line_no, line))
    return raws


def _parse_json_line(index: int, line_no: int, line: str) -> _Raw:
    try:
        return _Raw(index, _loads(line), line_no)
    except json.JSONDecodeError as e:
        return _Raw(index, None, line_no, f"malformed JSON on line {line_no}: {e.msg} (column {e.colno})")
    except ValueError as e:
        return _Raw(index, None, line_no, f"malformed JSON on line {line_no}: {e}")


def _read_csv(file: str, text: str, offset: int, n: int | None) -> list[_Raw]:
    keep, raws = _window(offset, n), []
    reader = csv.DictReader(io.StringIO(text, newline=""))
    start = 2  # line of the first data row, after the header
    try:
        for index, row in enumerate(reader):
            if n is not None and index >= offset + n:
                break
            if keep(index):
                error = "row has more cells than the header" if None in row else None
                raws.append(_Raw(index, row, start, error))
            start = reader.line_num + 1
    except csv.Error as e:
        raise _file_error(file, f"not valid CSV: {e}", reader.line_num) from None
    return raws


def _reader_for(path: Path, text: str, format: str) -> Callable[[str, str, int, int | None], list[_Raw]]:
    if format in ("jsonl", "csv"):
        return _read_jsonl if format == "jsonl" else _read_csv
    suffix = path.suffix.lower()
    by_suffix = {".json": _read_json, ".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".csv": _read_csv}
    if suffix in by_suffix:
        return by_suffix[suffix]
    return {"[": _read_json, "{": _read_jsonl}.get(text[:4096].lstrip()[:1], _read_csv)


def _read_file(path: Path) -> str:
    if not path.exists():
        raise RequestFileNotFoundError(ValidationIssue(str(path), None, None, "no such file"))
    try:
        text = read_text(path, "edit file")
    except FileReadError as e:
        raise _file_error(str(path), e.reason, hint=e.hint) from None
    if not text.strip():
        raise _file_error(str(path), "the file is empty")
    return text


def _read_hf(name: str, split: str, offset: int, n: int | None) -> list[_Raw]:
    # Imported here: `datasets` is slow to import and only this path needs it.
    from datasets import load_dataset

    try:
        ds = load_dataset(name, split=split)
    except Exception as e:  # the hub's and datasets' own errors: unknown name, split, no network
        reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        raise _file_error(f"{HF_PREFIX}{name}[{split}]", f"could not load the Hub dataset ({reason})",
                          hint="check the name and split, or whether this machine can reach the hub") from e
    stop = len(ds) if n is None else min(len(ds), offset + n)
    start = min(offset, stop)
    return [_Raw(start + i, dict(row)) for i, row in enumerate(ds.select(range(start, stop)))]


def _read(source: str | Path, format: str, n: int | None, offset: int, split: str) -> tuple[str, list[_Raw]]:
    """The file label and the selected raw records."""
    if format not in FORMATS:
        raise InputError(f"unknown format {format!r}; expected one of {FORMATS}")
    if offset < 0 or (n is not None and n < 1):
        raise InputError(f"n must be at least 1 and offset at least 0, got n={n}, offset={offset}")
    if isinstance(source, str) and source.startswith(HF_PREFIX):
        name = source[len(HF_PREFIX):]
        return f"{source}[{split}]", _read_hf(name, split, offset, n)
    path = Path(source)
    text = _read_file(path)
    return str(path), _reader_for(path, text, format)(str(path), text, offset, n)


# ---------------------------------------------------------------------------------------------- schemas


def _record(raw: _Raw) -> Mapping[str, Any]:
    if raw.error is not None:
        raise FieldError(None, raw.error)
    if not isinstance(raw.data, Mapping):
        raise FieldError(None, f"record must be an object, got {type(raw.data).__name__}")
    return raw.data


def _object(record: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = require(record, key)
    if not isinstance(value, Mapping):
        raise FieldError(key, f"must be an object, got {type(value).__name__}")
    return value


def _one_or_many(value: Any, field: str) -> tuple[str, ...]:
    return (check_text(value, field),) if isinstance(value, str) else text_list(value, field)


# COUNTERFACT, full ROME schema


def _rome_target(rw: Mapping[str, Any], key: str, required: bool) -> str | None:
    name = f"requested_rewrite.{key}"
    value = rw.get(key)
    if value is None:
        if required:
            raise FieldError(name, "missing required field")
        return None
    if isinstance(value, Mapping):
        return check_target(require(value, "str", f"{name}.str"), f"{name}.str")
    return check_target(value, name)


def _rome_core(rec: Mapping[str, Any]) -> tuple[Mapping[str, Any], str, str]:
    rw = _object(rec, "requested_rewrite")
    subject = require_text(rw, "subject", "requested_rewrite.subject")
    template = require_text(rw, "prompt", "requested_rewrite.prompt")
    if template.count("{}") != 1:
        found = "has no" if "{}" not in template else "has more than one"
        raise FieldError("requested_rewrite.prompt", f"{template!r} {found} '{{}}' slot for the subject; this schema "
                         "writes the subject as {}, e.g. '{} was born in'")
    prompt = template.replace("{}", subject)
    check_subject_in_prompt(prompt, subject, "requested_rewrite.subject", " (after filling '{}')")
    return rw, prompt, subject


def _rome_request(rec: Mapping[str, Any], origin: Origin) -> EditRequest:
    rw, prompt, subject = _rome_core(rec)
    target_true = _rome_target(rw, "target_true", required=False)
    neighbors = text_list(rec.get("neighborhood_prompts"), "neighborhood_prompts")
    if neighbors and target_true is None:
        raise FieldError("requested_rewrite.target_true", "missing; neighborhood_prompts expect it as answer")
    target_new = _rome_target(rw, "target_new", required=True)
    check_distinct_targets(target_new, target_true, "requested_rewrite.target_new")
    return EditRequest(
        prompt=prompt,
        subject=subject,
        target_new=target_new,
        target_true=target_true,
        paraphrase_prompts=text_list(rec.get("paraphrase_prompts"), "paraphrase_prompts"),
        neighborhood=tuple(ProbePrompt(p, target_true) for p in neighbors),
        generation_prompts=text_list(rec.get("generation_prompts"), "generation_prompts"),
        case_id=check_case_id(rec.get("case_id")),
        relation_id=optional_text(rw, "relation_id", "requested_rewrite.relation_id"),
        origin=origin,
    )


def _rome_pool(rec: Mapping[str, Any]) -> PoolFact:
    rw, prompt, subject = _rome_core(rec)
    target = _rome_target(rw, "target_true", required=True)
    return PoolFact(prompt, target, subject, optional_text(rw, "relation_id", "requested_rewrite.relation_id"))


# COUNTERFACT, EasyEdit's reduced schema


def _easyedit_core(rec: Mapping[str, Any]) -> tuple[str, str]:
    prompt, subject = require_text(rec, "prompt"), require_text(rec, "subject")
    check_subject_in_prompt(prompt, subject)
    return prompt, subject


def _easyedit_request(rec: Mapping[str, Any], origin: Origin) -> EditRequest:
    prompt, subject = _easyedit_core(rec)
    rephrase = rec.get("rephrase_prompt")
    neighbors = ()
    if rec.get("locality_prompt") is not None:
        neighbors = (ProbePrompt(require_text(rec, "locality_prompt"), require_text(rec, "locality_ground_truth")),)
    target_new = check_target(require(rec, "target_new"), "target_new")
    target_true = None if rec.get("ground_truth") is None else check_target(rec["ground_truth"], "ground_truth")
    check_distinct_targets(target_new, target_true, "target_new")
    return EditRequest(
        prompt=prompt,
        subject=subject,
        target_new=target_new,
        target_true=target_true,
        paraphrase_prompts=() if rephrase is None else _one_or_many(rephrase, "rephrase_prompt"),
        neighborhood=neighbors,
        case_id=check_case_id(rec.get("case_id")),
        origin=origin,
    )


def _easyedit_pool(rec: Mapping[str, Any]) -> PoolFact:
    prompt, subject = _easyedit_core(rec)
    return PoolFact(prompt, require_text(rec, "ground_truth"), subject)


# ZsRE, MEND schema


def _zsre_core(rec: Mapping[str, Any]) -> tuple[str, str, str]:
    prompt, subject = require_text(rec, "src"), require_text(rec, "subject")
    check_subject_in_prompt(prompt, subject)
    answers = require(rec, "answers")
    if not isinstance(answers, list) or not answers:
        raise FieldError("answers", f"must be a non-empty list of strings, got {answers!r}")
    return prompt, subject, check_target(answers[0], "answers[0]")


def _zsre_request(rec: Mapping[str, Any], origin: Origin) -> EditRequest:
    prompt, subject, answer = _zsre_core(rec)
    # MEMIT's MENDQADataset scores loc_ans after `loc + "?"` (the NQ questions have no question mark) and uses
    # the record's position as case_id; mirrored so that locality numbers are comparable with its tables.
    neighbor = ProbePrompt(require_text(rec, "loc") + "?", require_text(rec, "loc_ans"))
    return EditRequest(
        prompt=prompt,
        subject=subject,
        target_new=answer,
        paraphrase_prompts=(require_text(rec, "rephrase"),),
        neighborhood=(neighbor,),
        case_id=origin.index,
        origin=origin,
    )


def _zsre_pool(rec: Mapping[str, Any]) -> PoolFact:
    prompt, subject, answer = _zsre_core(rec)
    return PoolFact(prompt, answer, subject)


# Users' own facts (JSONL, CSV, Hub rows)


def _user_optional(rec: Mapping[str, Any], key: str) -> str | None:
    value = rec.get(key)
    # Blank counts as absent: a CSV has every column in every row.
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return check_text(value, key)


def _user_target(rec: Mapping[str, Any]) -> str:
    given = {k: rec[k] for k in ("target", "target_new") if rec.get(k) is not None}
    if not given:
        raise FieldError("target", "missing required field (or 'target_new')")
    if len(given) == 2 and given["target"] != given["target_new"]:
        raise FieldError("target", f"disagrees with 'target_new': {given['target']!r} vs {given['target_new']!r}")
    key = next(iter(given))
    return check_target(given[key], key)


def _user_optional_id(rec: Mapping[str, Any]) -> Any:
    value = rec.get("case_id")
    return None if isinstance(value, str) and not value.strip() else value  # a CSV's blank cell


def _user_subject(rec: Mapping[str, Any], prompt: str) -> str:
    subject = _user_optional(rec, "subject") or ""
    if subject:
        check_subject_in_prompt(prompt, subject)
    return subject


def _user_paraphrases(rec: Mapping[str, Any]) -> tuple[str, ...]:
    key = "paraphrases" if rec.get("paraphrases") is not None else "paraphrase_prompts"
    value = rec.get(key)
    if isinstance(value, str):
        if value.lstrip().startswith("["):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise FieldError(key, f"looks like a JSON list but is not valid JSON: {e.msg}") from None
        else:
            value = [line for line in value.splitlines() if line.strip()]
    return text_list(value, key)


def _user_neighbors(rec: Mapping[str, Any]) -> tuple[ProbePrompt, ...]:
    items = rec.get("neighborhood")
    if items is None or items == "":
        return ()
    if not isinstance(items, list):
        raise FieldError("neighborhood", f"must be a list of {{prompt, target}} objects, got {type(items).__name__}")
    out = []
    for i, item in enumerate(items):
        name = f"neighborhood[{i}]"
        if not isinstance(item, Mapping):
            raise FieldError(name, f"must be an object, got {type(item).__name__}")
        out.append(ProbePrompt(require_text(item, "prompt", f"{name}.prompt"), require_text(item, "target", f"{name}.target")))
    return tuple(out)


def _user_true_target(rec: Mapping[str, Any]) -> str | None:
    value = _user_optional(rec, "target_true")
    return None if value is None else check_target(value, "target_true")


def _user_request(rec: Mapping[str, Any], origin: Origin) -> EditRequest:
    prompt = require_text(rec, "prompt")
    target_new, target_true = _user_target(rec), _user_true_target(rec)
    check_distinct_targets(target_new, target_true, "target" if rec.get("target") is not None else "target_new")
    return EditRequest(
        prompt=prompt,
        subject=_user_subject(rec, prompt),
        target_new=target_new,
        target_true=target_true,
        paraphrase_prompts=_user_paraphrases(rec),
        neighborhood=_user_neighbors(rec),
        generation_prompts=text_list(rec.get("generation_prompts"), "generation_prompts"),
        case_id=check_case_id(_user_optional_id(rec)),
        relation_id=_user_optional(rec, "relation_id"),
        origin=origin,
    )


def _user_pool(rec: Mapping[str, Any]) -> PoolFact:
    prompt = require_text(rec, "prompt")
    # A pool holds TRUE answers: an edit file's target_true, else the row's target.
    target = _user_true_target(rec) or _user_target(rec)
    return PoolFact(prompt, target, _user_subject(rec, prompt), _user_optional(rec, "relation_id"))


@dataclass(frozen=True)
class _Schema:
    request: Callable[[Mapping[str, Any], Origin], EditRequest]
    pool: Callable[[Mapping[str, Any]], PoolFact]
    target_field: str  # named in conflict reports
    benchmark: bool  # curated cases, each an independent edit


_SCHEMAS = {
    "counterfact": _Schema(_rome_request, _rome_pool, "requested_rewrite.target_new", True),
    "counterfact-easyedit": _Schema(_easyedit_request, _easyedit_pool, "target_new", True),
    "zsre": _Schema(_zsre_request, _zsre_pool, "answers", True),
    "user": _Schema(_user_request, _user_pool, "target", False),
}


def detect_format(record: Any) -> str:
    """The schema of one record from its keys: a format name of :data:`FORMATS`, ``"jsonl"`` for user rows."""
    keys = set(record) if isinstance(record, Mapping) else set()
    if "requested_rewrite" in keys:
        return "counterfact"
    if "src" in keys and keys & {"answers", "loc"}:
        return "zsre"
    if "prompt" in keys and keys & {"ground_truth", "rephrase_prompt", "locality_prompt"}:
        return "counterfact-easyedit"
    return "jsonl"


def _schema(format: str, raws: list[_Raw]) -> _Schema:
    if format == "auto":
        first = next((r.data for r in raws if r.error is None and isinstance(r.data, Mapping)), {})
        format = detect_format(first)
    return _SCHEMAS.get(format, _SCHEMAS["user"])


# ---------------------------------------------------------------------------------------------- loading


def _map(file: str, raws: list[_Raw], convert: Callable[[_Raw], Any]) -> Iterator[Any | ValidationIssue]:
    for raw in raws:
        try:
            yield convert(raw)
        except FieldError as e:
            yield ValidationIssue(file, raw.index, e.field, e.message, raw.line)


def _settle(items: list[Any], issues: list[ValidationIssue], skip_invalid: bool) -> list[Any]:
    """Raise on the first issue, or log and drop the invalid records."""
    if issues and not skip_invalid:
        raise RequestValidationError(issues[0], more=len(issues) - 1)
    for issue in issues:
        logger.warning("skipped invalid record: %s", issue)
    return items


def _check_not_empty(file: str, raws: list[_Raw], offset: int, what: str) -> None:
    if not raws:
        where = f" from record {offset} on (--offset {offset})" if offset else ""
        raise _file_error(file, f"the file holds no {what}{where}")


def _duplicate_issues(file: str, valid: list[tuple[_Raw, EditRequest]]) -> list[ValidationIssue]:
    """Exact copies of an earlier record: trained twice, counted twice; each later copy is an invalid record."""
    pairs = find_duplicates([raw.data for raw, _ in valid])
    return [ValidationIssue(file, valid[j][0].index, None, f"exact duplicate of record {valid[i][0].index}: "
                            "the edit would be trained and counted twice", valid[j][0].line) for i, j in pairs]


def _conflict_issues(file: str, requests: list[EditRequest], target_field: str) -> list[ValidationIssue]:
    issues = []
    for i, j in find_conflicts(requests):
        a, b = requests[i], requests[j]
        msg = (f"prompt {b.prompt!r} has target {a.target_new!r} in record {a.origin.index} "
               f"but {b.target_new!r} in record {b.origin.index}")
        issues.append(ValidationIssue(file, b.origin.index, target_field, msg))
    return issues


def _check_conflicts(file: str, requests: list[EditRequest], schema: _Schema, mode: str) -> list[ValidationIssue]:
    """The conflicts to treat as invalid records under ``mode``; tolerated ones are only logged."""
    issues = _conflict_issues(file, requests, schema.target_field)
    if mode == "error" or (mode == "auto" and not schema.benchmark):
        return issues
    if issues:
        logger.warning("%s: kept %d records whose prompt another record gives a different target (first: %s); "
                       "benchmark cases are independent edits, but do not edit them in one batch",
                       file, len(issues), issues[0].message)
    return []


def load_requests(
    source: str | Path,
    *,
    format: str = "auto",
    n: int | None = None,
    offset: int = 0,
    skip_invalid: bool = False,
    split: str = "train",
    conflicts: Literal["auto", "error", "warn"] = "auto",
) -> LoadResult:
    """Load and validate edit requests from a file or ``"hf:owner/name"`` (a Hub dataset's ``split``).

    Records ``offset .. offset+n-1`` are selected before validation, so indices are the file's own. An invalid
    record raises :class:`RequestValidationError` (naming file, record and field) unless ``skip_invalid``,
    which drops it and reports it in ``LoadResult.skipped``. ``conflicts`` governs records whose prompt an
    earlier record gives a different target: ``"error"`` treats the later one as invalid, ``"warn"`` keeps both
    and logs; ``"auto"`` is ``"warn"`` for benchmark schemas (COUNTERFACT has genuine multi-valued relations,
    e.g. twin cities) and ``"error"`` for users' own files.
    """
    if conflicts not in CONFLICT_MODES:
        raise ValueError(f"unknown conflicts mode {conflicts!r}; expected one of {CONFLICT_MODES}")
    file, raws = _read(source, format, n, offset, split)
    _check_not_empty(file, raws, offset, "edit requests")
    schema = _schema(format, raws)
    mapped = list(_map(file, raws, lambda raw: schema.request(_record(raw), Origin(file, raw.index))))
    issues = [m for m in mapped if isinstance(m, ValidationIssue)]
    issues += _duplicate_issues(file, [(raw, m) for raw, m in zip(raws, mapped) if isinstance(m, EditRequest)])
    issues.sort(key=lambda i: i.index)
    _settle([], issues, skip_invalid)
    invalid = {issue.index for issue in issues}
    requests = [m for m in mapped if isinstance(m, EditRequest) and m.origin.index not in invalid]
    conflicting = _check_conflicts(file, requests, schema, conflicts)
    _settle(requests, conflicting, skip_invalid)
    later = {issue.index for issue in conflicting}
    requests = [r for r in requests if r.origin.index not in later]
    skipped = sorted(issues + conflicting, key=lambda i: i.index)
    if not requests:
        raise _file_error(file, f"no valid edit requests: all {len(raws)} selected records are invalid "
                                f"(first: {skipped[0]})", hint="fix the records listed above")
    return LoadResult(requests, skipped)


def load_pool_facts(
    source: str | Path,
    *,
    format: str = "auto",
    n: int | None = None,
    offset: int = 0,
    skip_invalid: bool = False,
    split: str = "train",
) -> list[PoolFact]:
    """Load known facts (prompt, TRUE answer, subject) for augmentation and locality.

    COUNTERFACT gives ``target_true`` / ``ground_truth``, ZsRE ``answers[0]``, user rows ``target_true`` or else
    ``target``. Validation and selection work as in :func:`load_requests`; skipped records are logged.
    ``source="shipped"``: the package's pool of COUNTERFACT train-split facts.
    """
    from ftedit.calibration import resolve_pool

    file, raws = _read(resolve_pool(str(source)), format, n, offset, split)
    _check_not_empty(file, raws, offset, "facts")
    schema = _schema(format, raws)
    mapped = list(_map(file, raws, lambda raw: schema.pool(_record(raw))))
    facts = [m for m in mapped if isinstance(m, PoolFact)]
    return _settle(facts, [m for m in mapped if isinstance(m, ValidationIssue)], skip_invalid)
