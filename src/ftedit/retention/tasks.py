"""Downstream tasks of paper 002 (Sec. 3.1): what the edited model is fine-tuned on afterwards.

* ``lm``: unstructured text, next-token loss on every token; stop when validation loss < threshold.
* ``facts``: COUNTERFACT facts the base model does not know, with their TRUE objects, loss on the object
  only; stop when validation accuracy (teacher-forced exact match of the object) > threshold. As in the
  paper, the validation facts are a fixed sample of the training facts: the task is to learn them.
* ``classification``: a linear head on the last token's final hidden state; stop when accuracy > threshold.
* ``sft``: instruction/response pairs, loss on the response only (and its end-of-turn marker); through the
  tokenizer's chat template when it has one (instruct models), else a plain instruction template; stop when
  validation loss < threshold.

Data: a local JSONL/JSON/CSV/TXT file or ``hf:NAME`` (a Hugging Face dataset). Every task drops records that
mention an edited subject or object (:mod:`ftedit.retention.filtering`) before splitting train/validation.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ftedit.data.loaders import load_pool_facts
from ftedit.data.text import read_text
from ftedit.errors import InputError, UsageError
from ftedit.evaluate.probes import knows_batch
from ftedit.evaluate.scoring import score_pairs
from ftedit.forward import body_hidden, lm_parts, model_device, per_example_nll
from ftedit.retention.filtering import MentionFilter
from ftedit.retention.stopping import StoppingRule
from ftedit.tokenization import (
    CHAT_SETTINGS,
    EncodedPair,
    chat_prompt,
    encode_pair,
    encode_prompt,
    has_chat_template,
    pad_right,
    use_chat_template,
)

logger = logging.getLogger(__name__)

TASK_KINDS = ("lm", "facts", "classification", "sft")
HF_PREFIX = "hf:"
# kind -> (validation metric, direction, paper-like default threshold)
_METRICS = {"lm": ("val_loss", "below"), "facts": ("val_accuracy", "above"),
            "classification": ("val_accuracy", "above"), "sft": ("val_loss", "below")}
SFT_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"


@dataclass
class TaskConfig:
    kind: str  # one of TASK_KINDS
    source: str  # local .jsonl/.json/.csv/.txt file, or hf:NAME
    threshold: float | None = None  # stopping threshold on the task's metric (None: train to max_steps)
    # True: ``threshold`` is a factor of the BASE model's validation metric (resolved once per study, before
    # editing, so every edit method and strategy still shares one absolute value)
    relative: bool = False
    n_train: int = 2000  # training records kept after filtering (the facts task: unknown facts to learn)
    n_val: int = 64  # validation records
    max_length: int = 64  # tokens per sequence (longer texts are truncated)
    split: str = "train"  # split of an hf: dataset
    text_field: str = "text"  # lm / classification
    label_field: str = "label"  # classification
    prompt_field: str = "prompt"  # sft
    response_field: str = "response"  # sft
    chat_template: str = "auto"  # sft: auto (the tokenizer's chat template when it has one), on, off
    seed: int = 0

    def __post_init__(self):
        if self.kind not in TASK_KINDS:
            raise InputError(f"unknown downstream task {self.kind!r}; expected one of {TASK_KINDS}")
        if self.chat_template not in CHAT_SETTINGS:
            raise InputError(f"sft chat template {self.chat_template!r}: expected one of {CHAT_SETTINGS}")

    @property
    def name(self) -> str:
        return self.kind

    def stopping(self, max_steps: int, eval_every: int) -> StoppingRule:
        metric, direction = _METRICS[self.kind]
        return StoppingRule(metric, self.threshold, direction, max_steps, eval_every)


def read_records(source: str, split: str = "train") -> list[dict[str, Any]]:
    """Rows of a local JSONL/JSON/CSV/TXT file (TXT: one ``{"text"}`` per non-empty line) or an hf: dataset."""
    if source.startswith(HF_PREFIX):
        from datasets import load_dataset

        return [dict(r) for r in load_dataset(source[len(HF_PREFIX):], split=split)]
    path = Path(source)
    text = read_text(path, "data file")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [{"text": line.strip()} for line in text.splitlines() if line.strip()]
    if suffix == ".csv":
        return list(csv.DictReader(io.StringIO(text, newline="")))
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}, line {e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise InputError(f"{path}: expected a JSON list of records")
        return data
    if suffix == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}, line {i}: invalid JSON ({e})") from e
        return rows
    raise InputError(f"{path}: unsupported downstream data format {suffix!r} (use .jsonl, .json, .csv or .txt)")


def _field(row: dict, key: str, source: str, index: int) -> Any:
    if not isinstance(row, dict) or key not in row or row[key] in (None, ""):
        raise InputError(f"{source}, record {index}: missing field {key!r}")
    return row[key]


@dataclass
class DownstreamTask:
    """A prepared task: filtered training/validation items and how to compute loss and validation metric."""

    config: TaskConfig
    tok: Any
    train_items: list
    val_items: list
    removed: int  # records dropped by the mention filter
    head: nn.Module | None = None  # extra trainable module (the classification head)
    info: dict[str, Any] = field(default_factory=dict)

    def loss(self, model: nn.Module, items: Sequence) -> torch.Tensor:
        raise NotImplementedError

    def validate(self, model: nn.Module) -> float:
        raise NotImplementedError

    def fresh_head(self, model: nn.Module) -> nn.Module | None:
        """A new extra module for a new run (None when the task has none)."""
        return None

    def resolve_threshold(self, base_model: nn.Module) -> None:
        """Turn a relative threshold into an absolute one from the base model's validation metric."""
        if not self.config.relative or self.config.threshold is None:
            return
        self.fresh_head(base_model)
        base_model.eval()
        with torch.no_grad():
            base_value = float(self.validate(base_model))
        self.info.update(base_validation=base_value, threshold_factor=self.config.threshold)
        self.config.threshold = self.config.threshold * base_value
        self.config.relative = False

    def summary_stop(self) -> tuple[str, str, float | None]:
        metric, direction = _METRICS[self.config.kind]
        return metric, direction, self.config.threshold

    def summary(self) -> dict[str, Any]:
        metric, direction = _METRICS[self.config.kind]
        return {"kind": self.config.kind, "source": self.config.source, "metric": metric, "direction": direction,
                "threshold": self.config.threshold, "n_train": len(self.train_items), "n_val": len(self.val_items),
                "removed_by_filter": self.removed, **self.info}


