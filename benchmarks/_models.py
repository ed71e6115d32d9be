"""The model loader the benchmark scripts share: the real model by ftedit's name, or the tests' tiny Gemma 3."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_bench_model(name: str, *, tiny: bool, dtype: str):
    """(model, tokenizer) on the CPU: ``tiny`` builds the test suite's random tiny Gemma 3 (no download)."""
    from ftedit.models import load_model, prepare_tokenizer

    if tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        import tiny as tiny_models

        tok = prepare_tokenizer(tiny_models.metaspace_tokenizer())
        return tiny_models.tiny_gemma3(tok), tok
    model, tok, _ = load_model(name, device="cpu", dtype=dtype)
    return model, tok
