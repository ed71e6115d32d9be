"""MEMIT (Meng et al. 2023, "Mass-Editing Memory in a Transformer"): many edits at once, spread over a band
of MLP down projections.

1. For each request, ``z`` = the residual stream leaving the band's last block at the subject's last token,
   plus an optimized ``δ`` (the same objective as ROME's v*), applied as a change of that block's MLP output.
2. For each layer ``l`` of the band, lowest first: keys ``K`` (the down projection's input at the subject's
   last token, averaged over prefixes, recomputed after the lower layers changed), residuals
   ``R = (z − current z) / (layers left)``, and the batched least-squares update
   ``ΔW = R Kᵀ (λ·C + K Kᵀ)⁻¹``, the minimizer of ``||ΔW K − R||² + λ·tr(ΔW C ΔWᵀ)``.

Where the block normalizes the MLP output before adding it to the residual stream (Gemma's
post-feedforward norm), ``R`` is mapped back through that norm (:func:`~ftedit.baselines.common.residual_to_down`)
so the residual stream moves by the intended amount.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ftedit.baselines.common import (
    Snapshot,
    ValueConfig,
    ValueProblem,
    activations_at,
    add_update,
    context_prefixes,
    down_proj,
    least_squares_update,
    mean_keys,
    method_entry,
    post_mlp_module,
    residual_to_down,
    resolve_layers,
    rewrite_probes,
)
from ftedit.baselines.stats import StatsConfig, mom2
from ftedit.data.requests import EditRequest
from ftedit.params import Target, find_blocks

logger = logging.getLogger(__name__)


def _memit_value() -> ValueConfig:
    # MEMIT's GPT-J setting: 25 steps at lr 0.5, weight decay 0.5, norm clamp 0.75, KL factor 0.0625.
    return ValueConfig(steps=25, lr=0.5, weight_decay=0.5, clamp_norm_factor=0.75)


@dataclass
class MEMITHyperParams:
    """MEMIT's hyperparameters (defaults: the paper's GPT-J configuration; the band is given in relative depth)."""

    # Edited down projections: "frac:a:b" = every layer from relative depth a to b (gemma-3-270m: 3..7;
    # the paper: 3..8 of GPT-J's 28, 13..17 of GPT-2 XL's 48), or indices/ranges as in params.layers.
    layers: str = "frac:0.15:0.4"
    mom2_update_weight: float = 15000.0  # λ: weight of the preserved keys' statistics against the new keys
    value: ValueConfig = field(default_factory=_memit_value)
    stats: StatsConfig = field(default_factory=StatsConfig)
    seed: int = 0  # torch's seed before the model is loaded and edited (`ftedit edit --seed`)


# solve(layer index in band, target, keys [d_in, n], residuals [d_out, n]) -> ΔW [d_out, d_in]
Solver = Callable[[int, Target, torch.Tensor, torch.Tensor], torch.Tensor]


def band_targets(model: nn.Module, layers_spec: str) -> list[Target]:
    _, blocks = find_blocks(model)
    return [down_proj(model, i) for i in resolve_layers(layers_spec, len(blocks))]


def target_values(model, tok, requests: Sequence[EditRequest], prefixes: Sequence[str], z_layer: int,
                  cfg: ValueConfig, progress: bool) -> tuple[torch.Tensor, list[dict]]:
    """MEMIT's z for every request, ``[n, d_model]``: the residual stream leaving block ``z_layer``, moved by
    the optimized change of that block's MLP output.

    Where the block adds its MLP output to the residual stream as is (GPT-2, Llama) this is MEMIT's residual
    delta exactly; where it normalizes it first (Gemma), z stays within what the MLP can contribute.
    Weight decay and the norm clamp are relative to the residual stream's norm, as in MEMIT.
    """
    _, blocks = find_blocks(model)
    post = post_mlp_module(model, z_layer)
    zs, log = [], []
    for request in tqdm(requests, desc="target values", disable=not progress):
        residual = activations_at(model, tok, rewrite_probes(tok, request, [""], None), blocks[z_layer], "output")[0]
        problem = ValueProblem(model, tok, request, prefixes, z_layer, residual.norm().item())
        delta, initial, info = problem.solve(cfg)
        zs.append(residual + _mlp_contribution(post, initial + delta) - _mlp_contribution(post, initial))
        log.append(info)
        logger.info("target value %d/%d: %s", len(log), len(requests), info)
    return torch.stack(zs), log


@torch.no_grad()
def _mlp_contribution(post: nn.Module | None, down_output: torch.Tensor) -> torch.Tensor:
    if post is None:
        return down_output
    dtype = next(post.parameters()).dtype if any(True for _ in post.parameters()) else down_output.dtype
    return post(down_output.to(dtype)).float()


def spread_over_layers(model, tok, requests: Sequence[EditRequest], prefixes: Sequence[str],
                       targets: Sequence[Target], zs: torch.Tensor, solve: Solver) -> list[dict[str, Any]]:
    """Step 2 of MEMIT: write the residuals ``zs − current`` into the band, one layer at a time."""
    _, blocks = find_blocks(model)
    bare = [rewrite_probes(tok, r, [""], None)[0] for r in requests]
    z_block = blocks[targets[-1].layer]
    log = []
    for i, target in enumerate(targets):
        keys = mean_keys(model, tok, requests, prefixes, target.layer)
        current = activations_at(model, tok, bare, z_block, "output")
        residual = (zs - current) / (len(targets) - i)
        post = post_mlp_module(model, target.layer)
        if post is not None:
            residual = residual_to_down(post, activations_at(model, tok, bare, target.module, "output"), residual)
        update = solve(i, target, keys, residual.T.double())
        add_update(target.module, update)
        fit = (update @ keys - residual.T.double()).norm() / residual.norm().clamp_min(1e-12)
        log.append({"layer": target.layer, "residual_norm": residual.norm(dim=1).mean().item(),
                    "update_norm": update.norm().item(), "relative_fit_error": fit.item()})
        logger.info("layer %d: mean residual %.3g, |ΔW| %.3g, fit error %.3f", target.layer,
                    log[-1]["residual_norm"], log[-1]["update_norm"], log[-1]["relative_fit_error"])
    return log


def apply_memit_to_model(model: nn.Module, tok, requests: Sequence[EditRequest], hparams: MEMITHyperParams,
                         *, fingerprint: str = "", progress: bool = True) -> tuple[Snapshot, list[Target], dict]:
    """Apply MEMIT to ``model`` in place (all requests in one batch)."""
    targets = band_targets(model, hparams.layers)
    snapshot = Snapshot(model)
    for t in targets:
        snapshot.keep(t)
    covs = mom2(model, tok, targets, hparams.stats, fingerprint, progress)
    prefixes = context_prefixes(model, tok, hparams.value)

    def solve(i: int, target: Target, keys: torch.Tensor, residuals: torch.Tensor) -> torch.Tensor:
        return least_squares_update(keys, residuals, hparams.mom2_update_weight * covs[target.layer])

    try:
        zs, values = target_values(model, tok, requests, prefixes, targets[-1].layer, hparams.value, progress)
        layers = spread_over_layers(model, tok, requests, prefixes, targets, zs, solve)
    except BaseException:
        snapshot.restore()
        raise
    return snapshot, targets, {"prefixes": prefixes, "values": values, "layers": layers}


apply_memit = method_entry("memit", apply_memit_to_model)
