"""Generative metrics: fluency, consistency (ROME/MEMIT) and greedy exact match.

Fluency and consistency follow ``experiments/py/eval_utils_counterfact.py`` (``test_generation``) and ROME's
``util/generate.py`` (``generate_fast``):

* Text: one generation per ``generation_prompt``, sampled from the top-5 tokens (``top_k=5``; ``top_k=None``
  decodes greedily instead), until the sequence (prompt tokens included) is ``max_out_len`` tokens long. MEMIT
  uses 100; the default here is 100 on a GPU and :data:`CPU_MAX_OUT_LEN` on a CPU, since CPU generation is
  slow -- numbers are only comparable at equal lengths, so the length is reported with them. Deviation: a row
  stops at EOS (``generate_fast`` ran on past it and then deleted ``<|endoftext|>`` strings). The returned text
  is the prompt plus the continuation, NFKD-normalized, with ``"\\n\\n"`` replaced by ``" "``, like MEMIT's.
* Fluency (``ngram_entropy``): per text, the bigram and trigram entropies (bits) of its word tokens, weighted
  2/3 and 4/3 and averaged; mean over the record's texts, then over records; x100 as ``summarize.py`` reports
  it. Words come from ``nltk.word_tokenize`` when nltk and its punkt data are installed, else from a built-in
  Treebank-style tokenizer; which one ran is reported (``fluency_tokenizer``).
* Consistency (``reference_score``): TF-IDF cosine between all of a record's generated texts joined by spaces
  and all reference snippets for (relation, target_new id) joined by spaces; x100. Snippets come from a
  user-supplied ``attribute_snippets.json``; the IDF/vocabulary from ``idf.npy`` + ``tfidf_vocab.json`` when
  given, else from a TfidfVectorizer fitted on all snippet texts (what ROME's ``collect_stats`` does).

Greedy exact match (the LocFT protocol): greedy decoding after the prompt reproduces every target token.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ftedit.data.requests import EditRequest
from ftedit.data.text import read_text
from ftedit.errors import InputError
from ftedit.evaluate.common import mean, percent
from ftedit.evaluate.scoring import model_device
from ftedit.tokenization import encode_prompt, encode_target, left_padded

logger = logging.getLogger(__name__)

MEMIT_MAX_OUT_LEN = 100
CPU_MAX_OUT_LEN = 40
NO_SNIPPETS = "unavailable: no snippets file given"


@dataclass(frozen=True)
class GenerationOptions:
    """How fluency/consistency texts are generated. ``max_out_len=None``: 100 on GPU, 40 on CPU."""

    max_out_len: int | None = None
    top_k: int | None = 5
    seed: int = 0
    batch_size: int = 16

    def resolved(self, model) -> GenerationOptions:
        if self.max_out_len is not None:
            return self
        length = MEMIT_MAX_OUT_LEN if model_device(model).type != "cpu" else CPU_MAX_OUT_LEN
        return GenerationOptions(length, self.top_k, self.seed, self.batch_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------ decoding


def _eos_ids(model, tok) -> set[int]:
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(configured) if isinstance(configured, (list, tuple)) else ({configured} if configured is not None else set())
    return ids


def _generation_config(tok, max_new_tokens: int, top_k: int | None, eos: set[int]):
    from transformers import GenerationConfig

    # Every sampling knob is set explicitly: unset ones would be filled from the model's generation_config.
    common = dict(max_new_tokens=max_new_tokens, min_new_tokens=0, num_beams=1, pad_token_id=tok.pad_token_id,
                  eos_token_id=sorted(eos) or None, repetition_penalty=1.0, no_repeat_ngram_size=0)
    if top_k is None:
        return GenerationConfig(do_sample=False, **common)
    return GenerationConfig(do_sample=True, top_k=top_k, top_p=1.0, temperature=1.0, **common)


def _cut(tokens: list[int], limit: int, eos: set[int]) -> list[int]:
    out = []
    for t in tokens[:limit]:
        if t in eos:
            break
        out.append(t)
    return out


@torch.no_grad()  # not inference_mode: FSDP reuses the gathered weights in training
def generate_ids(
    model,
    tok,
    prompts: Sequence[str],
    max_new_tokens: int | Sequence[int],
    *,
    top_k: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = False,
) -> list[list[int]]:
    """New token ids after each prompt (greedy when ``top_k`` is None), cut at EOS and at its own limit."""
    encoded = [encode_prompt(tok, p) for p in prompts]
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    eos = _eos_ids(model, tok)
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    out: list[list[int]] = [[] for _ in prompts]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    with torch.random.fork_rng(devices=[model_device(model)] if model_device(model).type == "cuda" else []):
        for b, idx in enumerate(tqdm(batches, desc="generating", disable=not progress, unit="batch")):
            todo = [i for i in idx if limits[i] > 0]
            if not todo:
                continue
            torch.manual_seed(seed + b)  # per batch: results do not depend on what ran before
            with left_padded(tok):
                batch = tok.pad({"input_ids": [encoded[i] for i in todo]}, return_tensors="pt")
            width = batch["input_ids"].shape[1]
            cfg = _generation_config(tok, max(limits[i] for i in todo), top_k, eos)
            gen = model.generate(input_ids=batch["input_ids"].to(model_device(model)),
                                 attention_mask=batch["attention_mask"].to(model_device(model)), generation_config=cfg)
            for row, i in enumerate(todo):
                out[i] = _cut(gen[row, width:].tolist(), limits[i], eos)
    return out


def _memit_text(tok, ids: list[int]) -> str:
    text = tok.decode(ids, skip_special_tokens=True)
    return unicodedata.normalize("NFKD", text).replace("\n\n", " ")


def generate_texts(model, tok, prompts: Sequence[str], options: GenerationOptions, *, progress: bool = False) -> list[str]:
    """MEMIT-style texts: prompt + continuation, ``options.max_out_len`` tokens in all (prompt included)."""
    opts = options.resolved(model)
    prompt_ids = [encode_prompt(tok, p) for p in prompts]
    limits = [max(0, opts.max_out_len - len(ids)) for ids in prompt_ids]
    new = generate_ids(model, tok, prompts, limits, top_k=opts.top_k, seed=opts.seed,
                       batch_size=opts.batch_size, progress=progress)
    return [_memit_text(tok, ids + n) for ids, n in zip(prompt_ids, new)]


def greedy_exact_match(model, tok, pairs: Sequence[tuple[str, str]], *, batch_size: int = 16) -> list[bool]:
    """True where greedy decoding after the prompt produces exactly the target's tokens (LocFT's exact match)."""
    targets = [encode_target(tok, target) for _, target in pairs]
    new = generate_ids(model, tok, [p for p, _ in pairs], [len(t) for t in targets], batch_size=batch_size)
    return [list(t) == n for t, n in zip(targets, new)]


# ------------------------------------------------------------------------------------------ fluency

# Treebank-style fallback for nltk.word_tokenize: contractions, punctuation and quotes split off, numbers
# like 1,000.5 and hyphenated/abbreviated words (U.S., well-known) kept whole.
_WORD = re.compile(
    r"(?i)(?:\d+(?:[.,]\d+)+)|(?:[a-z]\.){2,}|\w+(?:[-']\w+)*(?=n't\b)|n't\b|'(?:s|m|d|ll|re|ve)\b"
    r"|\w+(?:-\w+)*|\.\.\.|--|``|''|[^\w\s]"
)


def _simple_tokenize(text: str) -> list[str]:
    return _WORD.findall(text.replace('"', " '' "))


@functools.cache
def word_tokenizer_name() -> str:
    try:
        import nltk

        nltk.word_tokenize("probe.")
        return "nltk.word_tokenize"
    except (ImportError, LookupError):
        return "ftedit-treebank-regex"


def word_tokenize(text: str) -> list[str]:
    """``nltk.word_tokenize`` when available (as MEMIT), else the built-in Treebank-style regex tokenizer."""
    if word_tokenizer_name() == "nltk.word_tokenize":
        import nltk

        return nltk.word_tokenize(text)
    return _simple_tokenize(text)


def compute_n_gram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """Mean over n of ``weight_n * H_n`` with ``H_n`` the entropy (bits) of the text's n-gram frequencies."""
    words = word_tokenize(text)
    weighted = []
    for n, w in zip(ns, weights):
        counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        total = sum(counts.values())
        entropy = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        weighted.append(w * entropy)
    return sum(weighted) / len(weighted)


