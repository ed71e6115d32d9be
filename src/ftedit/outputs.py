"""Writing results: atomic files and directories, the edited model or adapter, and manifest.json."""

from __future__ import annotations

import json
import logging
import shlex
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from ftedit import __version__
from ftedit.adapters import SAVED_ALONE
from ftedit.atomic import atomic_directory, remove_stale_temps, write_json_atomic
from ftedit.checkpoint import STATE_NAME
from ftedit.data.requests import EditRequest, request_hash
from ftedit.errors import Interrupted, OutputDirError, UsageError, on_interrupt
from ftedit.ledger import LEDGER_NAME, LedgerEntry, new_entries, write_ledger
from ftedit.registry import AppliedEdit

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"  # inside --out while training; replaced by the finished edit
#: What a finished edit's folder may hold: everything ftedit writes there, nothing else.
RESULT_ENTRIES = frozenset({"manifest.json", "config.yaml", LEDGER_NAME, "model", "adapter", "codebook",
                            CHECKPOINT_DIR})
NEW_DIR_HINT = "choose a new or empty --out directory (ftedit never deletes files it did not write)"


def is_finished_result(out: Path) -> bool:
    """``out`` holds a finished ftedit result: a manifest.json that ftedit wrote."""
    try:
        manifest = json.loads((Path(out) / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "ftedit_version" in manifest


def _is_checkpoint_only(out: Path) -> bool:
    """``out`` holds nothing but an interrupted run's checkpoint folder (its state file and atomic-write temps)."""
    names = {p.name for p in out.iterdir()}
    if names != {CHECKPOINT_DIR} or not (out / CHECKPOINT_DIR).is_dir():
        return False
    return all(p.name.startswith(STATE_NAME) for p in (out / CHECKPOINT_DIR).iterdir())


def _check_not_base(out: Path, model_spec: str | None) -> None:
    if not model_spec:
        return
    base = Path(model_spec).expanduser().resolve()
    target = out.resolve()
    if base.exists() and (target == base or base.is_relative_to(target) or target.is_relative_to(base)):
        raise OutputDirError(f"--out {out} would overwrite the base model at {base}",
                             hint="choose a directory outside the model's")


def check_writable(out: Path) -> None:
    """Raise :class:`OutputDirError` unless ``out`` (or, if absent, its nearest existing parent) takes new files."""
    probe_in = Path(out)
    while not probe_in.exists():
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise OutputDirError(f"cannot create --out {out}: {probe_in} is a file, not a directory")
    try:
        Path(tempfile.mkdtemp(prefix=".ftedit-probe-", dir=probe_in)).rmdir()
    except OSError as e:
        raise OutputDirError(f"cannot write to --out {out}: {probe_in} is not writable ({e.strerror})",
                             hint="choose a directory you can write to") from None


def prepare_output_dir(out: str | Path, *, overwrite: bool = False, resume: bool = False,
                       base_model: str | None = None) -> Path:
    """Check, before any model is loaded, that an edit may write its result to ``out``; return it as a Path.

    ``out`` may be absent or empty. A finished ftedit result is replaced only with ``overwrite``; an
    interrupted run's checkpoint is continued with ``resume`` or started over with ``overwrite``. A folder
    holding anything else is refused whatever the flags: ftedit never deletes files it did not write.
    Temp folders left beside ``out`` by an interrupted save are removed.
    """
    out = Path(out)
    _check_not_base(out, base_model)
    for stale in remove_stale_temps(out):
        logger.warning("removed %s, left by an interrupted save", stale)
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"--out {out} is a file, not a directory", hint=NEW_DIR_HINT)
    check_writable(out)
    if not out.exists() or not any(out.iterdir()):
        if resume:
            logger.warning("--resume: %s holds no checkpoint; starting from the beginning", out)
        return out
    if is_finished_result(out):
        _check_result_dir(out, overwrite)
    elif _is_checkpoint_only(out):
        if not (resume or overwrite):
            raise OutputDirError(f"output directory {out} holds an interrupted edit (its checkpoint)",
                                 hint="pass --resume to continue it, or --overwrite to start over")
    else:
        raise OutputDirError(f"--out {out} already exists and holds files ftedit did not write "
                             f"({_listing(out)})", hint=NEW_DIR_HINT)
    return out


def _check_result_dir(out: Path, overwrite: bool) -> None:
    foreign = sorted(p.name for p in out.iterdir() if p.name not in RESULT_ENTRIES)
    if foreign:
        raise OutputDirError(f"--out {out} holds a finished edit plus files ftedit did not write "
                             f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''})", hint=NEW_DIR_HINT)
    if not overwrite:
        raise OutputDirError(f"output directory {out} already exists (a finished edit)",
                             hint="pass --overwrite to replace it, or choose another --out")


