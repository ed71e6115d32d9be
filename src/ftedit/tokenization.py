"""Prompt/target tokenization: the one place where ftedit decides spaces, BOS, EOS and padding.

Conventions (the MEMIT/ROME protocol, which the published tables use):

* A prompt is encoded with the tokenizer's default special tokens, so it starts with BOS exactly when the
  tokenizer adds one (Gemma, Llama: yes; GPT-2: no). A trailing EOS that some tokenizers append is removed.
* A target is encoded *separately* as ``" " + target`` with no special tokens: one leading space (kept as is
  when the target already starts with whitespace), never a BOS inside the target.
* ``prompt_ids + target_ids`` is scored in one forward pass; the logits at position ``len(prompt_ids) - 1 + i``
  predict target token ``i``.
* EOS after the target is opt-in (``append_eos=True``), for training recipes that want it (LocFT does).
* Batches are right-padded; padded positions carry ``attention_mask = 0`` and ``labels = -100``.
* Chat form (instruct models, ``objective.chat_template``): the prompt becomes the tokenizer's chat template
  around one user turn, ending with the assistant header; the target follows it with no added space, and the
  templated text brings its own BOS, so none is added again.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


def with_leading_space(target: str) -> str:
    """The text of a target as it follows a prompt: exactly one leading space unless it already has one."""
    return target if target[:1].isspace() else " " + target


def encode_prompt(tok, prompt: str) -> list[int]:
    templated = bool(tok.bos_token) and prompt.startswith(tok.bos_token)  # a chat template wrote the BOS
    ids = list(tok(prompt, add_special_tokens=not templated)["input_ids"])
    if tok.eos_token_id is not None and len(ids) > 1 and ids[-1] == tok.eos_token_id and not prompt.endswith(
        tok.eos_token or "\0"
    ):
        ids = ids[:-1]
    return ids


def encode_target(tok, target: str, append_eos: bool = False, leading_space: bool = True) -> list[int]:
    ids = list(tok(with_leading_space(target) if leading_space else target, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ValueError(f"target {target!r} encodes to no tokens")
    if append_eos:
        if tok.eos_token_id is None:
            raise ValueError("append_eos=True but the tokenizer has no EOS token")
        ids.append(tok.eos_token_id)
    return ids


@dataclass(frozen=True)
class EncodedPair:
    """``input_ids = prompt_ids + target_ids``; the target occupies ``[target_start, len(input_ids))``."""

    input_ids: tuple[int, ...]
    target_start: int

    @property
    def target_ids(self) -> tuple[int, ...]:
        return self.input_ids[self.target_start:]

    @property
    def target_len(self) -> int:
        return len(self.input_ids) - self.target_start


def encode_pair(tok, prompt: str, target: str, append_eos: bool = False) -> EncodedPair:
    prompt_ids = encode_prompt(tok, prompt)
    if not prompt_ids:
        raise ValueError(f"prompt {prompt!r} encodes to no tokens: the first target token would have no context")
    target_ids = encode_target(tok, target, append_eos, leading_space=not prompt[-1:].isspace())
    return EncodedPair(tuple(prompt_ids + target_ids), len(prompt_ids))


def encode_text(tok, text: str) -> EncodedPair:
    """A whole text as one sequence for full-likelihood (naive) training: every token after the first is a label."""
    ids = encode_prompt(tok, text)
    return EncodedPair(tuple(ids), 1)


CHAT_SETTINGS = ("auto", "on", "off")


def has_chat_template(tok) -> bool:
    return bool(getattr(tok, "chat_template", None))


def chat_prompt(tok, text: str) -> str:
    """``text`` as one user turn of the tokenizer's chat template, followed by the assistant's header."""
    return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


def is_question(text: str) -> bool:
    return text.rstrip().endswith("?")


def use_chat_template(tok, prompts: Sequence[str], setting: str = "auto") -> bool:
    """Whether prompts go through the chat template: ``on``/``off``, or ``auto``: the tokenizer has a chat
    template (an instruct model) and every prompt is a question, so the answer is an assistant turn."""
    if setting not in CHAT_SETTINGS:
        raise ValueError(f"objective.chat_template {setting!r} is not one of {CHAT_SETTINGS}")
    if setting == "on" and not has_chat_template(tok):
        raise ValueError("objective.chat_template=on but the tokenizer has no chat template")
    if setting != "auto":
        return setting == "on"
    return has_chat_template(tok) and bool(prompts) and all(is_question(p) for p in prompts)


@dataclass
class PaddedBatch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T], -100 outside targets; labels[b, t] is the token predicted at t-1

    def to(self, device) -> PaddedBatch:
        return PaddedBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def pad_right(pairs: Sequence[EncodedPair], pad_token_id: int) -> PaddedBatch:
    """Right-pad encoded pairs into tensors. ``labels`` hold target tokens only (prompt masked)."""
    width = max(len(p.input_ids) for p in pairs)
    ids = torch.full((len(pairs), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    labels = torch.full((len(pairs), width), IGNORE_INDEX, dtype=torch.long)
    for row, p in enumerate(pairs):
        n = len(p.input_ids)
        ids[row, :n] = torch.tensor(p.input_ids)
        mask[row, :n] = 1
        labels[row, p.target_start:n] = torch.tensor(p.input_ids[p.target_start:])
    return PaddedBatch(ids, mask, labels)


@contextmanager
def left_padded(tok):
    """Temporarily pad on the left, as batched ``generate`` requires."""
    old = tok.padding_side
    tok.padding_side = "left"
    try:
        yield tok
    finally:
        tok.padding_side = old
