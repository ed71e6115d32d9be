"""One entry point for every way ftedit can edit a model: its fine-tuning recipes and the baselines.

``apply_method("locft-bf", model, tok, requests)`` and ``apply_method("rome", model, tok, requests)`` return the
same ``AppliedEdit``, so the bench, the retention study and the CLI treat all methods alike.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ftedit.config import recipe_names, resolve_config
from ftedit.data.examples import PoolFact
from ftedit.data.requests import EditRequest
from ftedit.errors import InputError

# Baseline name -> "module:function". Each function has the signature of ``apply_method`` below (minus the
# name) and returns an ``AppliedEdit``. Imported lazily: the baselines pull in statistics code nobody else needs.
BASELINES: dict[str, str] = {
    "rome": "ftedit.baselines.rome:apply_rome",
    "memit": "ftedit.baselines.memit:apply_memit",
    "alphaedit": "ftedit.baselines.alphaedit:apply_alphaedit",
    "ft-l": "ftedit.baselines.ft:apply_ft_l",  # also the recipe ft-l; listed here as a baseline
}


@dataclass
class AppliedEdit:
    """An edit applied in place to ``model``, with what it touched and how to undo it."""

    method: str
    model: nn.Module
    config: dict[str, Any]  # the resolved recipe config or baseline hyperparameters
    touched: list[dict[str, Any]]  # [{"name": module name, "layer": int, "role": "down" | ...}]
    seconds: float
    restore: Callable[[], nn.Module]  # puts the original weights back and returns the plain model
    details: Any = None  # EditResult for recipes; method-specific for baselines
    info: dict[str, Any] = field(default_factory=dict)


def method_names() -> list[str]:
    return list(dict.fromkeys(recipe_names() + sorted(BASELINES)))


def _baseline(name: str) -> Callable[..., AppliedEdit]:
    module, _, function = BASELINES[name].partition(":")
    return getattr(importlib.import_module(module), function)


def _check_name(name: str) -> None:
    if name not in BASELINES and name not in recipe_names():
        raise InputError(f"unknown method {name!r}; available: {', '.join(method_names())}")


def check_method_config(name: str, config_file: str | None = None,
                        overrides: list[str] | dict[str, Any] | None = None) -> None:
    """Resolve a method's config without a model, so unknown fields and bad values fail before one loads."""
    _check_name(name)
    hparams_cls = getattr(_baseline(name), "hparams_cls", None) if name in BASELINES else None
    if hparams_cls is not None:
        from ftedit.baselines.common import resolve_hparams

        resolve_hparams(hparams_cls, config_file, overrides)
    elif name in recipe_names():
        resolve_config(name, config_file, overrides)


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
) -> AppliedEdit:
    """Edit ``model`` in place with a recipe (see ``ftedit recipes``) or a baseline (``BASELINES``)."""
    if name in BASELINES:
        return _baseline(name)(model, tok, requests, overrides=overrides, config_file=config_file, pool=pool,
                               progress=progress, model_fingerprint=model_fingerprint)
    _check_name(name)
    from ftedit.editor import edit

    cfg = resolve_config(name, config_file, overrides)
    start = time.perf_counter()
    result = edit(model, tok, requests, cfg, pool=pool, progress=progress, model_fingerprint=model_fingerprint)
    return AppliedEdit(method=name, model=result.model, config=cfg.to_dict(), touched=result.targets,
                       seconds=time.perf_counter() - start, restore=result.restore, details=result,
                       info={"trainable_parameters": result.trainable_parameters,
                             "examples_by_kind": result.examples_by_kind})