def _mean_nll(model, encoded: list[EncodedPair], pad_id: int, batch_size: int = 8) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(encoded), batch_size):
            batch = pad_right(encoded[i:i + batch_size], pad_id).to(model_device(model))
            nll, _ = per_example_nll(model, batch)
            total, count = total + float(nll.sum()), count + len(nll)
    return total / max(count, 1)


class TextLossTask(DownstreamTask):
    """lm and sft: items are EncodedPairs; loss on their labelled part."""

    def loss(self, model, items):
        batch = pad_right(list(items), self.tok.pad_token_id).to(model_device(model))
        return per_example_nll(model, batch)[0].mean()

    def validate(self, model):
        return _mean_nll(model, self.val_items, self.tok.pad_token_id)


class FactsTask(DownstreamTask):
    """Items are (prompt, true object); loss on the object, accuracy = exact teacher-forced match."""

    def loss(self, model, items):
        batch = pad_right([encode_pair(self.tok, p, t) for p, t in items], self.tok.pad_token_id)
        return per_example_nll(model, batch.to(model_device(model)))[0].mean()

    def validate(self, model):
        scores = score_pairs(model, self.tok, self.val_items, progress=False)
        return sum(s.all_correct for s in scores) / len(scores)


class ClassificationTask(DownstreamTask):
    """Items are (token ids, label); a linear head reads the last real token's final hidden state."""

    def fresh_head(self, model):
        torch.manual_seed(self.config.seed)
        hidden = model.config.get_text_config().hidden_size
        self.head = nn.Linear(hidden, self.info["n_classes"]).to(model_device(model))
        return self.head

    def _logits(self, model, items) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [EncodedPair(tuple(ids), len(ids)) for ids, _ in items]
        batch = pad_right(pairs, self.tok.pad_token_id).to(model_device(model))
        parts = lm_parts(model)
        if parts.body is not None:
            hidden = body_hidden(parts, batch.input_ids, batch.attention_mask)
        else:
            hidden = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           output_hidden_states=True).hidden_states[-1]
        last = batch.attention_mask.sum(1) - 1
        pooled = hidden[torch.arange(len(items), device=hidden.device), last]
        labels = torch.tensor([label for _, label in items], device=hidden.device)
        return self.head(pooled.to(self.head.weight.dtype)), labels

    def loss(self, model, items):
        logits, labels = self._logits(model, items)
        return F.cross_entropy(logits, labels)

    def validate(self, model):
        correct = 0
        with torch.no_grad():
            for i in range(0, len(self.val_items), 16):
                logits, labels = self._logits(model, self.val_items[i:i + 16])
                correct += int((logits.argmax(-1) == labels).sum())
        return correct / len(self.val_items)


