"""What the study measures: knowledge probes before editing, after editing and during fine-tuning.

Probe sets
* edited: each edit's prompt with its NEW object (retention of the edit).
* paraphrase: each edit's paraphrase prompts with its NEW object (the edit beyond its training prompt; rehearsal
  never trains on them).
* intrinsic: facts the BASE model knows confidently (top-1 next token is the object's first token, with a
  margin >= 0.1 over the runner-up: paper 002, App. A) that share no subject, relation and object with the
  edits. A fact's relation is its ``relation_id`` when the data has one, else its prompt template (the prompt
  with the subject replaced by ``{}``) -- the EasyEdit COUNTERFACT files carry no relation ids.

At each checkpoint every probe records whether the model knows it (:func:`ftedit.evaluate.probes.knows`:
first non-stop-word greedy token == the object's first token), that first content token, and the top-3
next tokens with their probabilities (the paper's Table 1).

Fallback of a lost edit (known right after editing, not at the end of fine-tuning): its first content token is
* ``original``: the first token of the edit's original (true) object;
* ``related``: the first token of another object of the same relation -- any true or new object of a
  different subject with the same relation key in the edit set or the intrinsic pool;
* ``other``: anything else, including no content token within the generation budget.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ftedit.data.examples import PoolFact
from ftedit.data.requests import EditRequest
from ftedit.evaluate.generation import generate_ids
from ftedit.evaluate.probes import default_stop_words, first_content_token, select_known_facts
from ftedit.evaluate.scoring import next_token_topk
from ftedit.tokenization import encode_target

FALLBACKS = ("original", "related", "other")


@dataclass(frozen=True)
class RetentionProbe:
    kind: str  # "edited" or "intrinsic"
    prompt: str
    target: str  # the object the model should say (new object for edits)
    subject: str
    relation: str  # relation key (relation_id or prompt template)
    original: str | None = None  # edits: the original (true) object
    edit: int | None = None  # edited and paraphrase probes: the index of their edit request


def relation_key(prompt: str, subject: str, relation_id: str | None = None) -> str:
    return relation_id or prompt.replace(subject, "{}")


def edited_probes(requests: Sequence[EditRequest]) -> list[RetentionProbe]:
    """Each edit's prompt, then (after all of them) each edit's paraphrases, with the new object."""
    edited = [RetentionProbe("edited", r.prompt, r.target_new, r.subject,
                             relation_key(r.prompt, r.subject, r.relation_id), r.target_true, i)
              for i, r in enumerate(requests)]
    paraphrases = [RetentionProbe("paraphrase", q, r.target_new, r.subject,
                                  relation_key(r.prompt, r.subject, r.relation_id), r.target_true, i)
                   for i, r in enumerate(requests) for q in r.paraphrase_prompts]
    return edited + paraphrases


def _fold(text: str | None) -> str:
    return (text or "").strip().casefold()


def disjoint_facts(pool: Sequence[PoolFact], requests: Sequence[EditRequest]) -> list[PoolFact]:
    """Pool facts sharing no subject, relation (key) or object (new or true) with any edit."""
    subjects = {_fold(r.subject) for r in requests}
    relations = {relation_key(r.prompt, r.subject, r.relation_id) for r in requests}
    objects = {_fold(r.target_new) for r in requests} | {_fold(r.target_true) for r in requests if r.target_true}
    return [f for f in pool if _fold(f.subject) not in subjects and _fold(f.target) not in objects
            and relation_key(f.prompt, f.subject, f.relation_id) not in relations]


def select_intrinsic(model, tok, pool: Sequence[PoolFact], requests: Sequence[EditRequest], n: int,
                     margin: float = 0.1, seed: int = 0, chunk: int = 256) -> tuple[list[RetentionProbe], dict[str, int]]:
    """Up to ``n`` intrinsic probes: disjoint from the edits and known confidently by ``model`` (the base)."""
    candidates = disjoint_facts(pool, requests)
    random.Random(seed).shuffle(candidates)
    chosen: list[PoolFact] = []
    seen_subjects: set[str] = set()
    checked = 0
    for start in range(0, len(candidates), chunk):
        part = candidates[start:start + chunk]
        checked += len(part)
        for known in select_known_facts(model, tok, part, margin=margin):
            fact = part[known.index]
            if _fold(fact.subject) not in seen_subjects:
                seen_subjects.add(_fold(fact.subject))
                chosen.append(fact)
        if len(chosen) >= n:
            break
    probes = [RetentionProbe("intrinsic", f.prompt, f.target, f.subject, relation_key(f.prompt, f.subject, f.relation_id))
              for f in chosen[:n]]
    return probes, {"pool": len(pool), "disjoint": len(candidates), "checked": checked, "selected": len(probes)}


@dataclass
class RetentionSnapshot:
    """All probes measured once."""

    label: str  # "base", "post-edit", "step N"
    step: int  # downstream optimizer steps (-1: base, 0: right after editing)
    known: list[bool]
    first_token: list[str | None]  # first content token of the greedy continuation (text)
    first_token_id: list[int | None]
    top3: list[list[tuple[str, float]]]

    def rate(self, probes: Sequence[RetentionProbe], kind: str) -> float | None:
        """Retention rate (%) over the probes of ``kind``."""
        flags = [k for k, p in zip(self.known, probes) if p.kind == kind]
        return 100.0 * sum(flags) / len(flags) if flags else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure(model, tok, probes: Sequence[RetentionProbe], label: str, step: int, max_new_tokens: int = 10) -> RetentionSnapshot:
    was_training = model.training
    model.eval()
    try:
        prompts = [p.prompt for p in probes]
        generated = generate_ids(model, tok, prompts, max_new_tokens)
        tops = next_token_topk(model, tok, prompts, k=3)
    finally:
        model.train(was_training)
    stops = default_stop_words()
    firsts = [first_content_token(tok, g, stops) for g in generated]
    known = [f is not None and f == encode_target(tok, p.target)[0] for f, p in zip(firsts, probes)]
    return RetentionSnapshot(label, step, known, [tok.decode([f]).strip() if f is not None else None for f in firsts],
                    firsts, [[(t.token.strip(), round(t.prob, 4)) for t in top] for top in tops])


def related_objects(probes: Sequence[RetentionProbe], pool: Sequence[PoolFact]) -> dict[str, set[tuple[str, str]]]:
    """relation key -> {(subject, object)} over the edit set (true and new objects) and the pool."""
    by_relation: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for p in probes:
        for obj in (p.target, p.original):
            if obj:
                by_relation[p.relation].add((_fold(p.subject), obj))
    for f in pool:
        by_relation[relation_key(f.prompt, f.subject, f.relation_id)].add((_fold(f.subject), f.target))
    return by_relation


def classify_fallback(tok, probe: RetentionProbe, predicted_id: int | None, related: set[tuple[str, str]]) -> str:
    """``original``, ``related`` or ``other`` (see the module docstring); compared by first token."""
    if predicted_id is None:
        return "other"
    if probe.original and predicted_id == encode_target(tok, probe.original)[0]:
        return "original"
    own = {_fold(probe.target), _fold(probe.original)}
    related_ids = {encode_target(tok, obj)[0] for subject, obj in related
                   if subject != _fold(probe.subject) and _fold(obj) not in own}
    return "related" if predicted_id in related_ids else "other"


def lost_edits(probes: Sequence[RetentionProbe], post_edit: RetentionSnapshot, final: RetentionSnapshot, tok,
               related: dict[str, set[tuple[str, str]]]) -> list[dict[str, Any]]:
    """Each edit known right after editing but not at the end, with what the model says instead."""
    out = []
    for i, p in enumerate(probes):
        if p.kind == "edited" and post_edit.known[i] and not final.known[i]:
            out.append({"index": i, "prompt": p.prompt, "target_new": p.target, "target_true": p.original,
                        "predicted": final.first_token[i],
                        "fallback": classify_fallback(tok, p, final.first_token_id[i], related.get(p.relation, set()))})
    return out
