"""The model a benchmark runs on: a real one through ``load_model``, or ``--tiny``'s random Llama for a smoke run."""

from __future__ import annotations

import sys
from pathlib import Path

from ftedit.models import load_model, prepare_tokenizer


def bench_model(spec: str, tiny: bool):
    """``(model, tokenizer)``: ``load_model(spec)``, or with ``tiny`` the tests' tiny Llama and tokenizer."""
    if not tiny:
        model, tok, _ = load_model(spec)
        return model, tok
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import tiny as tiny_models

    tok = prepare_tokenizer(tiny_models.metaspace_tokenizer())
    return tiny_models.tiny_llama(tok), tok
