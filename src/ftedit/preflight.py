"""Checks of an edit's options that need no model: run before loading one, so bad input fails in seconds."""

from __future__ import annotations

from pathlib import Path

import torch

from ftedit.errors import OutputDirError, UsageError
from ftedit.evaluate import PROTOCOLS
from ftedit.evaluate.common import check_policy
from ftedit.models import QUANTIZATIONS, check_model_spec, parse_dtype
from ftedit.outputs import check_writable

SAVE_MODES = ("model", "adapter", "codebook", "none")


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


def check_edit_options(*, model: str, n: int | None, offset: int, save: str | None, device: str | None,
                       dtype: str | None, quantize: str | None) -> None:
    """Options of ``ftedit edit`` that need neither the model nor the method's config."""
    check_selection(n, offset)
    check_device(device, dtype)
    check_model_spec(model)
    if save is not None and save not in SAVE_MODES:
        raise UsageError(f"--save {save!r}: use one of {', '.join(SAVE_MODES)}")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise UsageError(f"--quantize {quantize!r}: use one of {', '.join(QUANTIZATIONS)}")


def check_output_file(out: Path) -> None:
    """A result file can be written at ``out`` (it is not a directory; its folder is writable)."""
    if out.is_dir():
        raise OutputDirError(f"--out {out} is a directory; pass the path of the JSON file to write")
    check_writable(out.parent)


def check_eval_options(*, n: int | None, offset: int, device: str | None, dtype: str | None, missing: str,
                       protocol: str, models: list[str], out: Path | None) -> None:
    """Options of ``ftedit eval``."""
    check_selection(n, offset)
    check_device(device, dtype)
    check_policy(missing)
    if protocol not in PROTOCOLS:
        raise UsageError(f"--protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}")
    for spec in models:
        check_model_spec(spec)
    if out is not None:
        check_output_file(Path(out))
