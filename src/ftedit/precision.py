"""Compute precision: bf16 autocast where the hardware runs it fast, the exact fp32 path where asked.

``--dtype auto`` (the default) keeps fp32 weights on CPU and, on a CPU with bf16 matmul units (Intel AMX or
AVX512-BF16), runs training (``train.mixed_precision=auto``) and scoring under bf16 autocast. Log-softmax,
losses and metrics stay fp32, and scoring re-scores near-ties in fp32 (:mod:`ftedit.evaluate.scoring`), so
ES/PS/NS do not depend on the precision. ``--dtype fp32`` keeps every forward in fp32.

Detection reads the CPU flags in ``/proc/cpuinfo``; ``FTEDIT_CPU_BF16=1`` or ``0`` overrides it.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

import torch

ENV_OVERRIDE = "FTEDIT_CPU_BF16"
CPU_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
CPUINFO = Path("/proc/cpuinfo")
_ATTR = "_ftedit_precision"  # what the loader was asked for: "auto", or an explicit dtype name


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """The feature flags of the first CPU listed in ``cpuinfo`` (empty where the file is absent)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def has_bf16_units(flags: frozenset[str]) -> bool:
    return bool(flags & CPU_BF16_FLAGS)


@functools.cache
def _detected() -> bool:
    return has_bf16_units(cpu_flags())


def cpu_bf16_supported() -> bool:
    """Whether this CPU has bf16 matmul instructions (AMX or AVX512-BF16); ``FTEDIT_CPU_BF16`` overrides."""
    override = os.environ.get(ENV_OVERRIDE, "").strip()
    if override in ("0", "1"):
        return override == "1"
    return _detected()


def auto_bf16(device: torch.device) -> bool:
    """Whether ``auto`` means bf16 on ``device``."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_bf16_supported()


def _inner(model):
    from ftedit.forward import _unwrap

    return _unwrap(model)


def set_requested(model, dtype: str | torch.dtype | None) -> None:
    """Record the ``--dtype`` the model was loaded with (None and ``"auto"`` mean auto)."""
    name = "auto" if dtype in (None, "auto") else str(dtype).replace("torch.", "")
    setattr(_inner(model), _ATTR, name)


def requested(model) -> str:
    """The recorded ``--dtype``; ``"auto"`` for a model the caller built (in memory, not through the loader)."""
    return getattr(_inner(model), _ATTR, "auto")


def _first_param(model) -> torch.Tensor:
    return next(model.parameters())


def train_autocast(model) -> bool:
    """What ``train.mixed_precision=auto`` resolves to: bf16 for low-precision weights (trained as fp32
    master copies) and for fp32 weights on bf16 hardware under ``auto``; never after an explicit fp32."""
    if requested(model) in ("float32", "fp32"):
        return False
    p = _first_param(model)
    return p.dtype == torch.bfloat16 or (requested(model) == "auto" and auto_bf16(p.device))


def scoring_autocast(model) -> bool:
    """Whether scoring runs under bf16 autocast: fp32 weights, ``--dtype auto``, bf16 hardware."""
    p = _first_param(model)
    return requested(model) == "auto" and p.dtype == torch.float32 and auto_bf16(p.device)


def scoring_label(model) -> str:
    """How scores are computed, for result files."""
    if scoring_autocast(model):
        return "bf16 autocast, near-ties re-scored in fp32"
    return str(_first_param(model).dtype).replace("torch.", "")


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast, or (``enabled=False``) autocast explicitly off, also inside an outer autocast region.

    No weight cache: a cached bf16 copy of a weight would go stale when the weight is trained."""
    if device.type not in ("cpu", "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled, cache_enabled=False)


@contextlib.contextmanager
def scoring_context(model, enabled: bool):
    """Scoring's precision region: fp32 (autocast off), or bf16 autocast in which each weight is cast once.

    autocast caches only the casts of leaves that require grad; uncached, every forward would cast every frozen
    weight again (for Gemma's 168M-entry head, longer than the head's matmul). So frozen weights are marked as
    requiring grad while the region runs; scoring runs under no_grad, so no graph is built. Inside an outer
    autocast region (training) the cache would outlive this one, and a sharded model's parameters are FSDP's:
    there the weights are cast per forward as before.
    """
    device = _first_param(model).device
    from ftedit.distributed import is_sharded

    if not enabled or torch.is_autocast_enabled(device.type) or is_sharded(model) or device.type != "cpu":
        with autocast(device, enabled):
            yield
        return
    frozen = [p for p in model.parameters() if p.is_floating_point() and not p.requires_grad]
    with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=True):
        for p in frozen:
            p.requires_grad_(True)
        try:
            yield
        finally:
            for p in frozen:
                p.requires_grad_(False)
