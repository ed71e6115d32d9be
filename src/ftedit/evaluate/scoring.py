"""Batched teacher-forced scoring of (prompt, target) pairs.

Each pair is encoded with :func:`ftedit.tokenization.encode_pair` and scored in ONE forward pass over
``prompt + target`` (teacher forcing). Pairs are de-duplicated; pairs that share a prompt share a pass where
causality makes that exact (one-token targets, see :func:`_carriers`); sequences are sorted by length (little
padding), right-padded with :func:`ftedit.tokenization.pad_right`, and the LM head is applied only at the
positions that predict a target token: the transformer body gives hidden states, and the output embedding (plus Gemma-style final logit
soft-capping) turns just the gathered positions into logits. With a 262k vocabulary that head is most of the
cost of a full forward, so skipping it elsewhere is where the speed comes from.

Under bf16 autocast (:mod:`ftedit.precision`: the default on CPUs with bf16 units) the log-softmax stays fp32,
and every pair whose outcome bf16 rounding could change (:func:`near_ties`) is scored again in fp32, so the
success rates and accuracies are those of fp32 scoring.

The split into body and head is checked once per model against ``model(...).logits``; a model whose head does
something else (an unknown logit scale, say) falls back to the full forward, with a warning.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ftedit.forward import LMParts, apply_head, body_hidden, lm_parts, model_device
from ftedit.precision import autocast, scoring_autocast, scoring_context
from ftedit.tokenization import EncodedPair, encode_pair, encode_prompt, pad_right

logger = logging.getLogger(__name__)

#: Log-prob margin below which a decision made under bf16 autocast is made again in fp32: a pair's target
#: against the best other token (argmax accuracy), or two compared pairs' NLLs (ES/PS/NS). On 300 records of
#: COUNTERFACT's train split bf16 moved nll_new - nll_true by at most 0.27 on gemma-3-270m (median 0.03;
#: benchmarks/bf16_agreement.py): twice that, rounded up to 0.05.
NEAR_TIE = 0.55

#: Positions per LM-head call: bounds the [positions, vocab] logits block (256 x 262144 fp32 = 268 MB).
HEAD_CHUNK = 256


@dataclass(frozen=True)
class PairScore:
    """Per-target-token log-probabilities and teacher-forced argmax of one (prompt, target) pair."""

    target_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    argmax_ids: tuple[int, ...]

    @property
    def nll(self) -> float:
        """Mean over target tokens of -log P (the MEMIT/ROME ``*_probs`` value)."""
        return -sum(self.logprobs) / len(self.logprobs)

    @property
    def mean_token_prob(self) -> float:
        """``exp(-nll)``: the geometric mean of the per-token probabilities."""
        return math.exp(-self.nll)

    @property
    def token_correct(self) -> tuple[bool, ...]:
        return tuple(a == t for a, t in zip(self.argmax_ids, self.target_ids))

    @property
    def token_accuracy(self) -> float:
        correct = self.token_correct
        return sum(correct) / len(correct)

    @property
    def all_correct(self) -> bool:
        """Every target token is the argmax: equivalently, greedy decoding reproduces the target."""
        return all(self.token_correct)


@dataclass(frozen=True)
class NextToken:
    token_id: int
    token: str
    prob: float


def _position_logits(model, parts: LMParts, input_ids, attention_mask, rows, cols) -> Iterator[torch.Tensor]:
    """Float32 logits at positions ``(rows[i], cols[i])``, yielded in chunks of at most HEAD_CHUNK."""
    if parts.body is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        selected = logits[rows, cols]
        for start in range(0, len(rows), HEAD_CHUNK):
            yield selected[start:start + HEAD_CHUNK].float()
        return
    hidden = body_hidden(parts, input_ids, attention_mask)[rows, cols]
    for start in range(0, len(rows), HEAD_CHUNK):
        yield apply_head(parts, hidden[start:start + HEAD_CHUNK])


def _length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first (an OOM shows up on the first batch)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@dataclass
class _Carrier:
    """One sequence to run, and the (position, token, pair, token index) predictions to read from it."""

    ids: tuple[int, ...]
    queries: list[tuple[int, int, int, int]]


def _carriers(pairs: Sequence[EncodedPair]) -> list[_Carrier]:
    """Sequences covering every pair's predictions, one per distinct prompt where possible.

    A one-token target is predicted at the prompt's last position, which (causal attention) is the same with
    or without any continuation: so every one-token target of a prompt is read from a single sequence -- that
    of one of the prompt's longer targets, or the bare prompt. Longer targets get their own prompt + target.
    """
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for k, p in enumerate(pairs):
        by_prompt.setdefault(p.input_ids[:p.target_start], []).append(k)
    carriers = []
    for prompt, members in by_prompt.items():
        last = len(prompt) - 1  # the position that predicts a target's first token
        group = [_Carrier(pairs[k].input_ids, [(last + i, t, k, i) for i, t in enumerate(pairs[k].target_ids)])
                 for k in members if pairs[k].target_len > 1] or [_Carrier(prompt, [])]
        group[0].queries += [(last, pairs[k].target_ids[0], k, 0) for k in members if pairs[k].target_len == 1]
        carriers += group
    return carriers


def _run_batch(model, parts, batch: Sequence[_Carrier], pad_token_id: int, out: _Flat, starts: Sequence[int],
               bf16: bool) -> None:
    """Forward one batch of carriers; write target log-probs, argmax and (``bf16``) argmax margins into
    ``out`` (pair ``k``'s token ``i`` lives at ``starts[k] + i``)."""
    padded = pad_right([EncodedPair(c.ids, len(c.ids)) for c in batch], pad_token_id).to(model_device(model))
    queries = [(row, *q) for row, c in enumerate(batch) for q in c.queries]
    device = padded.input_ids.device
    rows = torch.tensor([q[0] for q in queries], device=device)
    cols = torch.tensor([q[1] for q in queries], device=device)
    targets = torch.tensor([q[2] for q in queries], device=device)
    where = torch.tensor([starts[q[3]] + q[4] for q in queries])
    # under bf16 the one-token targets of a prompt share one head row and softmax; fp32 keeps a row per query,
    # since a head matmul over fewer rows rounds differently (fp32 scores stay bit-identical across versions)
    width = padded.input_ids.shape[1]
    flat = rows * width + cols
    positions, inverse = torch.unique(flat, return_inverse=True) if bf16 else \
        (flat, torch.arange(len(flat), device=device))
    for start, logits in zip(range(0, len(positions), HEAD_CHUNK), _position_logits(
            model, parts, padded.input_ids, padded.attention_mask, positions // width, positions % width)):
        mine = ((inverse >= start) & (inverse < start + len(logits))).nonzero().squeeze(1)
        local, chunk_targets, dest = inverse[mine] - start, targets[mine], where[mine.cpu()]
        logp = torch.log_softmax(logits, dim=-1)
        target_lp = logp[local, chunk_targets]
        out.lp[dest] = target_lp.double().cpu()
        out.am[dest] = logits.argmax(dim=-1)[local].cpu()
        if bf16:  # distance of the target's argmax decision from flipping: to the best other token
            top = logp.topk(2, dim=-1)
            best_other = torch.where(top.indices[local, 0] == chunk_targets, top.values[local, 1],
                                     top.values[local, 0])
            out.margin[dest] = (target_lp - best_other).abs().double().cpu()


@dataclass
class _Flat:
    """Per target token of every distinct pair, flat: log-prob, argmax and argmax margin."""

    lp: torch.Tensor
    am: torch.Tensor
    margin: torch.Tensor

    @classmethod
    def zeros(cls, n: int) -> _Flat:
        return cls(torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.long),
                   torch.full((n,), math.inf, dtype=torch.float64))


def _offsets(pairs: Sequence[EncodedPair]) -> list[int]:
    starts = [0]
    for p in pairs:
        starts.append(starts[-1] + p.target_len)
    return starts


def _score_distinct(model, parts: LMParts, distinct: Sequence[EncodedPair], pad_token_id: int, batch_size: int,
                    progress: bool, desc: str, bf16: bool = False) -> tuple[list[PairScore], list[float]]:
    """Scores of distinct pairs and (``bf16``; else inf) each pair's smallest argmax margin: the log-prob of
    the target against the best other token."""
    starts = _offsets(distinct)
    out = _Flat.zeros(starts[-1])
    carriers = _carriers(distinct)
    for idx in tqdm(_length_batches([len(c.ids) for c in carriers], batch_size), desc=desc,
                    disable=not progress, unit="batch"):
        _run_batch(model, parts, [carriers[i] for i in idx], pad_token_id, out, starts, bf16)
    flat_lp, flat_am, flat_margin = out.lp.tolist(), out.am.tolist(), out.margin.tolist()
    scores = [PairScore(p.target_ids, tuple(flat_lp[a:b]), tuple(flat_am[a:b]))
              for p, a, b in zip(distinct, starts, starts[1:])]
    return scores, [min(flat_margin[a:b]) for a, b in zip(starts, starts[1:])]


def near_ties(scores: Sequence[PairScore], margins: Sequence[float], compare: Sequence[tuple[int, int]],
              threshold: float | None = None) -> list[int]:
    """Pairs whose outcome bf16 rounding could change: an argmax margin below ``threshold`` (default
    :data:`NEAR_TIE`), or a compared pair (``compare``: index pairs whose NLLs a metric compares) whose NLLs
    differ by less than it."""
    threshold = NEAR_TIE if threshold is None else threshold
    out = {k for k, m in enumerate(margins) if m < threshold}
    for a, b in compare:
        if abs(scores[a].nll - scores[b].nll) < threshold:
            out |= {a, b}
    return sorted(out)


@torch.no_grad()  # not inference_mode: FSDP reuses the gathered weights in training
def score_encoded(
    model,
    pairs: Sequence[EncodedPair],
    pad_token_id: int,
    *,
    batch_size: int = 32,
    progress: bool = False,
    desc: str = "scoring",
    compare: Sequence[tuple[int, int]] = (),
    rescore: bool = True,
    stats: dict | None = None,
) -> list[PairScore]:
    """Score encoded pairs; results in input order. ``batch_size``: sequences per forward pass.

    Every pair needs a non-empty prompt (the first target token must be predicted from something) and at least
    one target token. The model's train/eval mode is left as it is: callers evaluate in eval mode.

    Under bf16 autocast (:func:`ftedit.precision.scoring_autocast`), the near-ties (:func:`near_ties`; ``compare``
    holds the indices of pairs whose NLLs a metric compares) are scored again in fp32, unless ``rescore`` is
    off. ``stats``, if given, receives the precision and the number of pairs scored and re-scored.
    """
    unique: dict[EncodedPair, int] = {}
    for p in pairs:
        if p.target_len < 1 or p.target_start < 1:
            raise ValueError(f"pair {p.input_ids} (target from {p.target_start}) needs a prompt token and a "
                             "target token")
        unique.setdefault(p, len(unique))
    distinct = list(unique)
    parts = lm_parts(model)  # verified outside autocast
    device, bf16 = model_device(model), scoring_autocast(model)
    with scoring_context(model, bf16):
        scores, margins = _score_distinct(model, parts, distinct, pad_token_id, batch_size, progress, desc, bf16)
    redo = near_ties(scores, margins, [(unique[pairs[a]], unique[pairs[b]]) for a, b in compare]) \
        if bf16 and rescore else []
    if redo:
        with autocast(device, False):
            exact, _ = _score_distinct(model, parts, [distinct[k] for k in redo], pad_token_id, batch_size,
                                       False, desc)
        for k, score in zip(redo, exact, strict=True):
            scores[k] = score
    if bf16:
        logger.info("%s: scored %d pairs under bf16 autocast, re-scored %d near-ties in fp32", desc,
                    len(distinct), len(redo))
    if stats is not None:
        stats.update(bf16=bf16, pairs=len(distinct), rescored=len(redo))
    return [scores[unique[p]] for p in pairs]


def score_pairs(
    model,
    tok,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int = 32,
    progress: bool = False,
    append_eos: bool = False,
    desc: str = "scoring",
    compare: Sequence[tuple[int, int]] = (),
    stats: dict | None = None,
) -> list[PairScore]:
    """Score ``(prompt, target)`` pairs with ftedit's tokenization conventions (one leading space, BOS per
    tokenizer). ``compare`` and ``stats``: see :func:`score_encoded`."""
    encoded = [encode_pair(tok, prompt, target, append_eos) for prompt, target in pairs]
    return score_encoded(model, encoded, tok.pad_token_id, batch_size=batch_size, progress=progress, desc=desc,
                         compare=compare, stats=stats)


@torch.no_grad()  # not inference_mode: FSDP reuses the gathered weights in training
def next_token_batches(model, tok, prompts: Sequence[str], *, batch_size: int = 32) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield ``(prompt indices, float32 next-token probabilities [len(indices), vocab])`` batch by batch."""
    parts = lm_parts(model)
    encoded = [EncodedPair(tuple(ids), len(ids)) for ids in (encode_prompt(tok, p) for p in prompts)]
    for idx in _length_batches([len(e.input_ids) for e in encoded], batch_size):
        padded = pad_right([encoded[i] for i in idx], tok.pad_token_id).to(model_device(model))
        rows = torch.arange(len(idx), device=padded.input_ids.device)
        cols = padded.attention_mask.sum(1) - 1
        yield idx, torch.cat([torch.softmax(lg, dim=-1) for lg in _position_logits(
            model, parts, padded.input_ids, padded.attention_mask, rows, cols)])


def next_token_topk(model, tok, prompts: Sequence[str], k: int = 5, *, batch_size: int = 32) -> list[list[NextToken]]:
    """The ``k`` most probable next tokens after each prompt (full softmax over the vocabulary), most probable first."""
    result: list[list[NextToken]] = [[] for _ in prompts]
    for idx, probs in next_token_batches(model, tok, prompts, batch_size=batch_size):
        top = torch.topk(probs, k, dim=-1)
        for row, i in enumerate(idx):
            result[i] = [NextToken(int(t), tok.decode([int(t)]), float(p))
                         for p, t in zip(top.values[row].tolist(), top.indices[row].tolist())]
    return result