def _split(items: list, cfg: TaskConfig, val_in_train: bool = False) -> tuple[list, list]:
    random.Random(cfg.seed).shuffle(items)
    if len(items) < cfg.n_val + (0 if val_in_train else 1):
        raise InputError(f"{cfg.source}: only {len(items)} usable records after filtering; "
                         f"need more than n_val={cfg.n_val}")
    if val_in_train:
        train = items[:cfg.n_train]
        return train, train[:cfg.n_val]
    return items[cfg.n_val:cfg.n_val + cfg.n_train], items[:cfg.n_val]


def _truncate(ids: list[int], n: int) -> list[int]:
    return ids[:n]


def build_task(cfg: TaskConfig, tok, mention_filter: MentionFilter, base_model: nn.Module | None = None,
               exclude_prompts: set[str] | None = None) -> DownstreamTask:
    """Load, filter, encode and split a task's data. ``facts`` needs the BASE model to find unknown facts."""
    if cfg.kind == "facts":
        return _build_facts(cfg, tok, mention_filter, base_model, exclude_prompts or set())
    rows = read_records(cfg.source, cfg.split)
    if cfg.kind == "lm":
        texts = [str(_field(r, cfg.text_field, cfg.source, i)) for i, r in enumerate(rows)]
        kept, removed = mention_filter.keep(texts, str)
        encoded = [EncodedPair(tuple(_truncate(encode_prompt(tok, t), cfg.max_length)), 1) for t in kept]
        train, val = _split([e for e in encoded if len(e.input_ids) > 1], cfg)
        return TextLossTask(cfg, tok, train, val, removed)
    if cfg.kind == "sft":
        return _build_sft(cfg, tok, rows, mention_filter)
    rows_ok = [(str(_field(r, cfg.text_field, cfg.source, i)), _label(r, cfg, i)) for i, r in enumerate(rows)]
    kept, removed = mention_filter.keep(rows_ok, lambda x: x[0])
    labels = sorted({label for _, label in kept})
    if labels != list(range(len(labels))) or len(labels) < 2:
        raise InputError(f"{cfg.source}: field {cfg.label_field!r} must hold integer classes 0..K-1 (K >= 2), "
                         f"got {labels[:10]}")
    items = [(_truncate(encode_prompt(tok, text), cfg.max_length), label) for text, label in kept]
    train, val = _split(items, cfg)
    return ClassificationTask(cfg, tok, train, val, removed, info={"n_classes": len(labels)})


def _label(row: dict, cfg: TaskConfig, index: int) -> int:
    value = row.get(cfg.label_field) if isinstance(row, dict) else None
    if value is None or value == "":
        raise InputError(f"{cfg.source}, record {index}: missing field {cfg.label_field!r}")
    try:
        return int(value)
    except (TypeError, ValueError) as e:
        raise InputError(f"{cfg.source}, record {index}: field {cfg.label_field!r} is not an integer class") from e


def _chat_pair(tok, prompt: str, response: str) -> EncodedPair:
    """User turn + assistant header as the prompt; the assistant's text and end-of-turn marker as the labels."""
    head = chat_prompt(tok, prompt)
    full = tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                                   tokenize=False)
    if not full.startswith(head):
        raise InputError("sft: the tokenizer's chat template does not render the assistant turn after the "
                         "generation prompt; use --sft-chat-template off")
    prompt_ids = encode_prompt(tok, head)
    return EncodedPair(tuple(prompt_ids + list(tok(full[len(head):], add_special_tokens=False)["input_ids"])),
                       len(prompt_ids))


