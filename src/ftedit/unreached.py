"""Edits an edit run did not reach: one scoring pass over the edits' own prompts after applying them.

An edit is *reached* when its own prompt now prefers the new target:

* with ``target_true`` (COUNTERFACT): ``NLL(prompt, target_new) < NLL(prompt, target_true)``, the efficacy
  criterion of the ROME/MEMIT protocol;
* without it (ZsRE, users' prompt/target rows): greedy decoding reproduces ``target_new``, i.e. every one of
  its tokens is the teacher-forced argmax (the strict form of ZsRE's token accuracy).

Paraphrases and neighbors are not looked at: an edit that does not even hold on the prompt it was trained
on points at the training budget or the location, not at generalization. Any method can be checked.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ftedit.config import EditConfig
from ftedit.data.requests import EditRequest
from ftedit.evaluate.scoring import score_pairs

logger = logging.getLogger(__name__)

CRITERION = ("target_true given: NLL(prompt, target_new) < NLL(prompt, target_true); otherwise greedy decoding "
             "of the prompt reproduces target_new")
LISTED = 5  # unreached edits named in the warning
RECORDED = 100  # unreached edits listed in the manifest (the count covers all)


@dataclass(frozen=True)
class Unreached:
    """An edit whose own prompt does not prefer its new target after editing."""

    index: int  # position in the edit run's requests
    case_id: str | int | None
    prompt: str
    target_new: str
    target_true: str | None
    nll_new: float
    nll_true: float | None  # None without target_true (then the greedy continuation differs from target_new)

    def describe(self) -> str:
        if self.nll_true is None:
            return f"{self.prompt!r} -> {self.target_new!r} (not the greedy continuation, NLL {self.nll_new:.2f})"
        return (f"{self.prompt!r} -> {self.target_new!r} (still prefers {self.target_true!r}: NLL "
                f"{self.nll_new:.2f} vs {self.nll_true:.2f})")


def unreached_edits(model, tok, requests: Sequence[EditRequest], *, batch_size: int = 32) -> list[Unreached]:
    """The edits in ``requests`` that ``model`` does not carry on their own prompts (see the module docstring)."""
    pairs, slots = [], []
    for req in requests:
        slots.append(len(pairs))
        pairs.append((req.prompt, req.target_new))
        if req.target_true:
            pairs.append((req.prompt, req.target_true))
    compare = [(slot, slot + 1) for req, slot in zip(requests, slots) if req.target_true]
    scores = score_pairs(model, tok, pairs, batch_size=batch_size, desc="reached?", compare=compare)
    missed = []
    for i, (req, slot) in enumerate(zip(requests, slots)):
        new = scores[slot]
        true = scores[slot + 1] if req.target_true else None
        if (true is not None and not new.nll < true.nll) or (true is None and not new.all_correct):
            missed.append(Unreached(i, req.case_id, req.prompt, req.target_new, req.target_true, new.nll,
                                    true.nll if true is not None else None))
    return missed


def suggestion(config: Any) -> str:
    """What to change, in the terms of the method's config."""
    if not isinstance(config, EditConfig):
        return _closed_form_suggestion(config)
    t = config.train
    budget = f"train.steps_per_edit, now {t.steps_per_edit}" if t.pipeline == "depth" else \
        f"train.epochs, now {t.epochs}"
    return (f"more training ({budget}), a higher learning rate (train.lr, now {t.lr:g}), or another "
            f"location (params.layers={config.params.layers} params.modules={config.params.modules}; "
            "see `ftedit locate`)")


def _closed_form_suggestion(config: Any) -> str:
    """ROME/MEMIT/AlphaEdit: the target vectors' optimization (``value``) and the edited layer(s)."""
    value = getattr(config, "value", None)
    optimize = (f"more optimization of the target vectors (value.steps, now {value.steps}; value.lr, now "
                f"{value.lr:g})") if value is not None else "more optimization of the target vectors"
    where = next((f"{name}={getattr(config, name)}" for name in ("layers", "layer") if hasattr(config, name)), "")
    return f"{optimize}, or another location ({where or 'the edited layers'}; see `ftedit locate`)"


def check_reached(model, tok, requests: Sequence[EditRequest], config: Any, *, warn: bool = True) -> dict[str, Any]:
    """Score the edits' own prompts; warn when some are unreached. Returns the manifest's ``unreached`` section."""
    missed = unreached_edits(model, tok, requests)
    if missed and warn:
        names = "\n  ".join(m.describe() for m in missed[:LISTED])
        more = f"\n  ... and {len(missed) - LISTED} more (manifest.json: unreached)" if len(missed) > LISTED else ""
        logger.warning("%d of %d edits unreached: their own prompt does not prefer the new target after "
                       "editing:\n  %s%s\nTry %s.", len(missed), len(requests), names, more, suggestion(config))
    return {"n": len(missed), "of": len(requests), "criterion": CRITERION,
            "edits": [asdict(m) for m in missed[:RECORDED]]}
