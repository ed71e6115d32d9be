"""``ftedit eval`` as a library call: evaluate a model (and optionally its base) on edit requests, write JSON."""

from __future__ import annotations

import gc
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ftedit.atomic import write_json_atomic
from ftedit.chat import apply_chat_template
from ftedit.evaluate import EvalResult, compare, evaluate_requests
from ftedit.evaluate.generation import GenerationOptions, load_snippets, tfidf_vectorizer
from ftedit.evaluate.perplexity import load_texts, perplexity
from ftedit.preflight import check_eval_options

logger = logging.getLogger(__name__)

def target_ids(data: str) -> dict[Any, str]:
    """case_id -> target_new Wikidata id, from a full-schema COUNTERFACT file (consistency needs it)."""
    try:
        raw = json.loads(Path(data).read_text())
    except (OSError, ValueError):
        return {}
    ids = {}
    for rec in raw if isinstance(raw, list) else []:
        new = rec.get("requested_rewrite", {}).get("target_new") if isinstance(rec, dict) else None
        if isinstance(new, dict) and "id" in new:
            ids[rec.get("case_id")] = new["id"]
    return ids


def evaluate_spec(spec: str, requests, cfg: dict[str, Any]) -> tuple[dict[str, Any], EvalResult]:
    """Load one model, evaluate it (plus perplexity when asked), free it; return (identity, result)."""
    from ftedit.models import load_model

    t0 = time.perf_counter()
    model, tok, identity = load_model(spec, device=cfg["device"], dtype=cfg["dtype"])
    logger.info("loaded %s in %.1fs", spec, time.perf_counter() - t0)
    requests, _, _ = apply_chat_template(tok, requests, setting=cfg["chat_template"])
    result = evaluate_requests(model, tok, requests, protocol=cfg["protocol"], batch_size=cfg["batch_size"],
                               details=cfg["details"], progress=cfg["progress"], missing=cfg["missing"],
                               generation=cfg["generation"], snippets=cfg["snippets"],
                               vectorizer=cfg["vectorizer"], target_ids=cfg["target_ids"])
    if cfg["ppl_texts"]:
        ppl = perplexity(model, tok, cfg["ppl_texts"], max_length=cfg["ppl_max_length"],
                         batch_size=max(1, cfg["batch_size"] // 4), progress=cfg["progress"])
        result.summary.update(perplexity=ppl.perplexity, perplexity_tokens=ppl.n_tokens,
                              perplexity_texts=ppl.n_texts)
    del model, tok
    gc.collect()
    return identity.to_dict(), result


def generation_options(fluency: bool, gen_max_len: int | None, gen_top_k: int, seed: int,
                        batch_size: int) -> GenerationOptions | None:
    if not fluency:
        return None
    return GenerationOptions(gen_max_len, gen_top_k or None, seed, max(1, batch_size // 2))



@dataclass
class EvalSettings:
    """The options of ``ftedit eval``."""

    model: str = "demo"
    data: str = ""
    n: int | None = None
    offset: int = 0
    seed: int = 0
    protocol: str = "auto"
    batch_size: int = 32
    out: Path | None = None
    base_model: str | None = None
    details: bool = False
    fluency: bool = False
    gen_max_len: int | None = None
    gen_top_k: int = 5
    snippets: Path | None = None
    idf: Path | None = None
    tfidf_vocab: Path | None = None
    ppl_data: Path | None = None
    ppl_n: int = 200
    ppl_max_length: int = 256
    missing: str = "count"
    chat_template: str = "auto"  # prompts as chat turns: auto (instruct model and question prompts) | on | off
    device: str | None = None
    dtype: str = "auto"
    progress: bool = True


@dataclass
class EvalOutcome:
    payload: dict[str, Any]  # what --out holds
    result: EvalResult
    base_result: EvalResult | None
    deltas: dict | None
    n_requests: int


def run_evaluation(s: EvalSettings) -> EvalOutcome:
    """Evaluate ``s.model`` (and ``s.base_model``) on ``s.data``; write the payload to ``s.out`` if given."""
    from ftedit.data.loaders import load_requests

    check_eval_options(n=s.n, offset=s.offset, device=s.device, dtype=s.dtype, missing=s.missing,
                       protocol=s.protocol, models=[s.model] + ([s.base_model] if s.base_model else []), out=s.out)
    start = time.perf_counter()
    torch.manual_seed(s.seed)
    loaded = load_requests(s.data, n=s.n, offset=s.offset)
    logger.info("loaded %d requests from %s (%d skipped)", len(loaded.requests), s.data, len(loaded.skipped))
    snips = load_snippets(s.snippets) if s.snippets else None
    cfg: dict[str, Any] = {
        "device": s.device, "dtype": s.dtype, "protocol": s.protocol, "batch_size": s.batch_size,
        "details": s.details, "progress": s.progress, "missing": s.missing, "chat_template": s.chat_template,
        "generation": generation_options(s.fluency, s.gen_max_len, s.gen_top_k, s.seed, s.batch_size),
        "snippets": snips, "vectorizer": tfidf_vectorizer(snips, s.idf, s.tfidf_vocab) if snips else None,
        "target_ids": target_ids(s.data) if snips else None,
        "ppl_texts": load_texts(s.ppl_data, n=s.ppl_n) if s.ppl_data else None,
        "ppl_max_length": s.ppl_max_length,
    }
    identity, result = evaluate_spec(s.model, loaded.requests, cfg)
    base_identity, base_result, deltas = None, None, None
    if s.base_model:
        base_identity, base_result = evaluate_spec(s.base_model, loaded.requests, cfg)
        deltas = compare(base_result, result)
    payload = {
        "config": {"model": s.model, "data": s.data, "n": s.n, "offset": s.offset, "seed": s.seed,
                   "protocol": s.protocol, "batch_size": s.batch_size, "base_model": s.base_model,
                   "details": s.details, "fluency": s.fluency,
                   "generation": cfg["generation"].to_dict() if cfg["generation"] else None,
                   "snippets": s.snippets, "idf": s.idf, "tfidf_vocab": s.tfidf_vocab, "ppl_data": s.ppl_data,
                   "ppl_n": s.ppl_n, "ppl_max_length": s.ppl_max_length, "missing": s.missing,
                   "chat_template": s.chat_template, "device": s.device, "dtype": s.dtype},
        "data": {"n_requests": len(loaded.requests), "skipped": loaded.skipped},
        "model": identity, "result": result.to_dict(),
        "base_model": base_identity, "base_result": base_result.to_dict() if base_result else None,
        "compare": deltas, "wall_seconds": time.perf_counter() - start,
    }
    if s.out is not None:
        write_json_atomic(s.out, payload)
        logger.info("wrote %s", s.out)
    return EvalOutcome(payload, result, base_result, deltas, len(loaded.requests))
