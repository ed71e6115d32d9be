"""What the model now says: short greedy generations for the edit prompts, before and after an edit.

Teacher-forced scores (is the new target more likely than the old one?) overstate an edit whose greedy answer
is still something else. ``match`` is exact match of the new target: the generated text, stripped, starts
with the stripped target.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ftedit.data.requests import EditRequest
from ftedit.evaluate.generation import generate_ids
from ftedit.tokenization import chat_prompt

MAX_NEW_TOKENS = 12


def generate_answers(model, tok, prompts: Sequence[str], max_new_tokens: int = MAX_NEW_TOKENS,
                     chat: bool = False, batch_size: int = 16) -> list[str]:
    """Greedy continuations of ``prompts`` (as user turns of the chat template when ``chat``), special tokens
    dropped."""
    texts = [chat_prompt(tok, p) for p in prompts] if chat else list(prompts)
    ids = generate_ids(model, tok, texts, max_new_tokens, batch_size=batch_size)
    return [tok.decode(i, skip_special_tokens=True) for i in ids]


def starts_with_target(text: str, target: str) -> bool:
    return text.strip().startswith(target.strip())


def answer_prompts(requests: Sequence[EditRequest]) -> list[tuple[int, str, str]]:
    """(request index, kind, prompt) for every edit prompt and its paraphrases."""
    rows = []
    for i, r in enumerate(requests):
        rows.append((i, "edit", r.prompt))
        rows += [(i, "paraphrase", p) for p in r.paraphrase_prompts]
    return rows


def what_it_says(model, tok, requests: Sequence[EditRequest], chat: bool = False,
                 max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """One greedy answer per row of :func:`answer_prompts`. ``requests`` hold the prompts as the user wrote
    them; ``chat`` wraps them in the chat template here."""
    return generate_answers(model, tok, [p for _, _, p in answer_prompts(requests)], max_new_tokens, chat)


def before_after(requests: Sequence[EditRequest], before: Sequence[str], after: Sequence[str],
                 max_new_tokens: int = MAX_NEW_TOKENS) -> dict[str, Any]:
    """Rows (prompt, new target, texts before/after, exact match of the new target) and match rates (%)."""
    rows = []
    for (i, kind, prompt), b, a in zip(answer_prompts(requests), before, after, strict=True):
        target = requests[i].target_new
        rows.append({"request_index": i, "kind": kind, "prompt": prompt, "target_new": target,
                     "before": b, "after": a, "match_before": starts_with_target(b, target),
                     "match_after": starts_with_target(a, target)})
    summary = {}
    for kind in ("edit", "paraphrase"):
        of_kind = [r for r in rows if r["kind"] == kind]
        if of_kind:
            for when in ("before", "after"):
                summary[f"{kind}_match_{when}"] = 100 * sum(r[f"match_{when}"] for r in of_kind) / len(of_kind)
    return {"max_new_tokens": max_new_tokens, "summary": summary, "rows": rows}
