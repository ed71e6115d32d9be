"""One entry point for every way ftedit can edit a model: its fine-tuning recipes and the baselines.

``apply_method("locft-bf", model, tok, requests)`` and ``apply_method("rome", model, tok, requests)`` return the
same ``AppliedEdit``, so the bench, the retention study and ``ftedit edit`` treat all methods alike. The methods
are those of :mod:`ftedit.registry`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from torch import nn

from ftedit.data.examples import PoolFact
from ftedit.data.requests import EditRequest
from ftedit.locate import resolve_location
from ftedit.registry import AppliedEdit, ApplyContext, MethodSpec, get_method, method_names


def apply_spec(spec: MethodSpec, config, model: nn.Module, tok, requests: Sequence[EditRequest],
               context: ApplyContext) -> AppliedEdit:
    """Resolve the edit's location (``params.layers=auto``), then apply ``spec`` with ``config`` in place."""
    location = None
    seconds = 0.0
    if spec.capabilities.locate:
        start = time.perf_counter()
        config, location = resolve_location(model, tok, config, context.identity, context.progress,
                                            context.model_fingerprint)
        seconds = time.perf_counter() - start
    applied = spec.apply(model, tok, list(requests), config, context)
    applied.method = spec.name
    if location is not None:
        applied.location = location
        if location["source"] != "config":
            applied.phase_seconds = {"locate": seconds, **applied.phase_seconds}
    return applied


def apply_method(
    name: str,
    model: nn.Module,
    tok,
    requests: Sequence[EditRequest],
    *,
    overrides: list[str] | dict[str, Any] | None = None,
    config_file: str | None = None,
    pool: Sequence[PoolFact] | None = None,
    progress: bool = True,
    model_fingerprint: str = "",
    identity: Any = None,
    pool_source: str | None = None,
) -> AppliedEdit:
    """Edit ``model`` in place with a registered method: a recipe (see ``ftedit recipes``) or a baseline.

    ``identity`` (``load_model``'s ``ModelIdentity``) lets ``layers: auto`` find a bundled model's shipped location.
    """
    spec = get_method(name)
    config = spec.resolve_config(config_file, overrides)
    context = ApplyContext(pool=pool, progress=progress, model_fingerprint=model_fingerprint, identity=identity,
                           pool_source=pool_source)
    return apply_spec(spec, config, model, tok, requests, context)


__all__ = ["AppliedEdit", "apply_method", "apply_spec", "method_names"]
