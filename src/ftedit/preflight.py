"""Checks of an edit's options that need no model: run before loading one, so bad input fails in seconds."""

from __future__ import annotations

import torch

from ftedit.errors import UsageError
from ftedit.models import QUANTIZATIONS, parse_dtype

SAVE_MODES = ("model", "adapter", "none")


def check_selection(n: int | None, offset: int) -> None:
    """``--n`` and ``--offset`` select at least one record."""
    if n is not None and n < 1:
        raise UsageError(f"--n {n}: must be at least 1 (or left out for all records)")
    if offset < 0:
        raise UsageError(f"--offset {offset}: must be 0 or more")


def check_device(device: str | None, dtype: str | None) -> None:
    if device not in (None, "auto"):
        try:
            torch.device(device)
        except RuntimeError:
            raise UsageError(f"--device {device!r}: expected cpu, cuda, cuda:N, mps or auto") from None
    parse_dtype(dtype, torch.device("cpu"))


def check_edit_options(*, n: int | None, offset: int, save: str, device: str | None, dtype: str | None,
                       quantize: str | None, method: str | None = None) -> None:
    """Options of ``ftedit edit``; ``method`` is the recipe's params.method (None for a baseline)."""
    check_selection(n, offset)
    check_device(device, dtype)
    if save not in SAVE_MODES:
        raise UsageError(f"--save {save!r}: use one of {', '.join(SAVE_MODES)}")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise UsageError(f"--quantize {quantize!r}: use one of {', '.join(QUANTIZATIONS)}")
    if save == "adapter" and method != "lora":
        raise UsageError("--save adapter needs LoRA training (--set params.method=lora); full-weight edits "
                         "save the model (--save model)")
    if quantize and (method != "lora" or save == "model"):
        raise UsageError(f"--quantize {quantize}: quantized base weights are frozen; train LoRA adapters "
                         "(--set params.method=lora) and save them with --save adapter")