def _listing(out: Path, limit: int = 3) -> str:
    names = sorted(p.name for p in out.iterdir())
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def checkpoint_state(out: Path) -> Path | None:
    """The resumable checkpoint an edit left in ``out``, if any."""
    path = Path(out) / CHECKPOINT_DIR / STATE_NAME
    return path if path.is_file() else None


def _discard_unsaved(out: Path, existed: bool) -> None:
    """After an interruption with no checkpoint: remove the empty folders this run created in ``out``."""
    ckpt = out / CHECKPOINT_DIR
    if ckpt.is_dir() and not any(ckpt.iterdir()):
        ckpt.rmdir()
    if not existed and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def edit_command(argv: Sequence[str] | None, resume: bool) -> str:
    """``ftedit ARGV`` with or without ``--resume`` (a description when the arguments are unknown)."""
    if argv is None:
        return "the same command" + (" with --resume" if resume else " again")
    return shlex.join(["ftedit", *[a for a in argv if a != "--resume"], *(["--resume"] if resume else [])])


def interrupted_edit(out: Path, existed: bool, argv: Sequence[str] | None = None) -> Interrupted:
    """The error for Ctrl-C during an edit writing to ``out`` (run with arguments ``argv``): what was kept, and
    the command that continues."""
    out = Path(out)
    state = checkpoint_state(out)
    if state is None:
        _discard_unsaved(out, existed)
        return Interrupted(f"interrupted before the first checkpoint: nothing was saved in {out}",
                           hint=f"start over with: {edit_command(argv, resume=False)}")
    return Interrupted(f"interrupted: no edited model was written; training progress is saved in {state}",
                       hint=f"continue with: {edit_command(argv, resume=True)}")


@contextmanager
def report_interruption(out: Path, argv: Sequence[str] | None = None) -> Iterator[None]:
    """Turn Ctrl-C inside the block into :class:`Interrupted` describing ``out`` (temp folders are already gone:
    :func:`~ftedit.atomic.atomic_directory` removes its own)."""
    existed = Path(out).exists()
    with on_interrupt(lambda: interrupted_edit(out, existed, argv)):
        yield


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
    """Write the edited model (``save="model"``), only the LoRA adapter (``"adapter"``), an edit kept beside
    the weights (``"codebook"``: GRACE's, see :func:`ftedit.baselines.grace.load_grace`) or none (``"none"``).

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
                raise UsageError(f"--save adapter needs LoRA adapters (params.method=lora); {applied.method} "
                                 "changed the weights themselves: use --save model or none")
            applied.model.save_pretrained(tmp / "adapter")
        elif save == "codebook":
            if applied.save_state is None:
                raise UsageError(f"--save codebook: {applied.method} keeps no codebook; use --save model or none")
            applied.save_state(tmp / "codebook")
        elif save != "none":
            raise UsageError(f"unknown save mode {save!r}: use model, adapter, codebook or none")
        if save != "none":  # a ledger lists the edits a saved model carries; with nothing saved there is none
            entries = ledger_entries(applied, manifest, history, adapter=SAVED_ALONE if save == "adapter" else "")
            for where in (tmp, tmp / save):
                write_ledger(where / LEDGER_NAME, history, entries)
        (tmp / "config.yaml").write_text(yaml.safe_dump(applied.config, sort_keys=False))
        write_json_atomic(tmp / "manifest.json", manifest)
    return Path(out_dir)
