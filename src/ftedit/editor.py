"""The editor: ``edit(model, tokenizer, requests, config) -> EditResult``.

Steps: augment (from the *unedited* model), select parameters, attach them (full weights or LoRA), then
train in the configured mode (mass, single, sequential). The model is edited in place;
``EditResult.restore()`` puts the original weights back.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ftedit.augment import build_training_set
from ftedit.checkpoint import Checkpoints
from ftedit.config import EditConfig, LoraConfig, ParamConfig
from ftedit.data.examples import PoolFact, TrainingExample
from ftedit.data.requests import EditRequest
from ftedit.params import (
    NormConstraint,
    Target,
    first_trainable_layer,
    freeze_all_but,
    is_linear,
    select_targets,
    trainable_parameters,
)
from ftedit.registry import AppliedEdit, ApplyContext, TouchedModule
from ftedit.train import TrainResult, train

logger = logging.getLogger(__name__)


@dataclass
class Attached:
    """The trainable parameters of an edit, how to train them and how to undo the edit."""

    model: nn.Module  # the model to train and evaluate (a PeftModel for LoRA)
    params: dict[str, nn.Parameter]
    initial: dict[str, torch.Tensor]  # values at attach time, to reset between single edits
    after_step: Callable[[], None] | None
    lora: bool
    first_layer: int = 0  # blocks below this one hold no trainable parameter

    def reset(self) -> None:
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(self.initial[name])

    @contextmanager
    def unedited(self):
        """The attach-time weights for the duration of the block; the current ones again afterwards."""
        current = {n: p.detach().clone() for n, p in self.params.items()}
        self.reset()
        try:
            yield self.model
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(current[name])

    def train(self, tok, examples, config: EditConfig, progress: bool, checkpoint=None) -> TrainResult:
        return train(self.model, tok, examples, list(self.params.values()), config.train, config.objective,
                     after_step=self.after_step, progress=progress, prefix_layers=self.first_layer,
                     checkpoint=checkpoint)

    def detach(self) -> nn.Module:
        """Undo the edit: original weights, no adapters, nothing trainable. Returns the plain model."""
        self.reset()
        base = self.model.unload() if self.lora else self.model
        for p in base.parameters():
            p.requires_grad_(False)
        return base


def _require_location(config: EditConfig) -> None:
    if config.params.layers == "auto":
        raise ValueError("params.layers=auto is resolved before editing: call ftedit.locate.resolve_location(...) "
                         "(ftedit.methods.apply_method and `ftedit edit` do) or set params.layers")


def attach_config(model: nn.Module, config: EditConfig) -> tuple[Attached, list[Target]]:
    """Select the weights ``config.params`` names and make exactly those trainable (see :func:`attach`)."""
    _require_location(config)
    targets = select_targets(model, config.params.layers, config.params.modules)
    attached = attach(model, targets, config.params, config.lora)
    attached.first_layer = first_trainable_layer(targets)
    return attached, targets


def attach(model: nn.Module, targets: list[Target], cfg: ParamConfig, lora: LoraConfig | None = None) -> Attached:
    """Make exactly the selected weights trainable, directly or through LoRA adapters (``lora``'s r/alpha)."""
    if cfg.method == "lora":
        return _attach_lora(model, targets, cfg, lora or LoraConfig())
    from ftedit.models import is_quantized

    if is_quantized(model):
        raise ValueError("the base weights are quantized (4/8-bit) and cannot be fine-tuned directly: "
                         "train LoRA adapters on them (params.method=lora)")
    params = trainable_parameters(targets)
    freeze_all_but(model, params)
    constraint = NormConstraint(params, cfg.norm_constraint) if cfg.norm_constraint > 0 else None
    initial = {n: p.detach().clone() for n, p in params.items()}
    return Attached(model, params, initial, constraint.apply if constraint else None, lora=False)


def _attach_lora(model: nn.Module, targets: list[Target], cfg: ParamConfig, lora: LoraConfig) -> Attached:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    if cfg.norm_constraint > 0:
        raise ValueError("params.norm_constraint (FT-L) applies to full weights, not to LoRA adapters")
    names = []
    for t in targets:
        if t.role == "block":
            names += [f"{t.name}.{n}" for n, m in t.module.named_modules() if n and is_linear(m)]
        else:
            names.append(t.name)
    lora_cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                              target_modules=names, bias="none")
    peft_model = get_peft_model(model, lora_cfg)
    params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    initial = {n: p.detach().clone() for n, p in params.items()}
    return Attached(peft_model, params, initial, None, lora=True)


@dataclass
class EditResult:
    model: nn.Module
    config: EditConfig
    targets: list[dict[str, Any]]
    trainable_parameters: int
    examples_by_kind: dict[str, int]
    train: list[TrainResult]
    seconds: dict[str, float]
    single_edit_metrics: list[dict[str, Any]] = field(default_factory=list)
    _attached: Attached | None = None
    _merged: bool = False

    def merged_model(self) -> nn.Module:
        """A plain transformers model with the edit folded in. Merging LoRA adapters is final: no restore()."""
        if self._attached and self._attached.lora and not self._merged:
            self.model = self.model.merge_and_unload()
            self._merged = True
        return self.model

    def restore(self) -> nn.Module:
        """Undo the edit and return the original model."""
        if self._merged:
            raise RuntimeError("the LoRA edit was merged into the weights (merged_model()); it cannot be undone")
        return self._attached.detach() if self._attached else self.model


