"""Second-moment ("mom2") statistics ``C = E[k kᵀ]`` of the keys of an MLP down projection over a text corpus.

ROME divides by ``C`` so that an edit disturbs typical keys least; MEMIT weighs ``λ·C`` against the new keys;
AlphaEdit projects updates onto ``C``'s null space. The originals use 100,000 Wikipedia samples; here the
corpus is configurable: a local file (JSONL/JSON with a text field, TXT with one text per line, CSV with a
text column) or a Hugging Face dataset ``hf:NAME`` / ``hf:NAME@CONFIG`` (streamed, e.g. ``hf:wikitext@wikitext-
103-raw-v1`` or ``hf:wikipedia@20220301.en``). Results are cached per (model fingerprint, layer, module,
corpus, sample count, max length, weight dtype) as safetensors under ``ftedit.cache.cache_dir() / "mom2"``.

Special tokens (BOS, padding) are left out of the statistics: an edit's key is never one of them, and
Gemma's BOS activations are outliers large enough to dominate ``C``.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn
from tqdm.auto import tqdm

from ftedit.atomic import write_bytes_atomic
from ftedit.cache import cache_path, file_digest, model_fingerprint
from ftedit.forward import model_device, run_until_stopped, tapped
from ftedit.params import Target

logger = logging.getLogger(__name__)

# Wikipedia summaries from the project's shared data, relative to the repository root (the working directory).
DEFAULT_CORPUS = "../shared/data/downstream/wiki_summaries.jsonl"
HF_PREFIX = "hf:"


class CorpusError(ValueError):
    """The statistics corpus is missing or malformed (names the file, record and field)."""


@dataclass
class StatsConfig:
    """Where the key statistics come from."""

    corpus: str = DEFAULT_CORPUS  # local .jsonl/.json/.txt/.csv file, or "hf:NAME[@CONFIG]" (Wikipedia in the papers)
    n_samples: int = 1000  # texts to read (the papers: 100,000 Wikipedia articles)
    max_length: int = 128  # tokens kept per text
    batch_size: int = 16  # texts per forward pass
    text_field: str = "text"  # JSON key / CSV column / HF column holding the text
    hf_split: str = "train"


# ------------------------------------------------------------------------------------------ corpus


def _jsonl_texts(path: Path, field: str) -> Iterator[str]:
    with path.open(encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}: line {line_no}: not valid JSON ({e.msg}, column {e.colno})") from None
            yield _field(record, field, f"{path}: line {line_no}")


def _json_texts(path: Path, field: str) -> Iterator[str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise CorpusError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(data, list):
        raise CorpusError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    for i, record in enumerate(data):
        yield _field(record, field, f"{path}: record {i}")


def _csv_texts(path: Path, field: str) -> Iterator[str]:
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or field not in reader.fieldnames:
            raise CorpusError(f"{path}: no column {field!r} (columns: {reader.fieldnames}); set stats.text_field")
        for i, row in enumerate(reader):
            yield _field(row, field, f"{path}: row {i + 1}")


def _txt_texts(path: Path, field: str) -> Iterator[str]:
    with path.open(encoding="utf-8-sig") as f:
        yield from (line.strip() for line in f if line.strip())


def _field(record, field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise CorpusError(f"{where}: expected an object with a {field!r} field, got {type(record).__name__}")
    if field not in record:
        raise CorpusError(f"{where}: missing field {field!r} (has {sorted(record)}); set stats.text_field")
    value = record[field]
    if not isinstance(value, str):
        raise CorpusError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    return value


def _hf_texts(spec: str, field: str, split: str) -> Iterator[str]:
    from datasets import load_dataset

    name, _, config = spec[len(HF_PREFIX):].partition("@")
    dataset = load_dataset(name, config or None, split=split, streaming=True)
    for i, record in enumerate(dataset):
        yield _field(dict(record), field, f"{spec}[{split}] record {i}")


def corpus_texts(cfg: StatsConfig) -> Iterator[str]:
    """The corpus's non-empty texts, in order, at most ``cfg.n_samples``."""
    if cfg.corpus.startswith(HF_PREFIX):
        texts = _hf_texts(cfg.corpus, cfg.text_field, cfg.hf_split)
    else:
        path = Path(cfg.corpus)
        if not path.is_file():
            raise CorpusError(f"statistics corpus not found: {path} (set stats.corpus to a file or hf:NAME)")
        reader = {".jsonl": _jsonl_texts, ".ndjson": _jsonl_texts, ".json": _json_texts, ".csv": _csv_texts,
                  ".txt": _txt_texts}.get(path.suffix.lower())
        if reader is None:
            raise CorpusError(f"{path}: unknown corpus format {path.suffix!r}; use .jsonl, .json, .csv or .txt")
        texts = reader(path, cfg.text_field)
    count = 0
    for text in texts:
        if count >= cfg.n_samples:
            return
        if text.strip():
            count += 1
            yield text


