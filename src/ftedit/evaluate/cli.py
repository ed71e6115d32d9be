"""``ftedit eval``: evaluate a model (and optionally its base) on edit requests; print a table, write JSON."""

from __future__ import annotations

import gc
import json
import logging
import time
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from ftedit.chat import apply_chat_template
from ftedit.evaluate import EvalResult, compare, evaluate_requests
from ftedit.evaluate.generation import GenerationOptions, load_snippets, tfidf_vectorizer
from ftedit.evaluate.perplexity import load_texts, perplexity
from ftedit.outputs import write_json_atomic

logger = logging.getLogger(__name__)

HEADLINE = ("efficacy", "generalization", "locality", "edit_score", "efficacy_magnitude",
            "generalization_magnitude", "locality_magnitude", "efficacy_acc", "generalization_acc",
            "locality_acc", "efficacy_exact", "generalization_exact", "locality_exact", "fluency",
            "consistency", "perplexity")


def _target_ids(data: str) -> dict[Any, str]:
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


def _evaluate_spec(spec: str, requests, cfg: dict[str, Any]) -> tuple[dict[str, Any], EvalResult]:
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


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return "-" if value is None else str(value)


def print_table(result: EvalResult, base: EvalResult | None, deltas: dict | None, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("model", justify="right")
    if base is not None:
        table.add_column("base", justify="right")
        table.add_column("delta", justify="right")
    rows = [k for k in HEADLINE if k in result.summary]
    counts = [k for k in result.summary if k.startswith("n_")]
    for key in rows + counts:
        row = [key, _fmt(result.summary[key])]
        if base is not None:
            row += [_fmt(base.summary.get(key)), _fmt(deltas.get(key, {}).get("delta"))]
        table.add_row(*row, end_section=key == rows[-1])
    Console().print(table)


def _generation_options(fluency: bool, gen_max_len: int | None, gen_top_k: int, seed: int,
                        batch_size: int) -> GenerationOptions | None:
    if not fluency:
        return None
    return GenerationOptions(gen_max_len, gen_top_k or None, seed, max(1, batch_size // 2))


def eval_command(
    model: Annotated[str, typer.Option(help="Model: bundled name (demo), HF dir, .gguf file or hub name.")] = "demo",
    data: Annotated[str, typer.Option(help="Edit requests: COUNTERFACT/ZsRE JSON, JSONL or CSV.")] = "",
    n: Annotated[int | None, typer.Option(help="Number of records (default: all).")] = None,
    offset: Annotated[int, typer.Option(help="First record index.")] = 0,
    seed: Annotated[int, typer.Option(help="Seed (torch, and sampling for fluency).")] = 0,
    protocol: Annotated[str, typer.Option(help="auto | counterfact | zsre.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Pairs per forward pass.")] = 32,
    out: Annotated[Path | None, typer.Option(help="Write the results as JSON here.")] = None,
    base_model: Annotated[str | None, typer.Option(help="Also evaluate this (unedited) model: pre/post deltas.")] = None,
    details: Annotated[bool, typer.Option(help="Include per-record details in the JSON.")] = False,
    fluency: Annotated[bool, typer.Option(help="Generate from generation_prompts: fluency (+ consistency).")] = False,
    gen_max_len: Annotated[int | None, typer.Option(help="Tokens per generated text, prompt included "
                                                         "(MEMIT: 100; default 100 on GPU, 40 on CPU).")] = None,
    gen_top_k: Annotated[int, typer.Option(help="Sample from the top-k tokens (MEMIT: 5); 0 = greedy.")] = 5,
    snippets: Annotated[Path | None, typer.Option(help="attribute_snippets.json, for consistency.")] = None,
    idf: Annotated[Path | None, typer.Option(help="idf.npy (with --tfidf-vocab); else fit on snippets.")] = None,
    tfidf_vocab: Annotated[Path | None, typer.Option(help="tfidf_vocab.json (with --idf).")] = None,
    ppl_data: Annotated[Path | None, typer.Option(help="JSONL with a 'text' field: also report perplexity.")] = None,
    ppl_n: Annotated[int, typer.Option(help="Texts for perplexity.")] = 200,
    ppl_max_length: Annotated[int, typer.Option(help="Tokens per perplexity text (truncation).")] = 256,
    missing: Annotated[str, typer.Option(help="Records without paraphrases/neighbors: error | count.")] = "error",
    chat_template: Annotated[str, typer.Option(help="Prompts as chat turns: auto (instruct model and question "
                                                    "prompts) | on | off.")] = "auto",
    device: Annotated[str | None, typer.Option(help="cpu, cuda, ... (default: cuda if available).")] = None,
    dtype: Annotated[str, typer.Option(help="auto | fp32 | bf16 | fp16.")] = "auto",
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> dict[str, Any]:
    """Evaluate edits the way the literature does (COUNTERFACT ES/PS/NS, ZsRE token accuracy)."""
    from ftedit.data.loaders import load_requests

    if not data:
        raise typer.BadParameter("--data is required")
    start = time.perf_counter()
    torch.manual_seed(seed)
    loaded = load_requests(data, n=n, offset=offset)
    logger.info("loaded %d requests from %s (%d skipped)", len(loaded.requests), data, len(loaded.skipped))
    snips = load_snippets(snippets) if snippets else None
    cfg: dict[str, Any] = {
        "device": device, "dtype": dtype, "protocol": protocol, "batch_size": batch_size, "details": details,
        "progress": progress, "missing": missing, "chat_template": chat_template,
        "generation": _generation_options(fluency, gen_max_len, gen_top_k, seed, batch_size),
        "snippets": snips, "vectorizer": tfidf_vectorizer(snips, idf, tfidf_vocab) if snips else None,
        "target_ids": _target_ids(data) if snips else None,
        "ppl_texts": load_texts(ppl_data, n=ppl_n) if ppl_data else None, "ppl_max_length": ppl_max_length,
    }
    identity, result = _evaluate_spec(model, loaded.requests, cfg)
    base_identity, base_result, deltas = None, None, None
    if base_model:
        base_identity, base_result = _evaluate_spec(base_model, loaded.requests, cfg)
        deltas = compare(base_result, result)
    print_table(result, base_result, deltas, f"{model} on {Path(data).name} ({len(loaded.requests)} records)")
    payload = {
        "config": {"model": model, "data": data, "n": n, "offset": offset, "seed": seed, "protocol": protocol,
                   "batch_size": batch_size, "base_model": base_model, "details": details, "fluency": fluency,
                   "generation": cfg["generation"].to_dict() if cfg["generation"] else None,
                   "snippets": snippets, "idf": idf, "tfidf_vocab": tfidf_vocab, "ppl_data": ppl_data,
                   "ppl_n": ppl_n, "ppl_max_length": ppl_max_length, "missing": missing, "chat_template": chat_template, "device": device,
                   "dtype": dtype},
        "data": {"n_requests": len(loaded.requests), "skipped": loaded.skipped},
        "model": identity, "result": result.to_dict(),
        "base_model": base_identity, "base_result": base_result.to_dict() if base_result else None,
        "compare": deltas, "wall_seconds": time.perf_counter() - start,
    }
    if out is not None:
        write_json_atomic(out, payload)
        logger.info("wrote %s", out)
    return payload
