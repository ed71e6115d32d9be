"""Freezing strategies for downstream fine-tuning, and ``protect_edits``: keep what an edit wrote out of reach.

Paper 002 (Sec. 3.3) finds that not fine-tuning the layers an edit wrote into preserves it. Strategies:

* ``none``: full fine-tuning (the control);
* ``below:K``: freeze the blocks below layer K (and the input embedding, unless it is tied to the output head);
* ``window:LAYERS``: train only the blocks in LAYERS (``parse_layers`` syntax: ``"4:9"``, ``"-6:-3"``, ``"8"``);
  embeddings, final norm and head stay frozen;
* ``edits``: freeze exactly the modules the edit touched, read from its manifest (:func:`protect_edits`).

:mod:`ftedit.retention.protection` adds ``below:edit``, ``around:R``, rehearsal and an L2 anchor, and combinations.
Every function returns a :class:`FreezeHandle` whose ``undo()`` restores the previous ``requires_grad`` flags.
Frozen parameters get no gradient, so optimizers (AdamW included) leave them, and their weight decay, alone.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from transformers import TrainerCallback

from ftedit.errors import InputError, MissingInputError
from ftedit.params import SelectionError, block_roles, find_blocks, parse_layers

logger = logging.getLogger(__name__)


@dataclass
class FreezeHandle:
    """Parameters frozen by a strategy; ``undo()`` gives each its previous ``requires_grad``."""

    strategy: str
    previous: dict[str, bool] = field(default_factory=dict)  # name -> requires_grad before freezing
    _params: dict[str, nn.Parameter] = field(default_factory=dict, repr=False)

    @property
    def frozen(self) -> list[str]:
        return list(self.previous)

    @property
    def n_frozen(self) -> int:
        return sum(p.numel() for p in self._params.values())

    def undo(self) -> None:
        for name, flag in self.previous.items():
            self._params[name].requires_grad_(flag)
        self.previous, self._params = {}, {}

    def __enter__(self) -> FreezeHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.undo()


def freeze_parameters(model: nn.Module, names: Sequence[str], strategy: str) -> FreezeHandle:
    """Set ``requires_grad=False`` on the named parameters of ``model``."""
    params = dict(model.named_parameters(remove_duplicate=False))
    missing = [n for n in names if n not in params]
    if missing:
        raise SelectionError(f"{strategy}: no parameter named {missing[:3]} in {type(model).__name__}")
    handle = FreezeHandle(strategy)
    seen: set[int] = set()
    for name in names:
        if id(params[name]) in seen:
            continue  # a tied parameter under a second name: its flag was already recorded
        seen.add(id(params[name]))
        handle.previous[name] = params[name].requires_grad
        handle._params[name] = params[name]
        params[name].requires_grad_(False)
    return handle


def block_parameter_names(model: nn.Module) -> tuple[dict[int, list[str]], list[str]]:
    """Parameter names per decoder block, and the names outside every block (embeddings, final norm, head)."""
    prefix, blocks = find_blocks(model)
    per_layer: dict[int, list[str]] = {i: [] for i in range(len(blocks))}
    outside: list[str] = []
    for name, _ in model.named_parameters(remove_duplicate=False):
        rest = name[len(prefix) + 1:] if name.startswith(prefix + ".") else None
        layer = rest.split(".", 1)[0] if rest else None
        if layer is not None and layer.isdigit():
            per_layer[int(layer)].append(name)
        else:
            outside.append(name)
    return per_layer, outside


def _input_embedding_names(model: nn.Module) -> list[str]:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is None or (head is not None and head.weight is emb.weight):
        return []  # tied to the head: it is the top of the model as much as the bottom; leave it trainable
    ids = {id(p) for p in emb.parameters()}
    return [n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in ids]


def freeze_below(model: nn.Module, layer: int) -> FreezeHandle:
    """Freeze blocks ``0 .. layer-1`` (and an untied input embedding); train from ``layer`` up (Fig. 3a)."""
    per_layer, _ = block_parameter_names(model)
    threshold = parse_layers(layer, len(per_layer))[0]
    names = [n for i in range(threshold) for n in per_layer[i]] + _input_embedding_names(model)
    return freeze_parameters(model, names, f"below:{threshold}")


def freeze_all_but_window(model: nn.Module, layers) -> FreezeHandle:
    """Train only the blocks in ``layers``; everything else, embeddings and head included, is frozen (Fig. 3b)."""
    per_layer, outside = block_parameter_names(model)
    window = set(parse_layers(layers, len(per_layer)))
    names = [n for i, ns in per_layer.items() if i not in window for n in ns] + outside
    return freeze_parameters(model, names, f"window:{min(window)}-{max(window)}")


def touched_modules(manifest: Mapping[str, Any] | Sequence[Mapping[str, Any]] | str | Path) -> list[dict[str, Any]]:
    """The ``[{"name", "layer", "role"}, ...]`` list of an edit manifest (a dict, a manifest.json or its folder)."""
    if isinstance(manifest, str | Path):
        path = Path(manifest)
        path = path / "manifest.json" if path.is_dir() else path
        if not path.is_file():
            raise MissingInputError(f"edit manifest not found: {path}")
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not valid JSON ({e})") from e
    if isinstance(manifest, Mapping):
        touched = manifest.get("touched")
        modules = touched.get("modules") if isinstance(touched, Mapping) else touched
        if not isinstance(modules, list) or not modules:
            raise InputError("edit manifest has no touched.modules list: was it written by `ftedit edit`?")
        manifest = modules
    for i, entry in enumerate(manifest):
        if not isinstance(entry, Mapping) or "name" not in entry:
            raise InputError(f"edit manifest touched.modules[{i}]: expected an object with 'name', got {entry!r}")
    return [dict(e) for e in manifest]


def _resolve_module(model: nn.Module, entry: Mapping[str, Any]) -> nn.Module:
    try:
        return model.get_submodule(entry["name"])
    except AttributeError:
        pass
    # The same architecture under another wrapper (e.g. a PEFT model): find it by layer and role instead.
    layer, role = entry.get("layer"), entry.get("role")
    _, blocks = find_blocks(model)
    if isinstance(layer, int) and 0 <= layer < len(blocks):
        if role == "block":
            return blocks[layer]
        present = block_roles(blocks[layer])
        if role in present:
            return present[role][1]
    raise SelectionError(f"edit manifest module {entry['name']!r} (layer {layer}, role {role}) "
                         f"is not in this {type(model).__name__}")


def touched_parameter_names(model: nn.Module, manifest, remove_duplicate: bool = False) -> list[str]:
    """Names of every parameter of the modules an edit touched (see :func:`touched_modules`)."""
    ids = set()
    for entry in touched_modules(manifest):
        ids |= {id(p) for p in _resolve_module(model, entry).parameters()}
    return [n for n, p in model.named_parameters(remove_duplicate=remove_duplicate) if id(p) in ids]


def protect_edits(model: nn.Module, manifest) -> FreezeHandle:
    """Freeze every parameter of the modules an edit touched, so downstream fine-tuning cannot move them.

    ``manifest``: the dict, the manifest.json path or the output folder of ``ftedit edit``, or a list of
    ``{"name", "layer", "role"}`` entries (``AppliedEdit.touched``). Returns a handle; ``handle.undo()`` unfreezes.
    """
    names = touched_parameter_names(model, manifest)
    handle = freeze_parameters(model, names, "edits")
    logger.info("protect_edits: froze %d tensors (%s parameters)", len(names), f"{handle.n_frozen:,}")
    return handle


class ProtectEditsCallback(TrainerCallback):
    """``transformers.Trainer`` callback: freeze the edited modules when training begins, unfreeze at its end.

    ``Trainer(model, ..., callbacks=[ProtectEditsCallback("edited/manifest.json")])``. The optimizer may hold
    the frozen tensors, but they get no gradient, so they are never updated.
    """

    def __init__(self, manifest, restore_at_end: bool = True):
        self.modules = touched_modules(manifest)
        self.restore_at_end = restore_at_end
        self.handle: FreezeHandle | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("ProtectEditsCallback needs the model; Trainer passes it to callbacks")
        self.handle = protect_edits(model, self.modules)

    def on_train_end(self, args, state, control, **kwargs):
        if self.restore_at_end and self.handle is not None:
            self.handle.undo()
            self.handle = None


STRATEGY_HELP = "none | below:K | window:LAYERS | edits"


def apply_strategy(model: nn.Module, spec: str, touched=None) -> FreezeHandle:
    """Apply a strategy named as in the module docstring; ``edits`` needs ``touched`` (a manifest or list)."""
    kind, _, arg = spec.partition(":")
    if kind == "none" and not arg:
        return FreezeHandle("none")
    if kind == "below" and arg:
        return freeze_below(model, int(arg))
    if kind == "window" and arg:
        return freeze_all_but_window(model, arg)
    if kind == "edits" and not arg:
        if touched is None:
            raise InputError("strategy 'edits' needs the edit's manifest (touched modules)")
        return protect_edits(model, touched)
    raise InputError(f"unknown freezing strategy {spec!r}; expected {STRATEGY_HELP}")
