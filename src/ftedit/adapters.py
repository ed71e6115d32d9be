"""LoRA adapters of several edit runs on one base model, stacked or merged with peft's own tools.

Each ``ftedit edit --set params.method=lora --save adapter`` run writes a peft adapter directory whose
``ledger.jsonl`` lists the base model's history and the run's edits (``adapter="default"``, peft's name for
an adapter saved alone). :func:`stack_adapters` loads several of them into one ``PeftModel``
(``PeftModel.from_pretrained`` for the first, ``load_adapter`` for the rest, each under its own name) and
activates all of them, so their updates add up; :meth:`AdapterStack.merge` folds them into one adapter
(``add_weighted_adapter(..., combination_type="cat")``: the ranks concatenate, so the merged update is exactly
the sum). The stack's ledger tags every edit with the name of the adapter that carries it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn

from ftedit.atomic import atomic_directory
from ftedit.data.requests import EditRequest
from ftedit.ledger import LEDGER_NAME, LedgerEntry, check_conflicts, read_ledger, write_ledger
from ftedit.models import ADAPTER_CONFIG, freeze, is_adapter_dir

logger = logging.getLogger(__name__)

SAVED_ALONE = "default"  # peft's adapter name in a directory saved from a single adapter


def _named(adapters: Sequence[str | Path] | Mapping[str, str | Path]) -> dict[str, Path]:
    if isinstance(adapters, Mapping):
        named = {str(k): Path(v) for k, v in adapters.items()}
    else:
        named = {f"edit{i}": Path(p) for i, p in enumerate(adapters)}
    if not named:
        raise ValueError("no adapters to stack")
    for name, path in named.items():
        if "." in name or not name:
            raise ValueError(f"adapter name {name!r}: peft names may not be empty or contain dots")
        if not is_adapter_dir(path):
            raise ValueError(f"adapter {name!r}: {path} has no {ADAPTER_CONFIG} (an `ftedit edit --save adapter` "
                             "output's adapter/ directory)")
    return named


def _own_entries(path: Path, name: str) -> tuple[list[LedgerEntry], list[LedgerEntry]]:
    """(history carried by the base weights, edits this adapter carries renamed to ``name``) of an adapter dir."""
    entries = read_ledger(path) if (path / LEDGER_NAME).is_file() else []
    if not entries:
        logger.warning("adapter %r at %s has no %s: the stack's ledger cannot say which edits it carries",
                       name, path, LEDGER_NAME)
    history = [e for e in entries if not e.adapter]
    return history, [replace(e, adapter=name) for e in entries if e.adapter]


def _as_request(e: LedgerEntry) -> EditRequest:
    return EditRequest(prompt=e.prompt, subject=e.subject, target_new=e.target_new, target_true=e.target_true,
                       case_id=e.case_id, relation_id=e.relation_id)


@dataclass
class AdapterStack:
    """A ``PeftModel`` with several active LoRA adapters and the ledger of the edits each one carries."""

    model: nn.Module  # peft.PeftModel
    names: list[str]
    history: list[LedgerEntry]  # edits in the base weights (the adapters' common history)
    entries: list[LedgerEntry]  # the adapters' edits, ``adapter`` = the name in ``model``

    def carried_by(self, name: str) -> list[LedgerEntry]:
        return [e for e in self.entries if e.adapter == name]

    def merge(self, name: str = "merged", weights: Sequence[float] | None = None) -> AdapterStack:
        """Fold the active adapters into one (peft ``add_weighted_adapter``, ``cat``) and drop the originals."""
        weights = list(weights) if weights is not None else [1.0] * len(self.names)
        self.model.add_weighted_adapter(self.names, weights, name, combination_type="cat")
        self.model.set_adapter(name)
        for old in self.names:
            self.model.delete_adapter(old)
        freeze(self.model)
        return AdapterStack(self.model, [name], self.history, [replace(e, adapter=name) for e in self.entries])

    def save(self, out: str | Path, overwrite: bool = False) -> Path:
        """``model.save_pretrained(out)`` (peft: one subdirectory per adapter not named "default") + the ledger."""
        with atomic_directory(out, overwrite) as tmp:
            self.model.save_pretrained(tmp)
            write_ledger(tmp / LEDGER_NAME, self.history, self.entries)
        return Path(out)


def stack_adapters(base: nn.Module, adapters: Sequence[str | Path] | Mapping[str, str | Path], *,
                   on_conflict: str = "warn") -> AdapterStack:
    """Load ``adapters`` (adapter directories; a mapping names them, a list names them edit0, edit1, ...) onto
    ``base`` with peft and activate them all. Edits of later adapters that contradict earlier ones are
    reported per ``on_conflict`` (see :func:`ftedit.ledger.check_conflicts`)."""
    from peft import PeftModel

    named = _named(adapters)
    history: list[LedgerEntry] = []
    entries: list[LedgerEntry] = []
    model = None
    for name, path in named.items():
        own_history, own = _own_entries(path, name)
        history = history or own_history
        check_conflicts(history + entries, [_as_request(e) for e in own], on_conflict, source=f"adapter {name}")
        entries += own
        if model is None:
            model = PeftModel.from_pretrained(base, str(path), adapter_name=name)
        else:
            model.load_adapter(str(path), adapter_name=name)
    model.base_model.set_adapter(list(named))  # all active: their LoRA updates add up
    freeze(model)
    return AdapterStack(model, list(named), history, entries)
