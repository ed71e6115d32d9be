"""MEND (Mitchell et al. 2022, "Fast Model Editing at Scale"): a trained editor network maps each edited
weight's gradient factors ``(u_t, δ_t)`` to ``(ũ_t, δ̃_t)``; the edit is ``ΔW = −lr · Σ_t δ̃_t ũ_tᵀ`` over
every token of every request (the paper's batched edit: the shifts of several edits add up).

The editor is trained beforehand with ``ftedit train-editor --method mend`` (see
:mod:`ftedit.baselines.hypernet_train`); editing itself is one forward/backward per batch of requests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ftedit.baselines.common import method_entry
from ftedit.baselines.hypernet import Factors, Hypernet, NetConfig, Shift
from ftedit.baselines.hypernet_train import TrainConfig, apply_hypernet


@dataclass
class MENDHyperParams:
    """MEND's settings. ``editor``: a trained editor file; empty: the cached one for this model and settings."""

    net: NetConfig = field(default_factory=NetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    editor: str = ""
    seed: int = 0  # torch's seed before the model is loaded and edited (`ftedit edit --seed`)


def mend_shifts(net: Hypernet, factors: Sequence[Factors], hparams: MENDHyperParams) -> list[Shift]:
    """``ΔW_i = −lr_i · Σ_t δ̃_t ũ_tᵀ`` for each edited weight, kept in factored form."""
    shifts = []
    for i, f in enumerate(factors):
        u, delta = net.transform(i, f.u, f.delta)
        shifts.append(Shift(keys=u, values=-net.lr(i) * delta))
    return shifts


def apply_mend_to_model(model, tok, requests, hparams: MENDHyperParams, *, fingerprint: str = "",
                        progress: bool = True):
    """Apply MEND to ``model`` in place (all requests at once); return the undo snapshot, targets and a log."""
    return apply_hypernet("mend", mend_shifts, model, tok, requests, hparams, fingerprint, progress)


apply_mend = method_entry("mend", apply_mend_to_model)
