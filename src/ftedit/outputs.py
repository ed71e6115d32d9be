"""Writing results: atomic files and directories, the edited model or adapter, and manifest.json."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from ftedit import __version__
from ftedit.adapters import SAVED_ALONE
from ftedit.atomic import atomic_directory, write_json_atomic
from ftedit.data.requests import EditRequest, request_hash
from ftedit.ledger import LEDGER_NAME, LedgerEntry, new_entries, write_ledger
from ftedit.registry import AppliedEdit

logger = logging.getLogger(__name__)


CHECKPOINT_DIR = "checkpoint"  # inside an edit's output directory while training; replaced by the finished edit


def check_out_dir(out: Path, model_spec: str) -> None:
    """Refuse an output directory that is, holds or lies inside the base model's directory."""
    base = Path(model_spec).expanduser().resolve()
    target = out.resolve()
    if base.exists() and (target == base or base.is_relative_to(target) or target.is_relative_to(base)):
        raise ValueError(f"--out {out} would overwrite the base model at {base}; choose another directory")


def check_existing(out: Path, overwrite: bool, resume: bool) -> None:
    """An existing --out is replaced only with --overwrite, or continued with --resume if it holds a checkpoint."""
    if not out.exists():
        if resume:
            logger.warning("--resume: %s does not exist; starting from the beginning", out)
        return
    if (out / "manifest.json").is_file() and not overwrite:
        raise FileExistsError(f"output directory {out} already exists (a finished edit); pass --overwrite to replace it")
    if resume or overwrite:
        return
    hint = " or --resume to continue it" if (out / CHECKPOINT_DIR).is_dir() else ""
    raise FileExistsError(f"output directory {out} already exists; pass --overwrite to replace it{hint}")


def build_manifest(applied: AppliedEdit, requests: Sequence[EditRequest], base_identity: dict[str, Any],
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of an edit, one schema for every method: ``method`` is the registered method (recipe or
    baseline), ``touched.weights`` whether it changed the weights (``full``) or trained LoRA adapters."""
    return {
        "ftedit_version": __version__,
        "base_model": base_identity,
        "method": applied.method,
        "recipe": applied.method,
        "config": applied.config,
        "seed": applied.seed,
        "touched": {
            "weights": applied.weights,
            "layers": applied.layers,
            "modules": applied.touched_dicts(),
            "trainable_parameters": applied.trainable_parameters,
            "location": applied.location or {"source": "config"},
        },
        "examples_by_kind": applied.examples_by_kind,
        "training": [vars(r) for r in applied.train],
        "seconds": applied.phase_seconds,
        "edits": [{"hash": request_hash(r), **r.to_dict()} for r in requests],
        **(extra or {}),
    }


def ledger_entries(applied: AppliedEdit, manifest: dict[str, Any],
                   history: Sequence[LedgerEntry] = (), adapter: str = "") -> list[LedgerEntry]:
    """Ledger lines for the edits in ``manifest`` (written into ``manifest["base_model"]`` after ``history``);
    ``adapter``: the name of the LoRA adapter that carries them ("" when they are in the weights)."""
    requests = [EditRequest.from_dict({k: v for k, v in e.items() if k != "hash"}) for e in manifest["edits"]]
    return new_entries(requests, method=applied.weights, recipe=applied.method, config=applied.config,
                       parent=manifest.get("base_model", {}), earlier=history, adapter=adapter)


def save_edit(out_dir: str | Path, applied: AppliedEdit, tok, manifest: dict[str, Any], save: str = "model",
              overwrite: bool = False, history: Sequence[LedgerEntry] = (),
              state_dict: dict[str, Any] | None = None) -> Path:
    """Write the edited model (``save="model"``), only the LoRA adapter (``"adapter"``) or neither (``"none"``).

    With a model or adapter, ``ledger.jsonl`` lists ``history`` (the base model's ledger) and then this
    edit's requests, both in the output directory and inside the model/adapter directory. ``state_dict``:
    the weights to write instead of the model's own (a sharded model's, gathered).
    """
    with atomic_directory(out_dir, overwrite) as tmp:
        if save == "model":
            model = applied.merged_model()
            model.save_pretrained(tmp / "model", safe_serialization=True, state_dict=state_dict)
            tok.save_pretrained(tmp / "model")
        elif save == "adapter":
            if applied.weights != "lora":
                raise ValueError(f"--save adapter needs LoRA adapters (params.method=lora); {applied.method} "
                                 "changed the weights themselves: use --save model or none")
            applied.model.save_pretrained(tmp / "adapter")
        elif save != "none":
            raise ValueError(f"unknown save mode {save!r}: use model, adapter or none")
        if save != "none":  # a ledger lists the edits a saved model carries; with nothing saved there is none
            entries = ledger_entries(applied, manifest, history, adapter=SAVED_ALONE if save == "adapter" else "")
            for where in (tmp, tmp / save):
                write_ledger(where / LEDGER_NAME, history, entries)
        (tmp / "config.yaml").write_text(yaml.safe_dump(applied.config, sort_keys=False))
        write_json_atomic(tmp / "manifest.json", manifest)
    return Path(out_dir)
