"""ROME (Meng et al. 2022, "Locating and Editing Factual Associations in GPT"): a rank-one update of one MLP
down projection per edit, applied one edit after another.

For each request: the key ``k*`` is the down projection's input at the subject's last token, averaged over
the bare prompt and a few generated prefixes; ``δ`` is optimized at the down projection's output (see
:class:`~ftedit.baselines.common.ValueProblem`: target NLL + KL on "{subject} is a" + weight decay); the value
is ``v* = W k* + δ``. The update ``ΔW = (v* − W k*) (C⁻¹k*)ᵀ / (k*ᵀ C⁻¹ k*)`` makes ``W' k* = v*`` and leaves
every key ``k`` with ``kᵀ C⁻¹ k* = 0`` untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ftedit.baselines.common import (
    Snapshot,
    ValueConfig,
    ValueProblem,
    add_update,
    context_prefixes,
    down_proj,
    mean_keys,
    method_entry,
    resolve_layers,
)
from ftedit.baselines.stats import StatsConfig, mom2
from ftedit.data.requests import EditRequest
from ftedit.params import find_blocks, weight_out_in

logger = logging.getLogger(__name__)


def _rome_value() -> ValueConfig:
    # ROME's GPT-2 XL setting: 20 steps at lr 0.5, weight decay 0.5, norm clamp 4, prefixes of 5 and 10 tokens.
    return ValueConfig(steps=20, lr=0.5, weight_decay=0.5, clamp_norm_factor=4.0, context_lengths=(5, 10))


@dataclass
class ROMEHyperParams:
    """ROME's hyperparameters (defaults: the paper's GPT-2 XL configuration, layer at ~1/3 depth)."""

    layer: str = "frac:0.3"  # the edited down projection: an index or "frac:x" (GPT-2 XL: 17 of 48; gemma-3-270m: 5)
    mom2_adjustment: bool = True  # use C⁻¹k* as the update's key direction (False: k* itself)
    value: ValueConfig = field(default_factory=_rome_value)
    stats: StatsConfig = field(default_factory=StatsConfig)
    seed: int = 0  # torch's seed before the model is loaded and edited (`ftedit edit --seed`)


def rank_one_update(weight_out_in: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    cov: torch.Tensor | None) -> torch.Tensor:
    """``ΔW`` ([d_out, d_in]) with ``(W + ΔW) key = value`` that changes ``W k`` least for typical keys:
    ``(value − W key) uᵀ / (uᵀ key)`` with ``u = C⁻¹ key`` (``u = key`` without ``cov``)."""
    key = key.double()
    u = torch.linalg.solve(cov.double(), key) if cov is not None else key
    residual = value.double() - weight_out_in.double() @ key
    return torch.outer(residual, u) / (u @ key)


def apply_rome_to_model(model: nn.Module, tok, requests: Sequence[EditRequest], hparams: ROMEHyperParams,
                        *, fingerprint: str = "", progress: bool = True) -> tuple[Snapshot, list, dict[str, Any]]:
    """Apply ROME to ``model`` in place, one request after another; return the undo snapshot, the edited
    target and a per-request log."""
    _, blocks = find_blocks(model)
    layer = resolve_layers(hparams.layer, len(blocks))
    if len(layer) != 1:
        raise ValueError(f"ROME edits one layer; layer={hparams.layer!r} selects {layer}")
    target = down_proj(model, layer[0])
    snapshot = Snapshot(model)
    snapshot.keep(target)
    cov = mom2(model, tok, [target], hparams.stats, fingerprint, progress)[target.layer] \
        if hparams.mom2_adjustment else None
    prefixes = context_prefixes(model, tok, hparams.value)
    log, deltas = [], []
    try:
        for request in tqdm(requests, desc="ROME", disable=not progress):
            key = mean_keys(model, tok, [request], prefixes, target.layer)[:, 0]
            problem = ValueProblem(model, tok, request, prefixes, target.layer)
            delta, _, info = problem.solve(hparams.value)
            weight = weight_out_in(target.module).detach()
            value = weight.double() @ key + delta.double()
            add_update(target.module, rank_one_update(weight, key, value, cov))
            log.append(info)
            deltas.append(delta)
            logger.info("ROME edit %d/%d: %s", len(log), len(requests), info)
    except BaseException:
        snapshot.restore()  # a failed edit leaves the caller's model as it was
        raise
    return snapshot, [target], {"prefixes": prefixes, "values": log, "deltas": deltas}


apply_rome = method_entry("rome", apply_rome_to_model)
