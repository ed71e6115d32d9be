"""``ftedit retention`` as a library call: load the models, run the study, write the report."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

from ftedit.errors import MissingInputError, OutputDirError
from ftedit.models import load_model
from ftedit.retention.report import write_report
from ftedit.retention.study import StudyConfig, run_study


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / "manifest.json"
    if not path.is_file():
        raise MissingInputError(f"--from-edit {folder}: no manifest.json (is it an `ftedit edit` output folder?)")
    return json.loads(path.read_text())


def run_retention(cfg: StudyConfig, *, model: str, out: Path, overwrite: bool, device: str | None, dtype: str,
                  progress: bool) -> dict[str, Any]:
    """``ftedit retention``: load the base (and an earlier edit's) model, run the study, write the report."""
    out = Path(out)
    if (out / "result.json").exists() and not overwrite:
        raise OutputDirError(f"{out} already holds a study", hint="pass --overwrite to replace it")
    manifest = edited = None
    if cfg.from_edit:
        manifest = _read_manifest(Path(cfg.from_edit))
        model = model or manifest["base_model"]["spec"]
        model_dir = Path(cfg.from_edit) / "model"
        if not model_dir.is_dir():
            raise MissingInputError(f"--from-edit {cfg.from_edit}: no model/ folder (edit saved with --save none?)")
        edited, _, _ = load_model(str(model_dir), device=device, dtype=dtype)
        cfg.methods = [manifest.get("recipe") or manifest.get("method") or cfg.methods[0]]
    base, tok, identity = load_model(model or "demo", device=device, dtype=dtype)
    extra = {"base_model": identity.to_dict(), "command": "ftedit " + " ".join(shlex.quote(a) for a in sys.argv[1:])}
    result = run_study(cfg, base, tok, edited_model=edited, manifest=manifest, progress=progress, identity=identity,
                       on_partial=lambda partial: write_report(out, {**partial, **extra}))
    result.update(extra)
    write_report(out, result)
    return result
