"""Chat form for instruct models: every prompt of the edits (and of a pool) wrapped in the chat template.

Applied once to the requests, before evaluation and editing, so that training, scoring and generation all see
the same text: user turn = the prompt, assistant turn = the target (see :mod:`ftedit.tokenization`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

from ftedit.data.examples import PoolFact
from ftedit.data.requests import EditRequest, ProbePrompt
from ftedit.tokenization import chat_prompt, use_chat_template

logger = logging.getLogger(__name__)


def chat_request(tok, r: EditRequest) -> EditRequest:
    def wrap(text: str) -> str:
        return chat_prompt(tok, text)

    return dataclasses.replace(
        r, prompt=wrap(r.prompt), paraphrase_prompts=tuple(map(wrap, r.paraphrase_prompts)),
        neighborhood=tuple(ProbePrompt(wrap(n.prompt), n.target) for n in r.neighborhood),
        generation_prompts=tuple(map(wrap, r.generation_prompts)))


def apply_chat_template(tok, requests: Sequence[EditRequest], pool: Sequence[PoolFact] | None = None,
                        setting: str = "auto") -> tuple[list[EditRequest], list[PoolFact] | None, bool]:
    """The requests and pool in chat form when ``setting`` (objective.chat_template) says so, and whether."""
    on = use_chat_template(tok, [r.prompt for r in requests], setting)
    if setting == "auto" and getattr(tok, "chat_template", None):
        logger.info("chat template: %s (objective.chat_template=auto: the tokenizer has one, and %s)",
                    "on" if on else "off",
                    "every edit prompt is a question" if on else "not every edit prompt is a question")
    if not on:
        return list(requests), list(pool) if pool is not None else None, False
    chat_pool = [dataclasses.replace(f, prompt=chat_prompt(tok, f.prompt)) for f in pool] if pool is not None else None
    return [chat_request(tok, r) for r in requests], chat_pool, True
