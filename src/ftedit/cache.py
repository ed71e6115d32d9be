"""ftedit's on-disk cache: one root, one way to key an entry, one model fingerprint.

Every cache (dequantized GGUF models, key statistics, location searches, augmented training sets and pool
embeddings) lives under :func:`cache_dir` / ``kind`` in a file named by the hash of a canonical JSON of
everything the entry depends on (:func:`cache_path`).

:func:`model_fingerprint` hashes the bytes of every weight. Of the identities a model could have, only that one
identifies the weights themselves: a hash of the file a model came from stays the same after the model is
edited in memory, loaded in another dtype or merged with an adapter, and per-tensor sums collide (swapping
two weights keeps every sum). A file digest (:func:`file_digest`) still names a model before it is loaded
(the dequantization cache, benchmark plans), where no weights are in memory yet.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from pathlib import Path
from typing import Any

import torch
from platformdirs import user_cache_dir
from torch import nn

_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (tensor state, fingerprint)


def cache_dir() -> Path:
    """Root of ftedit's cache. ``FTEDIT_CACHE`` overrides the platform's user cache directory."""
    return Path(os.environ.get("FTEDIT_CACHE") or user_cache_dir("ftedit"))


def key_hash(parts: Any) -> str:
    """sha256 of the canonical JSON of ``parts`` (sorted keys, no whitespace; other types by ``str``)."""
    text = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def cache_path(kind: str, *, suffix: str = ".json", **key_parts: Any) -> Path:
    """Where the ``kind`` entry for these key parts lives: ``cache_dir()/kind/<hash of the parts><suffix>``."""
    return cache_dir() / kind / f"{key_hash({'kind': kind, **key_parts})[:32]}{suffix}"


def file_digest(path: str | Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _tensor_state(tensors: dict[str, torch.Tensor]) -> tuple:
    # any in-place change bumps a tensor's version counter; a replaced tensor has new storage
    return tuple((name, t.data_ptr(), t._version) for name, t in tensors.items())


@torch.no_grad()
def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the model's config and of every state-dict tensor's name, dtype, shape and bytes.

    Remembered per model object until one of its tensors changes, so asking again costs nothing.
    """
    tensors = model.state_dict()
    state = _tensor_state(tensors)
    known = _FINGERPRINTS.get(model)
    if known is not None and known[0] == state:
        return known[1]
    config = getattr(model, "config", None)
    h = hashlib.sha256(config.to_json_string().encode() if config is not None else type(model).__name__.encode())
    for name, t in tensors.items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    _FINGERPRINTS[model] = (state, h.hexdigest())
    return h.hexdigest()

