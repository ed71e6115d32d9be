"""Knowledge probes from "On the Retention of Edited Knowledge in Fine-Tuned Language Models" (Sec. 3, App. A).

* :func:`knows`: the model knows ``prompt -> target`` when the first non-stop-word token of its greedy
  continuation is the target's first token (the retention rate of the paper's Eq. 1). A generated token is a
  stop word when its text, stripped and lower-cased, is in scikit-learn's ``ENGLISH_STOP_WORDS`` (318 words)
  or is empty (whitespace/newline tokens); punctuation is NOT skipped. The target's first token is the first
  token of ``" " + target`` (ftedit's target encoding), compared by token id. Greedy decoding stops after
  ``max_new_tokens`` (default 10): no content token by then counts as not known.
* :func:`select_known_facts`: the paper's filter (App. A): keep a fact when the top-1 next-token is the
  target's first token AND its probability exceeds the second-ranked token's by at least ``margin`` (0.1).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from ftedit.evaluate.generation import generate_ids
from ftedit.evaluate.scoring import next_token_topk
from ftedit.tokenization import encode_target


def default_stop_words() -> frozenset[str]:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return frozenset(ENGLISH_STOP_WORDS)


@dataclass(frozen=True)
class KnownFact:
    prompt: str
    target: str
    index: int  # position in the input sequence
    p_top1: float
    p_top2: float


def _as_pair(fact) -> tuple[str, str]:
    if isinstance(fact, tuple):
        return fact
    return fact.prompt, fact.target


def first_content_token(tok, token_ids: Sequence[int], stop_words: Collection[str]) -> int | None:
    """The first generated token that is not a stop word (nor blank), or None."""
    for t in token_ids:
        text = tok.decode([t]).strip().lower()
        if text and text not in stop_words:
            return t
    return None


def knows_batch(
    model,
    tok,
    facts: Sequence[tuple[str, str]],
    *,
    max_new_tokens: int = 10,
    stop_words: Collection[str] | None = None,
    batch_size: int = 16,
) -> list[bool]:
    """:func:`knows` for many ``(prompt, target)`` facts (or objects with ``.prompt``/``.target``), batched."""
    pairs = [_as_pair(f) for f in facts]
    stops = default_stop_words() if stop_words is None else stop_words
    generated = generate_ids(model, tok, [p for p, _ in pairs], max_new_tokens, batch_size=batch_size)
    return [first_content_token(tok, gen, stops) == encode_target(tok, target)[0]
            for (_, target), gen in zip(pairs, generated)]


def knows(model, tok, prompt: str, target: str, **kwargs) -> bool:
    """True when the first non-stop-word token of greedy decoding after ``prompt`` is ``target``'s first token."""
    return knows_batch(model, tok, [(prompt, target)], **kwargs)[0]


def retention_rate(model, tok, facts: Sequence[tuple[str, str]], **kwargs) -> float:
    """Percentage of facts the model :func:`knows` (the paper's Eq. 1, x100)."""
    known = knows_batch(model, tok, facts, **kwargs)
    return 100.0 * sum(known) / len(known)


def select_known_facts(
    model,
    tok,
    facts: Sequence[tuple[str, str]],
    margin: float = 0.1,
    *,
    batch_size: int = 32,
) -> list[KnownFact]:
    """Facts whose top-1 next token is the target's first token with ``p1 - p2 >= margin`` (App. A)."""
    pairs = [_as_pair(f) for f in facts]
    tops = next_token_topk(model, tok, [p for p, _ in pairs], k=2, batch_size=batch_size)
    kept = []
    for i, ((prompt, target), (first, second)) in enumerate(zip(pairs, tops)):
        if first.token_id == encode_target(tok, target)[0] and first.prob - second.prob >= margin:
            kept.append(KnownFact(prompt, target, i, first.prob, second.prob))
    return kept
