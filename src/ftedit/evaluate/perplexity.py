"""Token-weighted perplexity on held-out text (e.g. ``downstream/wiki_summaries.jsonl``).

Each text is encoded like a prompt (BOS when the tokenizer adds one) and truncated to ``max_length`` tokens;
every token after the first is predicted. Perplexity is ``exp(sum of token NLLs / number of predicted tokens)``
over all texts together, so long texts weigh more than short ones.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ftedit.data.text import read_text
from ftedit.errors import InputError
from ftedit.evaluate.scoring import score_encoded
from ftedit.tokenization import EncodedPair, encode_prompt


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float  # mean NLL per predicted token (nats)
    n_tokens: int
    n_texts: int
    n_texts_skipped: int  # texts with fewer than two tokens: nothing to predict
    max_length: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_texts(path: str | Path, n: int | None = 200, offset: int = 0, field: str = "text") -> list[str]:
    """Texts ``offset .. offset+n-1`` of a JSONL file (one object per line, ``field`` holding the text)."""
    texts = []
    for i, line in enumerate(read_text(path, "JSONL file").splitlines()):
        if i < offset or not line.strip():
            continue
        if n is not None and len(texts) >= n:
            break
        texts.append(_text_field(line, path, i + 1, field))
    return texts


def _text_field(line: str, path: str | Path, line_no: int, field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}, line {line_no}: not valid JSON ({e.msg})") from None
    value = record.get(field) if isinstance(record, dict) else None
    if not isinstance(value, str):
        raise InputError(f"{path}, line {line_no}, field '{field}': missing, or not a string")
    return value


def perplexity(
    model,
    tok,
    texts: Sequence[str],
    *,
    max_length: int = 256,
    batch_size: int = 8,
    progress: bool = False,
) -> PerplexityResult:
    """Token-weighted perplexity of ``texts``, each truncated to ``max_length`` tokens."""
    encoded = [EncodedPair(tuple(encode_prompt(tok, t)[:max_length]), 1) for t in texts]
    usable = [e for e in encoded if e.target_len > 0]
    if not usable:
        raise ValueError("no text has two or more tokens; nothing to compute perplexity on")
    # no near-tie re-scoring: perplexity compares nothing, and under bf16 autocast it is the bf16 value
    scores = score_encoded(model, usable, tok.pad_token_id, batch_size=batch_size, progress=progress,
                           desc="perplexity", rescore=False)
    total = -sum(sum(s.logprobs) for s in scores)
    n_tokens = sum(len(s.logprobs) for s in scores)
    nll = total / n_tokens
    return PerplexityResult(math.exp(nll), nll, n_tokens, len(usable), len(texts) - len(usable), max_length)
