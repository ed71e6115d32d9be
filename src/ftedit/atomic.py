"""Atomic writes: readers never see half a file or half a directory, and an interrupted run leaves none."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write to a temp file beside ``path``, fsync, and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the mode open() would
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _json_default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    return str(obj)


def write_json_atomic(path: str | Path, data: Any) -> Path:
    return write_bytes_atomic(path, (json.dumps(data, indent=2, default=_json_default) + "\n").encode("utf-8"))


def temp_prefix(target: Path) -> str:
    """Name prefix of the temp folders :func:`atomic_directory` creates beside ``target``."""
    return target.name + ".tmp-"


PARTIAL_MARKER = ".ftedit-partial"  # inside a temp folder until it is complete


def remove_stale_temps(target: str | Path) -> list[Path]:
    """Remove temp folders an interrupted :func:`atomic_directory` (e.g. SIGKILL while saving) left beside
    ``target``; return them. Only folders ftedit marked as its own partial writes are touched."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    candidates = target.parent.glob(glob.escape(temp_prefix(target)) + "*")
    stale = [p for p in candidates if p.is_dir() and (p / PARTIAL_MARKER).is_file()]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


@contextmanager
def atomic_directory(target: str | Path, overwrite: bool = False):
    """Yield a temp directory beside ``target``; on success it replaces ``target`` in one rename."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"output directory {target} already exists; pass --overwrite to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target), dir=target.parent))
    try:
        (tmp / PARTIAL_MARKER).touch()
        yield tmp
        (tmp / PARTIAL_MARKER).unlink()
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700; give the folder the mode mkdir() would
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
