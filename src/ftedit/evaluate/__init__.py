"""Evaluation of edits, measured the way the model-editing literature does.

* COUNTERFACT: ROME/MEMIT efficacy / generalization / locality (ES/PS/NS), magnitudes, edit score
  (:mod:`ftedit.evaluate.counterfact`).
* ZsRE (MEND split): MEMIT teacher-forced token accuracies (:mod:`ftedit.evaluate.zsre`).
* Generation: fluency, consistency, greedy exact match (:mod:`ftedit.evaluate.generation`); knowledge probes
  (:mod:`ftedit.evaluate.probes`); perplexity (:mod:`ftedit.evaluate.perplexity`).

:func:`evaluate_requests` is the entry point; :func:`compare` gives pre/post deltas.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from ftedit.data.requests import EditRequest
from ftedit.errors import InputError
from ftedit.evaluate import counterfact, zsre
from ftedit.evaluate.common import EvaluationError, is_finite
from ftedit.evaluate.counterfact import evaluate_counterfact
from ftedit.evaluate.generation import GenerationOptions, evaluate_generation
from ftedit.evaluate.scoring import PairScore, next_token_topk, score_pairs
from ftedit.evaluate.zsre import evaluate_zsre
from ftedit.precision import scoring_label

PROTOCOLS = ("auto", "counterfact", "zsre")

__all__ = [
    "EvalResult",
    "EvaluationError",
    "GenerationOptions",
    "PairScore",
    "compare",
    "detect_protocol",
    "evaluate_requests",
    "next_token_topk",
    "score_pairs",
]


@dataclass
class EvalResult:
    """``summary``: metric name -> value (percentages x100, counts, the protocol); ``records``: per-record
    details when asked for; ``config``: how the evaluation ran."""

    protocol: str
    summary: dict[str, Any]
    records: list[dict[str, Any]] | None = None
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"protocol": self.protocol, "summary": self.summary, "config": self.config}
        if self.records is not None:
            out["records"] = self.records
        return out


def detect_protocol(requests: Sequence[EditRequest]) -> str:
    """``counterfact`` when every request has target_true, ``zsre`` when none has; mixed is an error."""
    with_true = sum(1 for r in requests if r.target_true)
    if with_true == len(requests):
        return "counterfact"
    if with_true == 0:
        return "zsre"
    raise EvaluationError(f"{with_true} of {len(requests)} requests have target_true: mixed sets cannot be "
                          "scored under one protocol; pass protocol='zsre' to score all of them by token accuracy")


def _one_record_at_a_time(run, model, tok, requests, protocol: str, show: bool, stats: dict | None = None,
                          **options) -> tuple[dict, list]:
    """A model whose edit is a per-record prompt prefix (IKE; ``model.record_context``) sees one record per
    scoring run, inside that record's context; the protocol's summary then covers all of them."""
    records = []
    for req in tqdm(requests, desc=f"{protocol}, one record at a time", disable=not show):
        one: dict = {}
        with model.record_context(req):
            records += run(model, tok, [req], stats=one, **options)[1]
        if stats is not None:  # counts add up over the records
            stats.update({k: stats.get(k, 0) + one.get(k, 0) for k in ("pairs", "rescored")},
                         bf16=one.get("bf16", False))
    summarize = counterfact.summarize_records if protocol == "counterfact" else zsre.summarize_records
    return summarize(records), records


def _merge_generation(summary, records, gen_summary, gen_records) -> None:
    summary.update(gen_summary)
    for rec, gen in zip(records, gen_records, strict=True):
        rec["generation"] = gen


def evaluate_requests(
    model,
    tok,
    requests: Sequence[EditRequest],
    *,
    protocol: str = "auto",
    batch_size: int = 32,
    details: bool = False,
    progress: bool = True,
    missing: str = "error",
    generation: GenerationOptions | None = None,
    snippets: Mapping[str, Mapping[str, list[str]]] | None = None,
    vectorizer=None,
    target_ids: Mapping[Any, str] | None = None,
) -> EvalResult:
    """Evaluate ``model`` on ``requests``.

    ``protocol``: "counterfact" (needs target_true), "zsre", or "auto" (counterfact when requests have
    target_true, else zsre). ``missing``: "error" raises on a record without paraphrase/neighborhood prompts,
    "count" averages those metrics over the records that have them and reports the counts. ``generation``:
    also compute fluency (and consistency, given ``snippets``) over the requests' generation prompts.
    """
    if protocol not in PROTOCOLS:
        raise InputError(f"protocol={protocol!r} (--protocol): expected one of {PROTOCOLS}")
    if not requests:
        raise EvaluationError("no requests to evaluate")
    chosen = detect_protocol(requests) if protocol == "auto" else protocol
    run = evaluate_counterfact if chosen == "counterfact" else evaluate_zsre
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    per_record = hasattr(model, "record_context")
    if per_record and generation is not None:
        raise InputError("fluency/consistency (generation) cannot be measured on an in-context edit (IKE): its "
                         "facts are given only while their own record is scored")
    try:
        stats: dict = {}
        if per_record:
            summary, records = _one_record_at_a_time(run, model, tok, requests, chosen, progress,
                                                     batch_size=batch_size, progress=False, missing=missing,
                                                     stats=stats)
        else:
            summary, records = run(model, tok, requests, batch_size=batch_size, progress=progress, missing=missing,
                                   stats=stats)
        if generation is not None:
            gen_summary, gen_records = evaluate_generation(
                model, tok, requests, generation, snippets=snippets, vectorizer=vectorizer,
                target_ids=target_ids, progress=progress)
            _merge_generation(summary, records, gen_summary, gen_records)
    finally:
        model.train(was_training)
    summary["seconds"] = time.perf_counter() - start
    config = {"protocol": chosen, "protocol_requested": protocol, "batch_size": batch_size, "missing": missing,
              "scoring": scoring_label(model), "pairs_rescored_fp32": stats.get("rescored", 0),
              "generation": generation.to_dict() if generation else None}
    return EvalResult(chosen, summary, records if details else None, config)


def compare(pre: EvalResult, post: EvalResult) -> dict[str, dict[str, float]]:
    """``metric -> {"pre", "post", "delta"}`` for every numeric summary value both results have."""
    if pre.protocol != post.protocol:
        raise ValueError(f"cannot compare a {pre.protocol} result with a {post.protocol} result")
    out = {}
    for key, before in pre.summary.items():
        after = post.summary.get(key)
        if key != "seconds" and is_finite(before) and is_finite(after):
            out[key] = {"pre": before, "post": after, "delta": after - before}
    return out