def _sft_pair(tok, prompt: str, response: str, max_length: int, chat: bool) -> EncodedPair | None:
    """Prompt (templated) + response (+ end marker); the prompt is kept whole, the response truncated to fit."""
    pair = _chat_pair(tok, prompt, response) if chat else encode_pair(tok, SFT_TEMPLATE.format(prompt=prompt),
                                                                       response, append_eos=True)
    if pair.target_start >= max_length - 1:
        return None  # no room for any response token
    return EncodedPair(pair.input_ids[:max_length], pair.target_start)


def _build_sft(cfg: TaskConfig, tok, rows: list[dict], mention_filter: MentionFilter) -> TextLossTask:
    """Loss on the response only; through the tokenizer's chat template when it has one (an instruct model)."""
    chat = use_chat_template(tok, [], cfg.chat_template) if cfg.chat_template != "auto" else has_chat_template(tok)
    pairs = [(str(_field(r, cfg.prompt_field, cfg.source, i)), str(_field(r, cfg.response_field, cfg.source, i)))
             for i, r in enumerate(rows)]
    kept, removed = mention_filter.keep(pairs, lambda p: p[0] + "\n" + p[1])
    encoded = [_sft_pair(tok, p, r, cfg.max_length, chat) for p, r in kept]
    train, val = _split([e for e in encoded if e], cfg)
    return TextLossTask(cfg, tok, train, val, removed,
                        info={"template": "chat" if chat else SFT_TEMPLATE, "too_long_prompts": encoded.count(None)})


def _build_facts(cfg: TaskConfig, tok, mention_filter: MentionFilter, base_model, exclude_prompts: set[str]):
    if base_model is None:
        raise InputError("the facts task needs the base model to select facts it does not know")
    facts = [f for f in load_pool_facts(cfg.source, split=cfg.split, skip_invalid=True)
             if f.prompt not in exclude_prompts]
    kept, removed = mention_filter.keep(facts, lambda f: f"{f.prompt} {f.target}")
    random.Random(cfg.seed).shuffle(kept)
    unknown: list[tuple[str, str]] = []
    checked = 0
    # Scan in chunks: only n_train unknown facts are needed, not a verdict on the whole pool.
    for start in range(0, len(kept), 256):
        chunk = [(f.prompt, f.target) for f in kept[start:start + 256]]
        known = knows_batch(base_model, tok, chunk)
        unknown += [pair for pair, k in zip(chunk, known) if not k]
        checked += len(chunk)
        if len(unknown) >= cfg.n_train:
            break
    train, val = _split(unknown[:cfg.n_train], cfg, val_in_train=True)
    return FactsTask(cfg, tok, train, val, removed,
                     info={"checked_for_unknown": checked, "validation": "a fixed sample of the training facts"})


def _pairs(values: list[str], option: str) -> dict[str, str]:
    out = {}
    for v in values:
        key, sep, value = v.partition("=")
        if not sep or key not in TASK_KINDS:
            raise UsageError(f"{option} {v!r}: expected KIND=VALUE with KIND in {TASK_KINDS}")
        out[key] = value
    return out


def parse_tasks(tasks: list[str], thresholds: list[str], common: dict[str, Any]) -> list[TaskConfig]:
    """``--task lm=FILE --threshold lm=3.0`` -> TaskConfigs (shared n_train, n_val, max_length, seed)."""
    sources = _pairs(tasks, "--task")
    if len(sources) != len(tasks):
        raise UsageError("--task: each task kind may be given once")
    limits = _pairs(thresholds, "--threshold")
    unknown = set(limits) - set(sources)
    if unknown:
        raise UsageError(f"--threshold given for tasks not in --task: {sorted(unknown)}")
    missing = [kind for kind in sources if kind not in limits]
    if missing:
        raise UsageError(f"--threshold missing for {missing}: every downstream run stops by its task's threshold "
                         "(KIND=VALUE or KIND=rel:FACTOR)")
    configs = []
    for kind, source in sources.items():
        text = limits.get(kind)
        relative = bool(text and text.startswith("rel:"))
        try:
            value = float(text[4:] if relative else text) if text else None
        except ValueError as e:
            raise UsageError(f"--threshold {kind}={text}: expected a number or rel:FACTOR") from e
        configs.append(TaskConfig(kind, source, threshold=value, relative=relative, **common))
    return configs
