"""COUNTERFACT under the ROME/MEMIT protocol (``experiments/py/eval_utils_counterfact.py`` + ``summarize.py``).

For a prompt ``p`` and a target ``t``, ``NLL(p, t)`` is the mean over the target's tokens of ``-log P`` (one
teacher-forced pass over ``p + " " + t``; MEMIT stores exactly this as ``*_prompts_probs``).

* Efficacy (ES): fraction of rewrite prompts with ``NLL(new) < NLL(true)``; generalization (PS): the same over
  paraphrase prompts; locality / specificity (NS): fraction of neighborhood prompts with ``NLL(true) < NLL(new)``.
  Strict inequalities, as in ``summarize.py``. Each is averaged within a record first, then over records, x100.
* Magnitudes (EM, PM, NM), as ``summarize.py``'s ``*_diff``: the mean of ``exp(-NLL(new)) - exp(-NLL(true))``
  (``exp(-NLL(true)) - exp(-NLL(new))`` for neighbors). ``exp(-NLL)`` is the geometric mean of the per-token
  probabilities, i.e. MEMIT's "mean token probability". Averaged per record, then over records, x100.
* Accuracies (``*_acc``, MEMIT's ``*_prompts_correct``): every token of target_new (rewrite, paraphrase) or of
  target_true (neighborhood) is the teacher-forced argmax; per record, then over records, x100.
* Edit score: harmonic mean of ES, PS, NS (``summarize.py``'s ``*_score``).

Neighborhood prompts are scored against the request's ``target_true`` and ``target_new``, as MEMIT does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ftedit.data.requests import EditRequest
from ftedit.evaluate.common import (
    EvaluationError,
    check_prompts,
    check_requests,
    describe,
    mean,
    summarize,
)
from ftedit.evaluate.scoring import PairScore, score_pairs

KINDS = ("rewrite", "paraphrase", "neighborhood")
METRIC = {"rewrite": "efficacy", "paraphrase": "generalization", "neighborhood": "locality"}


@dataclass
class _Plan:
    pairs: list[tuple[str, str]]
    # per record, per kind: list of (prompt, index of the (prompt, new) pair; (prompt, true) follows it)
    slots: list[dict[str, list[tuple[str, int]]]]


def validate(requests: Sequence[EditRequest], missing: str = "error") -> None:
    """Raise :class:`EvaluationError` naming the first record this protocol cannot score."""
    check_requests(requests, missing)
    for pos, req in enumerate(requests):
        if not req.target_true:
            raise EvaluationError(f"{describe(req, pos)} has no target_true: the COUNTERFACT protocol compares "
                                  "target_new against target_true and cannot score it")
        for nb in req.neighborhood:
            if nb.target.strip() != req.target_true.strip():
                raise EvaluationError(f"{describe(req, pos)}: neighborhood prompt {nb.prompt!r} has target "
                                      f"{nb.target!r}, not the record's target_true {req.target_true!r}")
        check_prompts(req, pos, missing, METRIC)


def _prompts(req: EditRequest) -> dict[str, list[str]]:
    return {"rewrite": [req.prompt], "paraphrase": list(req.paraphrase_prompts),
            "neighborhood": [nb.prompt for nb in req.neighborhood]}


def _plan(requests: Sequence[EditRequest]) -> _Plan:
    pairs: list[tuple[str, str]] = []
    slots = []
    for req in requests:
        record: dict[str, list[tuple[str, int]]] = {}
        for kind, prompts in _prompts(req).items():
            record[kind] = []
            for prompt in prompts:
                record[kind].append((prompt, len(pairs)))
                pairs += [(prompt, req.target_new), (prompt, req.target_true)]
        slots.append(record)
    return _Plan(pairs, slots)


def _kind_metrics(kind: str, scored: list[tuple[str, PairScore, PairScore]]) -> dict[str, Any]:
    """Success, magnitude and accuracy of one record's prompts of one kind (fractions, not percent)."""
    neighbor = kind == "neighborhood"
    success = [(t.nll < n.nll) if neighbor else (n.nll < t.nll) for _, n, t in scored]
    diff = [(t.mean_token_prob - n.mean_token_prob) if neighbor else (n.mean_token_prob - t.mean_token_prob)
            for _, n, t in scored]
    acc = [(t if neighbor else n).all_correct for _, n, t in scored]
    return {
        "success": mean(success), "magnitude": mean(diff), "acc": mean(acc),
        "prompts": [{"prompt": p, "nll_new": n.nll, "nll_true": t.nll, "success": s}
                    for (p, n, t), s in zip(scored, success)],
    }


def _record(req: EditRequest, slots: dict[str, list[tuple[str, int]]], scores: list[PairScore]) -> dict[str, Any]:
    rec: dict[str, Any] = {"case_id": req.case_id, "prompt": req.prompt, "target_new": req.target_new,
                           "target_true": req.target_true}
    for kind in KINDS:
        scored = [(p, scores[i], scores[i + 1]) for p, i in slots[kind]]
        rec[kind] = _kind_metrics(kind, scored) if scored else None
    return rec


def summarize_records(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The protocol's summary of per-record details."""
    return summarize("counterfact", records, KINDS, METRIC, {"": "success", "_magnitude": "magnitude", "_acc": "acc"})


def evaluate_counterfact(
    model,
    tok,
    requests: Sequence[EditRequest],
    *,
    batch_size: int = 32,
    progress: bool = True,
    missing: str = "error",
    stats: dict | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(summary, per-record details)`` under the ROME/MEMIT COUNTERFACT protocol (summary values x100).
    ``stats``: see :func:`ftedit.evaluate.scoring.score_encoded`."""
    validate(requests, missing)
    plan = _plan(requests)
    # each (prompt, target_new) pair is followed by its (prompt, target_true) pair: the comparisons behind ES/PS/NS
    compare = [(i, i + 1) for i in range(0, len(plan.pairs), 2)]
    scores = score_pairs(model, tok, plan.pairs, batch_size=batch_size, progress=progress, desc="counterfact",
                         compare=compare, stats=stats)
    records = [_record(req, slots, scores) for req, slots in zip(requests, plan.slots)]
    return summarize_records(records), records
