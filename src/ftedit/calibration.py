"""The calibration set: COUNTERFACT records, from its training split only, on which ``layers: auto`` searches.

Where to edit is a property of the model, not of a user's edits: the search trains and scores its trials on
these records (each with paraphrase and neighborhood prompts), never on the edits it places, so an edit is
never evaluated on prompts that chose its location. :func:`build_calibration_set` makes the shipped file
reproducibly from the full-schema union and the EasyEdit splits (``benchmarks/build_calibration.py``).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Sequence
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

CALIBRATION_FILE = "calibration_counterfact.json"
POOL_FILE = "demo_pool.json"  # 300 COUNTERFACT train-split facts (true answers), the shipped locality pool
SHIPPED_POOL = "shipped"  # augment.pool value that names the shipped pool
KEEP = ("case_id", "requested_rewrite", "paraphrase_prompts", "neighborhood_prompts")


def resource(name: str) -> Path:
    return Path(str(files("ftedit.resources").joinpath(name)))


def calibration_path() -> Path:
    return resource(CALIBRATION_FILE)


def resolve_pool(value: str | None) -> str | None:
    """``augment.pool`` / ``--pool``: ``shipped`` is the package's train-split pool, anything else a path."""
    return str(resource(POOL_FILE)) if value == SHIPPED_POOL else value


def calibration_sha256(path: str | None = None) -> str:
    return _sha256(str(path or calibration_path()))


@cache  # keyed by the resolved path, so a different calibration file never reuses another's hash
def _sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def case_ids(path: str | Path) -> set[int]:
    return {int(r["case_id"]) for r in json.loads(Path(path).read_text())}


def build_calibration_set(union: Sequence[dict[str, Any]], train_ids: set[int], exclude_ids: Iterable[int],
                          n: int = 120, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` full-schema records whose case_id is in the training split and in none of ``exclude_ids`` (the
    edit and validation splits, the demo's edits), sampled with ``seed`` and sorted by case_id; each keeps its
    rewrite, 2 paraphrases and 10 neighbors."""
    excluded = set(exclude_ids)
    eligible = [r for r in union if r["case_id"] in train_ids and r["case_id"] not in excluded
                and r.get("paraphrase_prompts") and r.get("neighborhood_prompts")]
    if len(eligible) < n:
        raise ValueError(f"only {len(eligible)} training-split records are eligible, {n} asked for")
    chosen = random.Random(seed).sample(eligible, n)
    return [{k: r[k] for k in KEEP} for r in sorted(chosen, key=lambda r: r["case_id"])]
