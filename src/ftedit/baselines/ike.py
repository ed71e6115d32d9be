"""IKE (Zheng et al. 2023, "Can We Edit Factual Knowledge by In-Context Learning?"): in-context editing.

Nothing in the model changes. Each edit becomes a prompt prefix: ``k`` demonstrations drawn from a pool of
COUNTERFACT training-split records, each ``"New Fact: {prompt} {new}\\nPrompt: {probe} {answer}\\n\\n"`` of one
of three kinds (copy: the fact's own prompt; update: a paraphrase, answered with the new target; retain: a
neighborhood prompt, answered with its true target), then ``"New Fact: {prompt} {new}\\nPrompt: "``, after
which the probe prompt is scored.

IKE is single editing by nature: each record is scored with only its own fact in context. :class:`InContextModel`
prepends that record's prefix to the token ids of every sequence (and drops the prefix positions from the
output), and :func:`ftedit.evaluate.evaluate_requests` scores such a model one record at a time, with the same
scoring code as every other method. The probe is tokenized on its own, as the harness tokenizes every prompt,
so the text reads "Prompt: " followed by the probe's tokens.

Differences from the paper: demonstrations are drawn at random (seeded per edit) instead of by sentence-
embedding similarity, and ``k`` defaults to 8 (2 copy, 3 update, 3 retain) instead of 32, for CPU runs.
Pool records that share a case id, subject or any prompt with an edit are never used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

from ftedit.calibration import SHIPPED_POOL, resolve_pool
from ftedit.data.requests import EditRequest, request_hash
from ftedit.errors import InputError
from ftedit.registry import AppliedEdit, ApplyContext
from ftedit.tokenization import encode_prompt

logger = logging.getLogger(__name__)


@dataclass
class IKEHyperParams:
    """How many demonstrations of each kind precede an edit (the paper: 32 in all for GPT-J)."""

    copy: int = 2  # "New Fact: p t / Prompt: p t"
    update: int = 3  # "New Fact: p t / Prompt: paraphrase t"
    retain: int = 3  # "New Fact: p t / Prompt: neighbor its-true-answer"
    seed: int = 0  # seeds each edit's draw of demonstrations (with the edit's hash)


def fact_line(req: EditRequest) -> str:
    return f"New Fact: {req.prompt} {req.target_new}\n"


def _demo(kind: str, r: EditRequest) -> str:
    probe = {"copy": lambda: f"{r.prompt} {r.target_new}",
             "update": lambda: f"{r.paraphrase_prompts[0]} {r.target_new}",
             "retain": lambda: f"{r.neighborhood[0].prompt} {r.neighborhood[0].target}"}[kind]()
    return f"{fact_line(r)}Prompt: {probe}\n\n"


def evaluation_prompts(req: EditRequest) -> set[str]:
    return {req.prompt, *req.paraphrase_prompts, *(nb.prompt for nb in req.neighborhood)}


def usable_pool(pool: Sequence[EditRequest], edits: Sequence[EditRequest]) -> list[EditRequest]:
    """Pool records sharing no case id, subject or prompt with any edit (a demonstration never shows a prompt
    that is scored)."""
    prompts = set().union(*(evaluation_prompts(e) for e in edits))
    subjects = {e.subject for e in edits}
    ids = {e.case_id for e in edits if e.case_id is not None}
    return [r for r in pool if r.case_id not in ids and r.subject not in subjects
            and not evaluation_prompts(r) & prompts]


def demonstrations(req: EditRequest, pool: Sequence[EditRequest], cfg: IKEHyperParams) -> list[str]:
    """``cfg.copy + cfg.update + cfg.retain`` demonstrations from distinct pool records, in a seeded order."""
    rng = random.Random(f"{cfg.seed}:{request_hash(req)}")
    order = rng.sample(range(len(pool)), len(pool))
    kinds = ["copy"] * cfg.copy + ["update"] * cfg.update + ["retain"] * cfg.retain
    rng.shuffle(kinds)
    used: set[int] = set()
    demos = []
    for kind in kinds:
        index = next((i for i in order if i not in used and _has(pool[i], kind)), None)
        if index is None:
            raise InputError(f"IKE: the pool has too few usable records for {len(kinds)} demonstrations "
                             f"({kind} needs {'a paraphrase' if kind == 'update' else 'a neighborhood prompt'})")
        used.add(index)
        demos.append(_demo(kind, pool[index]))
    return demos


def _has(r: EditRequest, kind: str) -> bool:
    return kind == "copy" or (kind == "update" and bool(r.paraphrase_prompts)) or \
        (kind == "retain" and bool(r.neighborhood))


def prefix_text(req: EditRequest, pool: Sequence[EditRequest], cfg: IKEHyperParams) -> str:
    return "".join(demonstrations(req, pool, cfg)) + fact_line(req) + "Prompt: "


class _PrefixedBody(nn.Module):
    """The transformer body of :class:`InContextModel`: hidden states with the prefix positions dropped."""

    def __init__(self, owner: InContextModel):
        super().__init__()
        self.owner = [owner]  # a list: not a submodule (the owner holds this one)

    def forward(self, input_ids, attention_mask, **kwargs):
        owner = self.owner[0]
        ids, mask, start = owner.prepend(input_ids, attention_mask)
        out = owner.model.base_model(input_ids=ids, attention_mask=mask, **kwargs)
        return (out[0][:, start:],)


class InContextModel(nn.Module):
    """``model`` with, inside :meth:`record_context`, that record's prefix before every sequence.

    Outputs cover the caller's positions only: position ``t`` of the result is the model's output at the token
    the caller put at ``t``, read after the prefix. Outside a record's context a forward is an error.
    """

    def __init__(self, model: nn.Module, tok, prefixes: dict[str, str]):
        super().__init__()
        self.model, self.tok, self.prefixes = model, tok, prefixes
        self.body = _PrefixedBody(self)
        self._prefix: list[int] | None = None

    @property
    def config(self):
        return self.model.config

    @property
    def base_model(self) -> nn.Module:
        return self.body

    def get_output_embeddings(self) -> nn.Module:
        return self.model.get_output_embeddings()

    @contextlib.contextmanager
    def record_context(self, req: EditRequest) -> Iterator[None]:
        """Score ``req`` with its own fact (and demonstrations) in context."""
        key = request_hash(req)
        if key not in self.prefixes:
            raise InputError(f"IKE was applied to other edits: no fact in context for {req.prompt!r} -> "
                             f"{req.target_new!r} (case_id {req.case_id})")
        self._prefix = encode_prompt(self.tok, self.prefixes[key])
        try:
            yield
        finally:
            self._prefix = None

    def prepend(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """(ids, mask, first output position to keep): the prefix's ids before every row's (the rows' own BOS
        dropped when the prefix starts with one)."""
        if self._prefix is None:
            raise RuntimeError("an IKE model scores one record at a time: run it through "
                               "ftedit.evaluate.evaluate_requests, or inside record_context(request)")
        bos = self.tok.bos_token_id
        strip = int(bos is not None and self._prefix[0] == bos and bool((input_ids[:, 0] == bos).all()))
        prefix = torch.tensor(self._prefix, device=input_ids.device).expand(input_ids.shape[0], -1)
        ids = torch.cat([prefix, input_ids[:, strip:]], dim=1)
        self._check_length(ids.shape[1])
        mask = torch.cat([torch.ones_like(prefix), attention_mask[:, strip:]], dim=1)
        return ids, mask, prefix.shape[1] - strip

    def _check_length(self, length: int) -> None:
        text = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
        limit = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
        if limit and length > limit:
            raise InputError(f"IKE: prefix ({len(self._prefix)} tokens) plus the scored text is {length} tokens, more "
                             f"than the model's {limit} positions; use fewer demonstrations (copy, update, retain)")

    def forward(self, input_ids, attention_mask, **kwargs):
        ids, mask, start = self.prepend(input_ids, attention_mask)
        return SimpleNamespace(logits=self.model(input_ids=ids, attention_mask=mask, **kwargs).logits[:, start:])


def load_pool(source: str | None) -> list[EditRequest]:
    """The demonstration pool: ``--pool`` (COUNTERFACT records with paraphrase/neighborhood prompts), else the
    shipped train-split pool."""
    from ftedit.data.loaders import load_requests

    return load_requests(resolve_pool(source or SHIPPED_POOL)).requests


def apply_ike_to_model(model: nn.Module, tok, requests: Sequence[EditRequest], hparams: IKEHyperParams,
                       pool: Sequence[EditRequest] | None = None) -> InContextModel:
    """``model`` with each request's prefix, demonstrations drawn from ``pool`` (default: the shipped pool)."""
    usable = usable_pool(load_pool(None) if pool is None else pool, requests)
    logger.info("IKE: %d demonstrations per edit from %d usable pool records",
                hparams.copy + hparams.update + hparams.retain, len(usable))
    return InContextModel(model, tok, {request_hash(r): prefix_text(r, usable, hparams) for r in requests})


def apply_ike(model: nn.Module, tok, requests: Sequence[EditRequest], hparams: IKEHyperParams,
              context: ApplyContext) -> AppliedEdit:
    """The registry's entry point: an :class:`InContextModel` holding each edit's prefix."""
    start = time.perf_counter()
    wrapped = apply_ike_to_model(model, tok, requests, hparams, load_pool(context.pool_source))
    seconds = time.perf_counter() - start
    return AppliedEdit(method="ike", model=wrapped, config=dataclasses.asdict(hparams), touched=[], weights="none",
                       seconds=seconds, restore_weights=lambda: model, seed=hparams.seed,
                       phase_seconds={"edit": seconds},
                       log={"pool": context.pool_source or SHIPPED_POOL,
                            "prefix_tokens": [len(encode_prompt(tok, p)) for p in wrapped.prefixes.values()]})
