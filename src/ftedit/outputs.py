"""Writing results: atomic files and directories, the edited model or adapter, and manifest.json."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ftedit import __version__
from ftedit.atomic import atomic_directory, write_json_atomic
from ftedit.config import save_config
from ftedit.data.requests import EditRequest, request_hash
from ftedit.ledger import LEDGER_NAME, LedgerEntry, new_entries, write_ledger


def build_manifest(result, requests: Sequence[EditRequest], base_identity: dict[str, Any],
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "ftedit_version": __version__,
        "base_model": base_identity,
        "recipe": result.config.recipe,
        "config": result.config.to_dict(),
        "seed": result.config.train.seed,
        "touched": {
            "method": result.config.params.method,
            "layers": sorted({t["layer"] for t in result.targets}),
            "modules": result.targets,
            "trainable_parameters": result.trainable_parameters,
            "location": result.location or {"source": "config"},
        },
        "examples_by_kind": result.examples_by_kind,
        "training": [vars(r) for r in result.train],
        "seconds": result.seconds,
        "edits": [{"hash": request_hash(r), **r.to_dict()} for r in requests],
        **(extra or {}),
    }


def ledger_entries(result, manifest: dict[str, Any], history: Sequence[LedgerEntry] = ()) -> list[LedgerEntry]:
    """Ledger lines for the edits in ``manifest`` (written into ``manifest["base_model"]`` after ``history``)."""
    requests = [EditRequest.from_dict({k: v for k, v in e.items() if k != "hash"}) for e in manifest["edits"]]
    return new_entries(requests, method=result.config.params.method, recipe=result.config.recipe,
                       config=result.config.to_dict(), parent=manifest.get("base_model", {}), earlier=history)


def save_edit(out_dir: str | Path, result, tok, manifest: dict[str, Any], save: str = "model",
              overwrite: bool = False, history: Sequence[LedgerEntry] = (),
              state_dict: dict[str, Any] | None = None) -> Path:
    """Write the edited model (``save="model"``), only the LoRA adapter (``"adapter"``) or neither (``"none"``).

    With a model or adapter, ``ledger.jsonl`` lists ``history`` (the base model's ledger) and then this
    edit's requests, both in the output directory and inside the model/adapter directory. ``state_dict``:
    the weights to write instead of the model's own (a sharded model's, gathered).
    """
    with atomic_directory(out_dir, overwrite) as tmp:
        if save == "model":
            model = result.merged_model()
            model.save_pretrained(tmp / "model", safe_serialization=True, state_dict=state_dict)
            tok.save_pretrained(tmp / "model")
        elif save == "adapter":
            if not result.config.params.method == "lora":
                raise ValueError("--save adapter needs params.method=lora; full-weight edits save the model")
            result.model.save_pretrained(tmp / "adapter")
        elif save != "none":
            raise ValueError(f"unknown save mode {save!r}: use model, adapter or none")
        if save != "none":  # a ledger lists the edits a saved model carries; with nothing saved there is none
            entries = ledger_entries(result, manifest, history)
            for where in (tmp, tmp / save):
                write_ledger(where / LEDGER_NAME, history, entries)
        save_config(result.config, tmp / "config.yaml")
        write_json_atomic(tmp / "manifest.json", manifest)
    return Path(out_dir)
