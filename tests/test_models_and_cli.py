"""Model loading paths and the command line, end to end on a tiny model saved to disk."""

import hashlib
import json

import pytest
import torch
from typer.testing import CliRunner

from ftedit.commands import app
from ftedit.models import ModelLoadError, load_model, parse_dtype


def _digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def test_local_directory_loads_with_explicit_conventions(llama_dir):
    model, tok, identity = load_model(str(llama_dir), device="cpu")
    assert identity.source == "local" and identity.model_class == "LlamaForCausalLM"
    assert identity.fingerprint and identity.dtype == "float32"
    assert tok.padding_side == "right" and tok.pad_token is not None
    assert not model.training


def test_hub_name_goes_to_from_pretrained_and_fails_clearly_offline(monkeypatch):
    import huggingface_hub.constants

    # the env var is read at import time; patch the constant so no network is tried
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="no-such-org/no-such-model"):
        load_model("no-such-org/no-such-model", device="cpu")


def test_bad_paths_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        load_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        load_model(str(tmp_path / "weights.bin"))


def test_dtype_defaults():
    assert parse_dtype("auto", torch.device("cpu")) == torch.float32
    assert parse_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        parse_dtype("int3", torch.device("cpu"))


def test_cli_edit_writes_model_manifest_and_leaves_the_base_untouched(tmp_path, llama_dir, data_dir):
    before = _digest(llama_dir)
    out = tmp_path / "edited"
    args = ["edit", "--model", str(llama_dir), "--data", str(data_dir / "fixtures/counterfact_rome_format_first5.json"),
            "--recipe", "locft-bf", "--set", "train.epochs=3", "--set", "train.lr=1e-2", "--set", "params.layers=-2:",
            "--out", str(out), "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"] == "locft-bf" and len(manifest["edits"]) == 5
    assert manifest["touched"]["layers"] == [1, 2] and manifest["base_model"]["source"] == "local"
    assert set(manifest["evaluation"]["post"]) >= {"efficacy", "generalization", "locality", "edit_score"}
    assert (out / "model" / "model.safetensors").exists() and (out / "config.yaml").exists()
    assert _digest(llama_dir) == before
    again = CliRunner().invoke(app, args)
    assert again.exit_code != 0 and "already exists" in str(again.exception)


def test_cli_edit_refuses_to_write_into_the_base_model(llama_dir, data_dir):
    result = CliRunner().invoke(app, ["edit", "--model", str(llama_dir), "--data",
                                      str(data_dir / "fixtures/counterfact_rome_format_first5.json"),
                                      "--out", str(llama_dir / "edited"), "--no-progress"])
    assert result.exit_code != 0 and "overwrite the base model" in str(result.exception)


def test_cli_recipes_lists_all(data_dir):
    result = CliRunner().invoke(app, ["recipes"])
    assert result.exit_code == 0
    for name in ("ft", "ft-m", "locft-bf", "ft-mask-para-rand", "ft-mask-para-sim"):
        assert name in result.output
