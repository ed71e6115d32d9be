"""``ftedit retention``: parse the command line into a StudyConfig, load the models, run, write the report."""

from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ftedit.errors import InputError, MissingInputError, OutputDirError
from ftedit.models import load_model
from ftedit.retention.finetune import DownstreamConfig
from ftedit.retention.report import write_report
from ftedit.retention.study import StudyConfig, run_study
from ftedit.retention.tasks import TASK_KINDS, TaskConfig

logger = logging.getLogger(__name__)


def _pairs(values: list[str], option: str) -> dict[str, str]:
    out = {}
    for v in values:
        key, sep, value = v.partition("=")
        if not sep or key not in TASK_KINDS:
            raise InputError(f"{option} {v!r}: expected KIND=VALUE with KIND in {TASK_KINDS}")
        out[key] = value
    return out


def parse_tasks(tasks: list[str], thresholds: list[str], common: dict[str, Any]) -> list[TaskConfig]:
    """``--task lm=FILE --threshold lm=3.0`` -> TaskConfigs (shared n_train, n_val, max_length, seed)."""
    sources = _pairs(tasks, "--task")
    if len(sources) != len(tasks):
        raise InputError("--task: each task kind may be given once")
    limits = _pairs(thresholds, "--threshold")
    unknown = set(limits) - set(sources)
    if unknown:
        raise InputError(f"--threshold given for tasks not in --task: {sorted(unknown)}")
    configs = []
    for kind, source in sources.items():
        text = limits.get(kind)
        relative = bool(text and text.startswith("rel:"))
        try:
            value = float(text[4:] if relative else text) if text else None
        except ValueError as e:
            raise InputError(f"--threshold {kind}={text}: expected a number or rel:FACTOR") from e
        configs.append(TaskConfig(kind, source, threshold=value, relative=relative, **common))
    return configs


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / "manifest.json"
    if not path.is_file():
        raise MissingInputError(f"--from-edit {folder}: no manifest.json (is it an `ftedit edit` output folder?)")
    return json.loads(path.read_text())


def print_summary(console: Console, result: dict[str, Any]) -> None:
    table = Table(title=f"retention (%) — {result['protocol']} protocol, {result['n_edits']} edits, "
                        f"{result['n_intrinsic']} intrinsic facts")
    for col in ("task", "strategy", "stopped by", "steps", "edited post-edit", "edited end", "intrinsic post-edit",
                "intrinsic end"):
        table.add_column(col)
    for run in result["runs"]:
        first, last = run["curve"][0], run["curve"][-1]
        table.add_row(run["task"], run["strategy"], str(run["log"]["stopped_by"]), str(run["log"]["steps"]),
                      *(f"{v:.1f}" if v is not None else "n/a" for v in
                        (first["edited"], last["edited"], first["intrinsic"], last["intrinsic"])))
    console.print(table)


def run_retention(cfg: StudyConfig, *, model: str, out: Path, overwrite: bool, device: str | None, dtype: str,
                  progress: bool, console: Console) -> dict[str, Any]:
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
        cfg.method = manifest.get("recipe", cfg.method)
    base, tok, identity = load_model(model or "demo", device=device, dtype=dtype)
    extra = {"base_model": identity.to_dict(), "command": "ftedit " + " ".join(shlex.quote(a) for a in sys.argv[1:])}
    result = run_study(cfg, base, tok, edited_model=edited, manifest=manifest, progress=progress,
                       on_partial=lambda partial: write_report(out, {**partial, **extra}))
    result.update(extra)
    write_report(out, result)
    print_summary(console, result)
    console.print(f"wrote {out}/report.md, result.json and the plots")
    return result


def downstream_config(**kwargs) -> DownstreamConfig:
    return DownstreamConfig(**{k: v for k, v in kwargs.items() if v is not None})
