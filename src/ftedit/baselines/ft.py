"""The fine-tuning baselines, as thin entry points over ftedit's editor and its recipes.

* naive FT (recipe ``ft``): full likelihood of prompt + target, unconstrained (paper 000's "FT").
* FT-L (recipe ``ft-l``): ROME/MEMIT's constrained fine-tuning, one down projection, each weight kept
  within ``params.norm_constraint`` of its original value.
* FT-M (recipe ``ft-m``): EasyEdit's default, depth-first (each edit to convergence, then the next).

Their hyperparameters are the recipe's :class:`~ftedit.config.EditConfig`; see ``ftedit recipes``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ftedit.config import EditConfig, resolve_config
from ftedit.data.requests import EditRequest


def _apply(recipe: str, model: nn.Module, tok, requests: Sequence[EditRequest], hparams: EditConfig | None,
           **kwargs):
    from ftedit.editor import edit
    from ftedit.methods import AppliedEdit

    cfg = hparams or resolve_config(recipe)
    start = time.perf_counter()
    result = edit(model, tok, requests, cfg, **kwargs)
    return AppliedEdit(method=recipe, model=result.model, config=cfg.to_dict(), touched=result.targets,
                       seconds=time.perf_counter() - start, restore=result.restore, details=result,
                       info={"trainable_parameters": result.trainable_parameters})


def apply_ft_to_model(model: nn.Module, tok, requests: Sequence[EditRequest], hparams: EditConfig | None = None,
                      **kwargs):
    """Naive FT; ``hparams`` defaults to the ``ft`` recipe. ``kwargs`` go to :func:`ftedit.editor.edit`."""
    return _apply("ft", model, tok, requests, hparams, **kwargs)


def apply_ft_l_to_model(model: nn.Module, tok, requests: Sequence[EditRequest], hparams: EditConfig | None = None,
                        **kwargs):
    """FT-L; ``hparams`` defaults to the ``ft-l`` recipe."""
    return _apply("ft-l", model, tok, requests, hparams, **kwargs)


def apply_ft_m_to_model(model: nn.Module, tok, requests: Sequence[EditRequest], hparams: EditConfig | None = None,
                        **kwargs):
    """FT-M depth-first; ``hparams`` defaults to the ``ft-m`` recipe."""
    return _apply("ft-m", model, tok, requests, hparams, **kwargs)


def apply_ft_l(model: nn.Module, tok, requests: Sequence[EditRequest], *,
               overrides: list[str] | dict[str, Any] | None = None, config_file: str | Path | None = None,
               pool=None, progress: bool = True, model_fingerprint: str = ""):
    """``ftedit.methods.apply_method`` entry point for FT-L (the same as the ``ft-l`` recipe)."""
    cfg = resolve_config("ft-l", config_file, overrides)
    return apply_ft_l_to_model(model, tok, requests, cfg, pool=pool, progress=progress,
                               model_fingerprint=model_fingerprint)
