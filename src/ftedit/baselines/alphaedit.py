"""AlphaEdit (Fang et al. 2025, "AlphaEdit: Null-Space Constrained Knowledge Editing"): MEMIT whose update
is projected onto the null space of the preserved knowledge's keys.

``P = U₀ U₀ᵀ`` with ``U₀`` the eigenvectors of ``C = E[k kᵀ]`` whose eigenvalues are below
``nullspace_threshold``; preserved keys ``k₀`` satisfy ``P k₀ ≈ 0``. Per layer of the band:
``ΔWᵀ = (P (K Kᵀ + K_p K_pᵀ) + α I)⁻¹ P K Rᵀ``, where ``K_p`` are the keys of edits made in earlier
sequential batches. The solution lies in P's range, so ``ΔW k₀ = ΔW P k₀ ≈ 0``: preserved keys map to
the same values as before.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ftedit.baselines.common import (
    Snapshot,
    ValueConfig,
    context_prefixes,
    method_entry,
)
from ftedit.baselines.memit import band_targets, spread_over_layers, target_values
from ftedit.baselines.stats import StatsConfig, mom2
from ftedit.data.requests import EditRequest
from ftedit.params import Target

logger = logging.getLogger(__name__)


def _alphaedit_value() -> ValueConfig:
    # AlphaEdit's GPT-2 XL setting: 20 steps at lr 0.5, weight decay 0.5, norm clamp 0.75, KL factor 0.0625.
    return ValueConfig(steps=20, lr=0.5, weight_decay=0.5, clamp_norm_factor=0.75)


@dataclass
class AlphaEditHyperParams:
    """AlphaEdit's hyperparameters (defaults: the paper's GPT-2 XL configuration, the smallest model it
    reports; its Llama3-8B setting differs only in value.steps=25, value.lr=0.1; band as in MEMIT)."""

    layers: str = "frac:0.15:0.4"  # edited down projections, as MEMITHyperParams.layers
    nullspace_threshold: float = 2e-2  # eigenvalues of C below this span the preserved keys' null space
    l2: float = 10.0  # α, the ridge term that keeps the projected system invertible
    batch_size: int = 0  # edits per sequential batch (0: all at once); later batches preserve earlier edits
    value: ValueConfig = field(default_factory=_alphaedit_value)
    stats: StatsConfig = field(default_factory=StatsConfig)
    seed: int = 0  # torch's seed before the model is loaded and edited (`ftedit edit --seed`)


def null_space_projection(cov: torch.Tensor, threshold: float) -> torch.Tensor:
    """``U₀ U₀ᵀ`` for the eigenvectors of the symmetric ``cov`` with eigenvalue below ``threshold``."""
    eigenvalues, vectors = torch.linalg.eigh(cov.double())
    small = vectors[:, eigenvalues < threshold]
    return small @ small.T


def projected_update(keys: torch.Tensor, residuals: torch.Tensor, projection: torch.Tensor,
                     previous: torch.Tensor, l2: float) -> torch.Tensor:
    """AlphaEdit's ``ΔW`` ([d_out, d_in]) for keys ``[d_in, n]`` and residuals ``[d_out, n]``."""
    keys, residuals = keys.double(), residuals.double()
    system = projection @ (keys @ keys.T + previous) + l2 * torch.eye(keys.shape[0], dtype=torch.float64)
    return torch.linalg.solve(system, projection @ keys @ residuals.T).T


@dataclass
class AlphaEditState:
    """What sequential batches carry: per layer, the null-space projection and ``K_p K_pᵀ`` of past edits."""

    projections: dict[int, torch.Tensor] = field(default_factory=dict)
    previous: dict[int, torch.Tensor] = field(default_factory=dict)


def apply_alphaedit_to_model(model: nn.Module, tok, requests: Sequence[EditRequest],
                             hparams: AlphaEditHyperParams, *, fingerprint: str = "", progress: bool = True,
                             state: AlphaEditState | None = None) -> tuple[Snapshot, list[Target], dict]:
    """Apply AlphaEdit in place, in sequential batches of ``hparams.batch_size``. Pass the returned log's
    ``"state"`` (``AppliedEdit.log["state"]``) back as ``state`` to continue editing the same model while
    preserving these edits."""
    targets = band_targets(model, hparams.layers)
    snapshot = Snapshot(model)
    for t in targets:
        snapshot.keep(t)
    state = state or AlphaEditState()
    missing = [t for t in targets if t.layer not in state.projections]
    if missing:
        covs = mom2(model, tok, missing, hparams.stats, fingerprint, progress)
        for t in missing:
            state.projections[t.layer] = null_space_projection(covs[t.layer], hparams.nullspace_threshold)
            state.previous[t.layer] = torch.zeros_like(state.projections[t.layer])
            logger.info("layer %d: null space of dimension %d of %d", t.layer,
                        round(torch.trace(state.projections[t.layer]).item()), covs[t.layer].shape[0])
    prefixes = context_prefixes(model, tok, hparams.value)
    size = hparams.batch_size or len(requests)
    log: dict[str, Any] = {"prefixes": prefixes, "batches": [], "state": state,
                           "null_space_dims": {t.layer: round(torch.trace(state.projections[t.layer]).item())
                                               for t in targets}}

    def solve(i: int, target: Target, keys: torch.Tensor, residuals: torch.Tensor) -> torch.Tensor:
        batch_keys[target.layer] = keys
        return projected_update(keys, residuals, state.projections[target.layer], state.previous[target.layer],
                                hparams.l2)

    try:
        for start in range(0, len(requests), size):
            batch = list(requests[start:start + size])
            batch_keys: dict[int, torch.Tensor] = {}
            zs, values = target_values(model, tok, batch, prefixes, targets[-1].layer, hparams.value, progress)
            layers = spread_over_layers(model, tok, batch, prefixes, targets, zs, solve)
            for layer, keys in batch_keys.items():
                state.previous[layer] = state.previous[layer] + keys @ keys.T
            log["batches"].append({"values": values, "layers": layers})
    except BaseException:
        snapshot.restore()
        raise
    return snapshot, targets, log


apply_alphaedit = method_entry("alphaedit", apply_alphaedit_to_model)