def n_gram_entropy(texts: Sequence[str]) -> float:
    """Arithmetic mean of :func:`compute_n_gram_entropy` over texts (MEMIT's ``n_gram_entropy``, agg="arith")."""
    return sum(compute_n_gram_entropy(t) for t in texts) / len(texts)


# ------------------------------------------------------------------------------------------ consistency


def load_snippets(path: str | Path) -> dict[str, dict[str, list[str]]]:
    """``relation_id -> target_id -> [text]`` from ROME's attribute_snippets.json (a list of
    ``{relation_id, target_id, samples: [{name, text}]}``) or from that nesting already as a dict."""
    try:
        raw = json.loads(read_text(path, "snippets file"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}, line {e.lineno}: not valid JSON ({e.msg})") from None
    snips: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    if isinstance(raw, list):
        for el in raw:
            snips[el["relation_id"]][el["target_id"]] += [s["text"] for s in el["samples"]]
    else:
        for rid, targets in raw.items():
            for tid, samples in targets.items():
                snips[rid][tid] += [s["text"] if isinstance(s, Mapping) else s for s in samples]
    return snips


def tfidf_vectorizer(snippets: Mapping[str, Mapping[str, list[str]]] | None = None,
                     idf_path: str | Path | None = None, vocab_path: str | Path | None = None):
    """ROME's vectorizer from ``idf.npy`` + ``tfidf_vocab.json``, else one fitted on all snippet texts."""
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer

    if idf_path is not None and vocab_path is not None:
        vec = TfidfVectorizer(vocabulary=json.loads(Path(vocab_path).read_text()))
        vec.idf_ = np.load(idf_path)
        return vec
    if idf_path is not None or vocab_path is not None:
        raise ValueError("pass both idf.npy and tfidf_vocab.json, or neither (to fit on the snippets)")
    if not snippets:
        raise ValueError("no snippets to fit a TF-IDF vectorizer on")
    docs = [t for targets in snippets.values() for texts in targets.values() for t in texts]
    return TfidfVectorizer().fit(docs)


def tfidf_similarity(text_a: str, text_b: str, vectorizer) -> float:
    """Cosine of the two texts' TF-IDF vectors (0 when either vector is zero; MEMIT would give NaN)."""
    import numpy as np

    a, b = vectorizer.transform([text_a, text_b]).toarray()
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    return float(np.dot(a, b) / norms) if norms > 0 else 0.0


# ------------------------------------------------------------------------------------------ per request


def _consistency(req: EditRequest, texts: list[str], snippets, vectorizer, target_ids) -> float | str:
    tid = target_ids.get(req.case_id) if target_ids else None
    if tid is None:
        return "unavailable: no target_new id for this record"
    refs = snippets.get(req.relation_id or "", {}).get(tid, [])
    if not refs:
        return f"unavailable: no snippets for ({req.relation_id}, {tid})"
    return tfidf_similarity(" ".join(texts), " ".join(refs), vectorizer)


def evaluate_generation(
    model,
    tok,
    requests: Sequence[EditRequest],
    options: GenerationOptions | None = None,
    *,
    snippets: Mapping[str, Mapping[str, list[str]]] | None = None,
    vectorizer=None,
    target_ids: Mapping[Any, str] | None = None,
    progress: bool = True,
) -> tuple[dict[str, Any], list[dict[str, Any] | None]]:
    """Fluency (and consistency when snippets are given) over the requests' generation prompts.

    Returns ``(summary, per-request details)``; a request without generation prompts has ``None`` details and
    is left out of the averages (``n_records_fluency`` counts the others).
    """
    opts = (options or GenerationOptions()).resolved(model)
    usable = [r for r in requests if r.generation_prompts]
    summary: dict[str, Any] = {"generation": opts.to_dict(), "fluency_tokenizer": word_tokenizer_name(),
                               "n_records_fluency": len(usable)}
    if not usable:
        none = "unavailable: requests have no generation_prompts"
        return {**summary, "fluency": none, "consistency": none, "n_records_consistency": 0}, [None] * len(requests)
    prompts = [p for r in usable for p in r.generation_prompts]
    texts = iter(generate_texts(model, tok, prompts, opts, progress=progress))
    if snippets is not None and vectorizer is None:
        vectorizer = tfidf_vectorizer(snippets)
    aligned: list[dict[str, Any] | None] = []
    for req in requests:
        if not req.generation_prompts:
            aligned.append(None)
            continue
        gen = [next(texts) for _ in req.generation_prompts]
        rec: dict[str, Any] = {"case_id": req.case_id, "texts": gen, "fluency": n_gram_entropy(gen)}
        rec["consistency"] = NO_SNIPPETS if snippets is None else _consistency(req, gen, snippets, vectorizer, target_ids)
        aligned.append(rec)
    records = [r for r in aligned if r is not None]
    summary["fluency"] = percent(mean([r["fluency"] for r in records]))
    scored = [r["consistency"] for r in records if isinstance(r["consistency"], float)]
    summary["consistency"] = percent(mean(scored)) if scored else (NO_SNIPPETS if snippets is None else
                                                                   "unavailable: no record had snippets")
    summary["n_records_consistency"] = len(scored)
    return summary, aligned
