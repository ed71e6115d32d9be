from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402
from ftedit.models import prepare_tokenizer  # noqa: E402
from ftedit.precision import ENV_OVERRIDE  # noqa: E402


@pytest.fixture(autouse=True)
def _host_independent_precision(monkeypatch):
    """Tests see a CPU without bf16 units, whatever the host has; the tests of auto precision opt in."""
    monkeypatch.setenv(ENV_OVERRIDE, "0")


@pytest.fixture(scope="session")
def gpt2_tok():
    return prepare_tokenizer(tiny.byte_level_tokenizer())


@pytest.fixture(scope="session")
def llama_tok():
    return prepare_tokenizer(tiny.metaspace_tokenizer())


@pytest.fixture
def gpt2_model(gpt2_tok):
    return tiny.tiny_gpt2(gpt2_tok)


@pytest.fixture
def llama_model(llama_tok):
    return tiny.tiny_llama(llama_tok)


@pytest.fixture
def gemma_model(llama_tok):
    return tiny.tiny_gemma3(llama_tok)


def _saved(path, model, tok):
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def llama_dir(tmp_path, llama_model, llama_tok):
    """The tiny Llama and its tokenizer saved as a local Hugging Face directory."""
    return _saved(tmp_path / "tiny-llama", llama_model, llama_tok)


@pytest.fixture
def gpt2_dir(tmp_path, gpt2_model, gpt2_tok):
    return _saved(tmp_path / "tiny-gpt2", gpt2_model, gpt2_tok)


@pytest.fixture(scope="session")
def data_dir():
    if not tiny.DATA.exists():
        pytest.skip(f"shared data not found at {tiny.DATA}")
    return tiny.DATA


@pytest.fixture(autouse=True)
def _single_thread(request):
    """Tiny models gain nothing from threads; on a shared 2-core machine OpenMP waits make them ~50x slower."""
    if request.node.get_closest_marker("real_model") is not None:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _isolated_cache(request, tmp_path, monkeypatch):
    """Unit tests never write to the user's cache; real-model tests reuse it (dequantizing takes a minute)."""
    if request.node.get_closest_marker("real_model") is None:
        monkeypatch.setenv("FTEDIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(autouse=True)
def _small_calibration(request, monkeypatch):
    """Unit tests search locations on 5 fixture records instead of the shipped 120 (tiny models, fast)."""
    small = tiny.FIXTURES / "counterfact_rome_format_first5.json"
    if request.node.get_closest_marker("real_model") is None and small.exists():
        monkeypatch.setattr("ftedit.calibration.calibration_path", lambda: small)