def edit(
    model: nn.Module,
    tok,
    requests: Sequence[EditRequest],
    config: EditConfig,
    pool: Sequence[PoolFact] | None = None,
    evaluate_single: Callable[[nn.Module, Any, list[EditRequest]], dict[str, Any]] | None = None,
    progress: bool = True,
    model_fingerprint: str = "",
    checkpoints: Checkpoints | None = None,
) -> EditResult:
    """Write ``requests`` into ``model`` by fine-tuning, as ``config`` says. Edits ``model`` in place.

    In single mode each edit is trained on the original weights, measured with ``evaluate_single``
    (default: the COUNTERFACT/ZsRE harness), and undone before the next one.
    ``checkpoints`` (mass and sequential modes): save resumable training state, and resume from it.
    """
    config.validate()
    if checkpoints is not None and config.mode == "single":
        raise ValueError("checkpoints/--resume apply to mass and sequential modes; single mode trains each edit "
                         "for a few steps on a fresh model")
    requests = list(requests)
    if not requests:
        raise ValueError("no edit requests")
    _require_location(config)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    examples = build_training_set(model, tok, requests, config.augment, pool=pool, progress=progress,
                                  model_fingerprint=model_fingerprint)
    timings["augment"] = time.perf_counter() - t0

    attached, targets = attach_config(model, config)
    n_trainable = sum(p.numel() for p in attached.params.values())
    logger.info("trainable parameters: %s in %d modules (%s)", f"{n_trainable:,}", len(targets),
                ", ".join(t.name for t in targets))

    t1 = time.perf_counter()
    try:
        runs, single = _run_mode(attached, tok, requests, examples, config, evaluate_single, progress,
                                 checkpoints)
    except BaseException:
        attached.detach()  # a failed edit leaves the caller's model as it was
        raise
    timings["train"] = time.perf_counter() - t1
    return EditResult(
        model=attached.model,
        config=config,
        targets=[{"name": t.name, "layer": t.layer, "role": t.role} for t in targets],
        trainable_parameters=n_trainable,
        examples_by_kind=dict(Counter(e.kind for e in examples)),
        train=runs,
        seconds=timings,
        single_edit_metrics=single,
        _attached=attached,
    )


def _examples_for(examples: list[TrainingExample], request_ids: set[int]) -> list[TrainingExample]:
    return [e for e in examples if e.request_index in request_ids]


def _run_mode(attached, tok, requests, examples, config: EditConfig, evaluate_single, progress, checkpoints=None):
    def run_checkpoint(run: int):
        return checkpoints.for_run(run) if checkpoints is not None else None

    if config.mode == "mass":
        return [attached.train(tok, examples, config, progress, run_checkpoint(0))], []
    if config.mode == "sequential":
        runs = []
        for run, start in enumerate(range(0, len(requests), config.sequential_batch)):
            ids = set(range(start, min(start + config.sequential_batch, len(requests))))
            runs.append(attached.train(tok, _examples_for(examples, ids), config, progress, run_checkpoint(run)))
        return runs, []
    if evaluate_single is None:
        from ftedit.evaluate import evaluate_requests

        def evaluate_single(model, tok, reqs):
            return evaluate_requests(model, tok, reqs, progress=False).summary
    runs, metrics = [], []
    for i, request in enumerate(requests):
        try:
            runs.append(attached.train(tok, _examples_for(examples, {i}), config, progress=False))
            metrics.append({"request_index": i, **evaluate_single(attached.model, tok, [request])})
        finally:
            attached.reset()
    return runs, metrics


def apply_recipe(model: nn.Module, tok, requests: Sequence[EditRequest], config: EditConfig,
                 context: ApplyContext) -> AppliedEdit:
    """The registry's apply function of every fine-tuning recipe: :func:`edit`, as an ``AppliedEdit``."""
    start = time.perf_counter()
    result = edit(model, tok, requests, config, pool=context.pool, progress=context.progress,
                  model_fingerprint=context.model_fingerprint, checkpoints=context.checkpoints)
    lora = result._attached is not None and result._attached.lora
    return AppliedEdit(
        method=config.recipe, model=result.model, config=config.to_dict(),
        touched=[TouchedModule(**t) for t in result.targets], weights=config.params.method,
        seconds=time.perf_counter() - start, restore_weights=result.restore,
        merge=result.merged_model if lora else None, seed=config.train.seed,
        trainable_parameters=result.trainable_parameters, train=result.train, phase_seconds=result.seconds,
        examples_by_kind=result.examples_by_kind, single_edit_metrics=result.single_edit_metrics)
