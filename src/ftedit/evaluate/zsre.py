"""ZsRE (MEND split) under the ROME/MEMIT protocol (``dsets/zsre.py`` + ``experiments/py/eval_utils_zsre.py``).

Teacher-forced token accuracy: for each target token ``i``, the model sees ``prompt + target[:i]`` and is
right when its argmax is token ``i``. MEMIT builds one prompt per token (``prompt + decode(target[:i])``,
re-tokenized); here all of them come from ONE pass over ``prompt + target``, on the token ids themselves,
which is the same computation without the decode/re-encode round trip.

* Efficacy: token accuracy of ``target_new`` after the rewrite prompt (``src``).
* Generalization: the same after each paraphrase (``rephrase``).
* Locality: token accuracy of the neighborhood answer (``loc_ans``) after the neighborhood prompt, which MEMIT
  forms as ``loc + "?"`` (the MEND ``loc`` strings, "nq question: ...", carry no question mark) followed by
  ``" " + loc_ans``. A "?" is appended here unless the prompt already ends with one, so raw MEND records and
  records whose loader already added it score the same.

Tokens of all prompts of one kind are pooled within a record (MEMIT's flat ``*_prompts_correct`` list), averaged
per record, then over records, x100. Edit score: harmonic mean of the three. ``*_exact``: every token right
(greedy decoding would produce the whole answer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ftedit.data.requests import EditRequest
from ftedit.evaluate.common import (
    check_prompts,
    check_requests,
    mean,
    summarize,
)
from ftedit.evaluate.scoring import PairScore, score_pairs

KINDS = ("rewrite", "paraphrase", "neighborhood")
METRIC = {"rewrite": "efficacy", "paraphrase": "generalization", "neighborhood": "locality"}


def loc_prompt(prompt: str) -> str:
    """The neighborhood prompt as MEMIT's ``dsets/zsre.py`` forms it: ``loc + "?"``."""
    return prompt if prompt.rstrip().endswith("?") else prompt + "?"


def _pairs(req: EditRequest) -> dict[str, list[tuple[str, str]]]:
    return {
        "rewrite": [(req.prompt, req.target_new)],
        "paraphrase": [(p, req.target_new) for p in req.paraphrase_prompts],
        "neighborhood": [(loc_prompt(nb.prompt), nb.target) for nb in req.neighborhood],
    }


def _kind_metrics(scored: list[tuple[tuple[str, str], PairScore]]) -> dict[str, Any]:
    tokens = [c for _, s in scored for c in s.token_correct]
    return {
        "accuracy": mean(tokens),
        "exact": mean([s.all_correct for _, s in scored]),
        "prompts": [{"prompt": p, "target": t, "token_correct": list(s.token_correct), "nll": s.nll}
                    for (p, t), s in scored],
    }


def summarize_records(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The protocol's summary of per-record details."""
    return summarize("zsre", records, KINDS, METRIC, {"": "accuracy", "_exact": "exact"})


def evaluate_zsre(
    model,
    tok,
    requests: Sequence[EditRequest],
    *,
    batch_size: int = 32,
    progress: bool = True,
    missing: str = "error",
    stats: dict | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(summary, per-record details)`` under the MEMIT ZsRE protocol (summary values x100).
    ``stats``: see :func:`ftedit.evaluate.scoring.score_encoded`."""
    check_requests(requests, missing)
    for pos, req in enumerate(requests):
        check_prompts(req, pos, missing, METRIC)
    per_record = [_pairs(req) for req in requests]
    flat = [pair for rec in per_record for kind in KINDS for pair in rec[kind]]
    scores = iter(score_pairs(model, tok, flat, batch_size=batch_size, progress=progress, desc="zsre",
                                    stats=stats))
    records = []
    for req, rec in zip(requests, per_record):
        row: dict[str, Any] = {"case_id": req.case_id, "prompt": req.prompt, "target_new": req.target_new}
        for kind in KINDS:
            scored = [(pair, next(scores)) for pair in rec[kind]]
            row[kind] = _kind_metrics(scored) if scored else None
        records.append(row)
    return summarize_records(records), records
