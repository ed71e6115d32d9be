"""Small helpers shared by the evaluation protocols."""

from __future__ import annotations

import math
from collections.abc import Sequence

from ftedit.data.requests import EditRequest

#: Policies for a record that lacks paraphrase or neighborhood prompts.
MISSING_POLICIES = ("error", "count")


class EvaluationError(ValueError):
    """A request cannot be scored under the chosen protocol."""


def describe(req: EditRequest, position: int) -> str:
    """Name a record for an error message: case id, source file and index when known."""
    parts = [f"request #{position}"]
    if req.case_id is not None:
        parts.append(f"case_id={req.case_id!r}")
    if req.origin.file:
        parts.append(f"{req.origin.file}[{req.origin.index}]")
    parts.append(f"prompt={req.prompt!r}")
    return " ".join(parts)


def harmonic_mean(values: Sequence[float | None]) -> float | None:
    """Harmonic mean as scipy.stats.hmean gives it for non-negative scores: 0 when any value is 0."""
    if not values or any(v is None for v in values):
        return None
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def percent(value: float | None) -> float | None:
    return None if value is None else 100.0 * value


def check_policy(missing: str) -> None:
    if missing not in MISSING_POLICIES:
        raise ValueError(f"missing={missing!r}; expected one of {MISSING_POLICIES}")


def check_requests(requests: Sequence[EditRequest], missing: str) -> None:
    if not requests:
        raise EvaluationError("no requests to evaluate")
    check_policy(missing)


def check_prompts(req: EditRequest, position: int, missing: str, metric: dict[str, str]) -> None:
    """With ``missing="error"``, raise naming a record without paraphrase or neighborhood prompts."""
    if missing == "count":
        return
    for kind, items in (("paraphrase", req.paraphrase_prompts), ("neighborhood", req.neighborhood)):
        if not items:
            raise EvaluationError(f"{describe(req, position)} has no {kind} prompts; pass missing='count' to "
                                  f"average {metric[kind]} over the records that have them")


def is_finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def summarize(protocol: str, records: Sequence[dict], kinds: Sequence[str], names: dict[str, str],
              fields: dict[str, str]) -> dict:
    """Average each kind's per-record values over the records that have that kind, x100, plus counts and the
    harmonic-mean edit score. ``fields`` maps a summary-key suffix to the per-record value it averages."""
    out: dict = {"protocol": protocol, "n_records": len(records)}
    for kind in kinds:
        present = [r[kind] for r in records if r[kind] is not None]
        name = names[kind]
        for suffix, key in fields.items():
            out[name + suffix] = percent(mean([m[key] for m in present]))
        out[f"n_records_{name}"] = len(present)
        out[f"n_{kind}_prompts"] = sum(len(m["prompts"]) for m in present)
    out["edit_score"] = harmonic_mean([out["efficacy"], out["generalization"], out["locality"]])
    return out
