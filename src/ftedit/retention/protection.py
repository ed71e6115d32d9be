"""Protection strategies for downstream fine-tuning: freezing, rehearsal of the edits, and an L2 anchor.

A strategy is one component or several joined by ``+`` (``"edits+anchor:10"``):

* freezing (:mod:`ftedit.retention.freezing`): ``none``, ``edits``, ``below:K``, ``below:edit`` (freeze every
  block up to and including the highest edited layer), ``window:LAYERS`` (train only those blocks) and
  ``around:R`` (freeze the blocks within R layers of an edited layer);
* ``rehearsal[:SHARE]``: a fixed share (default 0.25) of every downstream mini-batch is edit requests' training
  pairs (``prompt -> target_new``), never an evaluation probe (paraphrases, neighbors, intrinsic facts);
* ``anchor[:LAMBDA]``: adds ``LAMBDA * sum ||W - W_edited||^2`` over the edited modules' weights to the loss
  (default LAMBDA 1.0), pulling them back toward the values the edit wrote.

The training loop (:func:`ftedit.retention.finetune.finetune`) asks a :class:`Protection` how many rehearsal
items to put in each batch and for its extra loss; ``undo()`` unfreezes.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ftedit.data.requests import EditRequest
from ftedit.errors import InputError
from ftedit.forward import model_device, per_example_nll
from ftedit.params import find_blocks
from ftedit.retention.freezing import (
    FreezeHandle,
    apply_strategy,
    block_parameter_names,
    freeze_parameters,
    touched_modules,
    touched_parameter_names,
)
from ftedit.tokenization import encode_pair, pad_right

logger = logging.getLogger(__name__)

STRATEGY_HELP = ("none | edits | below:K | below:edit | window:LAYERS | around:R | rehearsal[:SHARE] | "
                 "anchor[:LAMBDA], or several joined by '+'")
DEFAULT_SHARE = 0.25
DEFAULT_LAMBDA = 1.0


def evaluation_prompts(requests: Sequence[EditRequest], probe_prompts: Iterable[str] = ()) -> set[str]:
    """Prompts the study evaluates on besides the edit prompts: paraphrases, neighbors, generation prompts,
    and ``probe_prompts`` (the intrinsic facts)."""
    out = set(probe_prompts)
    for r in requests:
        out |= set(r.paraphrase_prompts) | {n.prompt for n in r.neighborhood} | set(r.generation_prompts)
    return {p.strip() for p in out}


def rehearsal_pairs(requests: Sequence[EditRequest], excluded: set[str]) -> list[tuple[str, str]]:
    """The edits' training pairs ``(prompt, target_new)``, minus any whose prompt is an evaluation prompt."""
    pairs = [(r.prompt, r.target_new) for r in requests if r.prompt.strip() not in excluded]
    dropped = len(requests) - len(pairs)
    if dropped:
        logger.warning("rehearsal: %d edit prompts are also evaluation prompts; not rehearsed", dropped)
    if not pairs:
        raise InputError("rehearsal: no edit request is left to rehearse (every prompt is an evaluation prompt)")
    return pairs


@dataclass
class Rehearsal:
    """Cycles through shuffled training pairs; ``share`` of every mini-batch."""

    pairs: list[tuple[str, str]]
    share: float = DEFAULT_SHARE
    seed: int = 0
    _stream: Iterator[tuple[str, str]] | None = field(default=None, repr=False)

    def __post_init__(self):
        if not 0 < self.share < 1:
            raise InputError(f"rehearsal share must be in (0, 1), got {self.share}")
        if not self.pairs:
            raise InputError("rehearsal: no edit pairs given to rehearse")

    def n_items(self, batch_size: int) -> int:
        """Rehearsal items per mini-batch: ``share`` of it, at least one, and at least one task item left."""
        if batch_size < 2:
            raise InputError("rehearsal needs a downstream batch size of at least 2")
        return min(max(1, round(self.share * batch_size)), batch_size - 1)

    def _cycle(self) -> Iterator[tuple[str, str]]:
        rng = random.Random(self.seed)
        while True:
            order = list(self.pairs)
            rng.shuffle(order)
            yield from order

    def take(self, n: int) -> list[tuple[str, str]]:
        if self._stream is None:
            self._stream = self._cycle()
        return [next(self._stream) for _ in range(n)]


def pair_loss(model: nn.Module, tok, pairs: Sequence[tuple[str, str]]) -> torch.Tensor:
    """Mean NLL of each target given its prompt (the edit objective, without the recipe's extras)."""
    batch = pad_right([encode_pair(tok, p, t) for p, t in pairs], tok.pad_token_id).to(model_device(model))
    return per_example_nll(model, batch)[0].mean()


