"""MALMEN (Tan et al. 2024, "Massive Editing for Large Language Models via Meta Learning"): the editor network
maps each token's gradient factors to a value shift ``d_t = −lr · δ̃_t``, and the shifts of all requests are
aggregated by least squares: ``ΔW = argmin_S Σ_t ||S u_t − d_t||² + λ||S||²``, the solution of the normal
equation ``(UᵀU + λI) ΔWᵀ = Uᵀ D`` (:func:`~ftedit.baselines.hypernet.normal_equation_shift`), instead of
MEND's sum. Training backpropagates through the solve (the paper decouples it to save memory).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ftedit.baselines.common import method_entry
from ftedit.baselines.hypernet import Factors, Hypernet, NetConfig, Shift, normal_equation_shift
from ftedit.baselines.hypernet_train import TrainConfig, apply_hypernet


def _malmen_train() -> TrainConfig:
    return TrainConfig(batch_size=8)  # the least-squares aggregation is what MALMEN trains: several edits a step


@dataclass
class MALMENHyperParams:
    """MALMEN's settings. ``editor``: a trained editor file; empty: the cached one for this model and settings."""

    net: NetConfig = field(default_factory=NetConfig)
    train: TrainConfig = field(default_factory=_malmen_train)
    lam: float = 0.1  # λ, relative to the mean squared norm of the keys (scale-free across layers)
    editor: str = ""
    seed: int = 0  # torch's seed before the model is loaded and edited (`ftedit edit --seed`)


def malmen_shifts(net: Hypernet, factors: Sequence[Factors], hparams: MALMENHyperParams) -> list[Shift]:
    """Each edited weight's least-squares shift mapping every key ``u_t`` to its value shift."""
    shifts = []
    for i, f in enumerate(factors):
        _, delta = net.transform(i, f.u, f.delta)
        lam = hparams.lam * f.u.pow(2).sum(1).mean().clamp_min(1e-12)
        shifts.append(Shift(matrix=normal_equation_shift(f.u, -net.lr(i) * delta, lam.item())))
    return shifts


def apply_malmen_to_model(model, tok, requests, hparams: MALMENHyperParams, *, fingerprint: str = "",
                          progress: bool = True):
    """Apply MALMEN to ``model`` in place (all requests in one solve); return the undo snapshot, targets, log."""
    return apply_hypernet("malmen", malmen_shifts, model, tok, requests, hparams, fingerprint, progress)


apply_malmen = method_entry("malmen", apply_malmen_to_model)