def corpus_id(cfg: StatsConfig) -> str:
    """Names the corpus in cache keys: the dataset name, or the file's name and content hash."""
    if cfg.corpus.startswith(HF_PREFIX):
        return f"{cfg.corpus[len(HF_PREFIX):]}-{cfg.hf_split}-{cfg.text_field}".replace("/", "_").replace("@", "_")
    path = Path(cfg.corpus)
    if not path.is_file():
        raise CorpusError(f"statistics corpus not found: {path} (set stats.corpus to a file or hf:NAME)")
    return f"{path.stem}-{file_digest(path)[:12]}-{cfg.text_field}"


# ------------------------------------------------------------------------------------------ fingerprint and cache


def stats_path(fingerprint: str, target: Target, cfg: StatsConfig) -> Path:
    """The cache file of ``target``'s statistics on the model ``fingerprint`` identifies."""
    return cache_path("mom2", suffix=".safetensors", model=fingerprint, module=target.name,
                      dtype=str(target.module.weight.dtype), corpus=corpus_id(cfg), n_samples=cfg.n_samples,
                      max_length=cfg.max_length)


def _load(path: Path) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        return load_safetensors(path.read_bytes())["mom2"]
    except Exception as e:  # a damaged cache entry is recomputed, not fatal
        logger.warning("ignoring unreadable statistics cache %s: %s", path, e)
        return None


# ------------------------------------------------------------------------------------------ collection


class _Accumulator:
    def __init__(self):
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, keys: torch.Tensor) -> None:
        keys = keys.float()
        outer = (keys.T @ keys).double().cpu()
        self.total = outer if self.total is None else self.total + outer
        self.count += keys.shape[0]

    def mean(self) -> torch.Tensor:
        if not self.count:
            raise CorpusError("the statistics corpus produced no tokens")
        return (self.total / self.count).float()


def _special_ids(tok) -> list[int]:
    return sorted({i for i in (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id) if i is not None})


@torch.no_grad()
def collect(model: nn.Module, tok, targets: Sequence[Target], cfg: StatsConfig,
            progress: bool = True) -> tuple[dict[str, torch.Tensor], int]:
    """``E[k kᵀ]`` of each target's input over the corpus, in one pass; returns (by module name, token count)."""
    device = model_device(model)
    accs = {t.name: _Accumulator() for t in targets}
    last = max(targets, key=lambda t: t.layer)
    special = torch.tensor(_special_ids(tok), device=device)
    texts = list(corpus_texts(cfg))
    if not texts:
        raise CorpusError(f"{cfg.corpus}: no non-empty texts")
    bar = tqdm(total=len(texts), desc="mom2 statistics", unit="text", disable=not progress)
    with contextlib.ExitStack() as stack:
        # the layers above the last target are not needed
        boxes = {t.name: stack.enter_context(tapped(t.module, "input", stop=t is last)) for t in targets}
        stack.callback(bar.close)
        for start in range(0, len(texts), cfg.batch_size):
            chunk = texts[start:start + cfg.batch_size]
            enc = tok(chunk, add_special_tokens=True, truncation=True, max_length=cfg.max_length,
                      padding=True, return_tensors="pt").to(device)
            keep = enc["attention_mask"].bool() & ~torch.isin(enc["input_ids"], special)
            run_until_stopped(model, enc["input_ids"], enc["attention_mask"])
            for name, box in boxes.items():
                accs[name].add(box.pop("x")[keep])
            bar.update(len(chunk))
    tokens = next(iter(accs.values())).count
    return {name: acc.mean() for name, acc in accs.items()}, tokens


def mom2(model: nn.Module, tok, targets: Sequence[Target], cfg: StatsConfig, fingerprint: str = "",
         progress: bool = True) -> dict[int, torch.Tensor]:
    """``E[k kᵀ]`` (float32, ``[d_in, d_in]``) per layer of ``targets``, from the cache or collected in one pass.

    ``fingerprint`` identifies the model (``ModelIdentity.fingerprint``); without one the weights are hashed.
    """
    fingerprint = fingerprint or model_fingerprint(model)
    out: dict[int, torch.Tensor] = {}
    missing: list[Target] = []
    for t in targets:
        cached = _load(stats_path(fingerprint, t, cfg))
        if cached is None:
            missing.append(t)
        else:
            logger.info("mom2 statistics of %s from the cache", t.name)
            out[t.layer] = cached
    if missing:
        logger.info("collecting mom2 statistics of %s over %s (%d texts, <= %d tokens each)",
                    ", ".join(t.name for t in missing), cfg.corpus, cfg.n_samples, cfg.max_length)
        collected, tokens = collect(model, tok, missing, cfg, progress)
        for t in missing:
            meta = {"module": t.name, "layer": str(t.layer), "corpus": cfg.corpus, "corpus_id": corpus_id(cfg),
                    "n_samples": str(cfg.n_samples), "max_length": str(cfg.max_length), "tokens": str(tokens),
                    "fingerprint": fingerprint}
            write_bytes_atomic(stats_path(fingerprint, t, cfg),
                               save_safetensors({"mom2": collected[t.name].contiguous()}, metadata=meta))
            out[t.layer] = collected[t.name]
    return out