@dataclass
class L2Anchor:
    """``lam * sum ||W - W_edited||^2`` over ``params``; the anchors are copies taken at construction."""

    params: dict[str, nn.Parameter]
    lam: float = DEFAULT_LAMBDA
    anchors: dict[str, torch.Tensor] = field(init=False)

    def __post_init__(self):
        if self.lam < 0:
            raise InputError(f"anchor lambda must be >= 0, got {self.lam}")
        if not self.params:
            raise InputError("anchor: the edit touched no parameters")
        self.anchors = {n: p.detach().clone() for n, p in self.params.items()}

    def penalty(self) -> torch.Tensor:
        total = sum(((p - self.anchors[n]).float() ** 2).sum() for n, p in self.params.items())
        return self.lam * total

    def distance(self) -> float:
        """``sum ||W - W_edited||^2`` now (no lambda)."""
        with torch.no_grad():
            return float(sum(((p - self.anchors[n]).float() ** 2).sum() for n, p in self.params.items()))


def edited_parameters(model: nn.Module, touched) -> dict[str, nn.Parameter]:
    """The parameters of the modules an edit touched (weights and biases), by name."""
    params = dict(model.named_parameters())
    return {n: params[n] for n in touched_parameter_names(model, touched, remove_duplicate=True)}


@dataclass
class Protection:
    """One parsed strategy applied to a model: frozen parameters, rehearsal, anchor."""

    spec: str
    freeze: list[FreezeHandle] = field(default_factory=list)
    rehearsal: Rehearsal | None = None
    anchor: L2Anchor | None = None

    @property
    def n_frozen(self) -> int:
        return sum(h.n_frozen for h in self.freeze)

    def extra_loss(self) -> torch.Tensor | None:
        return self.anchor.penalty() if self.anchor is not None and self.anchor.lam > 0 else None

    def undo(self) -> None:
        for handle in reversed(self.freeze):
            handle.undo()
        self.freeze = []

    def describe(self) -> dict:
        return {"strategy": self.spec, "frozen_parameters": self.n_frozen,
                "rehearsal": None if self.rehearsal is None else {"share": self.rehearsal.share,
                                                                  "pairs": len(self.rehearsal.pairs)},
                "anchor": None if self.anchor is None else {"lambda": self.anchor.lam,
                                                            "tensors": len(self.anchor.params)}}


def _edited_layers(touched) -> list[int]:
    if touched is None:
        raise InputError("this strategy needs the edit's touched modules (its manifest)")
    layers = sorted({e["layer"] for e in touched_modules(touched) if isinstance(e.get("layer"), int)})
    if not layers:
        raise InputError("the edit's touched modules carry no layer numbers")
    return layers


def freeze_around(model: nn.Module, touched, radius: int) -> FreezeHandle:
    """Freeze every block within ``radius`` layers of an edited layer."""
    per_layer, _ = block_parameter_names(model)
    layers = {i for e in _edited_layers(touched) for i in range(e - radius, e + radius + 1) if i in per_layer}
    names = [n for i in sorted(layers) for n in per_layer[i]]
    return freeze_parameters(model, names, f"around:{radius}")


def _number(kind: str, arg: str, default: float) -> float:
    try:
        return float(arg) if arg else default
    except ValueError as e:
        raise InputError(f"strategy {kind}:{arg}: expected a number") from e


def _freeze(model: nn.Module, kind: str, arg: str, touched) -> FreezeHandle:
    if kind == "around":
        if not arg.isdigit():
            raise InputError(f"strategy around:{arg}: expected a non-negative integer radius")
        return freeze_around(model, touched, int(arg))
    if kind == "below" and arg == "edit":
        _, blocks = find_blocks(model)
        return apply_strategy(model, f"below:{min(max(_edited_layers(touched)) + 1, len(blocks) - 1)}")
    return apply_strategy(model, f"{kind}:{arg}" if arg else kind, touched)


def build_protection(model: nn.Module, spec: str, touched=None, *, rehearse: Sequence[tuple[str, str]] = (),
                     seed: int = 0) -> Protection:
    """Apply ``spec`` to ``model``; ``touched``: the edit's modules, ``rehearse``: pairs rehearsal may use."""
    protection = Protection(spec)
    try:
        for part in spec.split("+"):
            kind, _, arg = part.strip().partition(":")
            if kind == "rehearsal":
                protection.rehearsal = Rehearsal(list(rehearse), _number(kind, arg, DEFAULT_SHARE), seed)
            elif kind == "anchor":
                protection.anchor = L2Anchor(edited_parameters(model, touched), _number(kind, arg, DEFAULT_LAMBDA))
            elif kind in ("none", "edits", "below", "window", "around"):
                protection.freeze.append(_freeze(model, kind, arg, touched))
            else:
                raise InputError(f"unknown protection strategy {part!r} in {spec!r}; expected {STRATEGY_HELP}")
    except Exception:
        protection.undo()
        raise
    return protection
