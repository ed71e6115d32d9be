"""``ftedit retention`` as a library call: load the models, run the study, write the report."""

from __future__ import annotations

import json
import logging
import shlex
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ftedit.errors import Interrupted, MissingInputError, OutputDirError, UsageError
from ftedit.models import load_model
from ftedit.outputs import edit_command
from ftedit.retention.report import write_report
from ftedit.retention.study import Finished, StudyConfig, run_study

logger = logging.getLogger(__name__)


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / "manifest.json"
    if not path.is_file():
        raise MissingInputError(f"--from-edit {folder}: no manifest.json (is it an `ftedit edit` output folder?)")
    return json.loads(path.read_text())


def _saved_result(out: Path) -> dict[str, Any] | None:
    """The study's result.json in ``out`` (interim while ``"complete"`` is false), or None."""
    path = Path(out) / "result.json"
    return json.loads(path.read_text()) if path.exists() else None


def _study_to_resume(out: Path, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """The partial result.json a resumed study continues, or None to start afresh (refusing to clobber one)."""
    saved = None if overwrite else _saved_result(out)
    if saved is None:
        if resume and not overwrite:
            logger.info("nothing to resume in %s: starting the study", out)
        return None
    if saved.get("complete", True):
        raise OutputDirError(f"{out} already holds a complete study", hint="pass --overwrite to replace it")
    if not resume:
        raise OutputDirError(f"{out} holds an interrupted study ({len(saved.get('runs', []))} runs finished)",
                             hint="pass --resume to continue it, or --overwrite to start over")
    return saved


def _check_same_study(out: Path, saved: dict[str, Any], cfg: StudyConfig, identity: dict[str, Any]) -> None:
    config = json.loads(json.dumps(asdict(cfg)))  # as result.json holds it
    differ = sorted(f"config.{k}" for k in set(config) | set(saved["config"]) if config.get(k) != saved["config"].get(k))
    if saved.get("base_model") != identity:
        differ.append("base model")
    if differ:
        raise UsageError(f"--resume: the interrupted study in {out} ran with other settings: {', '.join(differ)}",
                         hint="repeat its command with --resume, or pass --overwrite to start over")


def interrupted_study(out: Path, argv: Sequence[str] | None = None) -> Interrupted:
    """The error for Ctrl-C during ``ftedit retention`` writing to ``out``: the finished runs its interim
    result.json keeps, and the command that continues."""
    try:
        runs = len((_saved_result(out) or {}).get("runs", []))
    except (OSError, ValueError):
        runs = 0
    if not runs:
        return Interrupted(f"interrupted before the first downstream run finished: no run was kept in {out}",
                           hint=f"start over with: {edit_command(argv, resume=False)}")
    return Interrupted(f"interrupted: {runs} finished downstream runs are kept in {Path(out) / 'result.json'}",
                       hint=f"continue with: {edit_command(argv, resume=True)}")


def run_retention(cfg: StudyConfig, *, model: str, out: Path, overwrite: bool, device: str | None, dtype: str,
                  progress: bool, resume: bool = False) -> dict[str, Any]:
    """``ftedit retention``: load the base (and an earlier edit's) model, run the study, write the report.

    ``resume`` continues the interrupted study in ``out`` (same settings and base model): its finished runs
    are kept and only the missing ones run.
    """
    out = Path(out)
    saved = _study_to_resume(out, resume, overwrite)
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
    finished = None
    if saved is not None:
        _check_same_study(out, saved, cfg, identity.to_dict())
        finished = Finished.from_result(saved)
        logger.info("resuming the study in %s: %d runs finished", out, len(finished.runs))
    extra = {"base_model": identity.to_dict(), "command": "ftedit " + " ".join(shlex.quote(a) for a in sys.argv[1:])}
    result = run_study(cfg, base, tok, edited_model=edited, manifest=manifest, progress=progress, identity=identity,
                       on_partial=lambda partial: write_report(out, {**partial, **extra}), finished=finished)
    result.update(extra)
    write_report(out, result)
    return result
