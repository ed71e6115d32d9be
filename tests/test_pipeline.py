"""``ftedit edit`` runs every method through one pipeline: ledger, conflict check, seed and manifest alike."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from ftedit import pipeline
from ftedit.commands import app
from ftedit.ledger import ContradictionError, read_ledger

FIXTURE = "fixtures/counterfact_rome_format_first5.json"
BASELINES = ("rome", "memit", "alphaedit")


@pytest.fixture
def settings(tmp_path, data_dir):
    """Small closed-form settings: a 12-text key-statistics corpus, few value steps."""
    lines = (data_dir / "downstream" / "wiki_summaries.jsonl").read_text().splitlines()[:12]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(lines) + "\n")
    over = [f"stats.corpus={corpus}", "stats.n_samples=4", "value.steps=3", "value.context_lengths=[3]",
            "value.context_seeds=[The]"]
    recipe = ["train.epochs=1", "params.layers=-1"]
    return {"baseline": [a for o in over for a in ("--set", o)], "recipe": [a for o in recipe for a in ("--set", o)]}


def _records(data_dir, tmp_path, name, start, stop, target=None):
    records = json.loads((data_dir / FIXTURE).read_text())[start:stop]
    if target:
        records[0]["requested_rewrite"]["target_new"]["str"] = target
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(records))
    return path


def _edit(model, data, out, recipe, *extra):
    args = ["edit", "--model", str(model), "--data", str(data), "--out", str(out), "--recipe", recipe,
            "--no-progress", *extra]
    return CliRunner().invoke(app, args)


def _keys(manifest):
    return set(manifest), set(manifest["touched"]), set(manifest["evaluation"])


@pytest.mark.parametrize("method", BASELINES)
def test_baseline_writes_the_ledger_and_the_recipe_manifest_schema(method, tmp_path, llama_dir, data_dir, settings):
    data = _records(data_dir, tmp_path, "two", 0, 2)
    recipe = _edit(llama_dir, data, tmp_path / "ft", "locft-bf", *settings["recipe"])
    assert recipe.exit_code == 0, recipe.output
    result = _edit(llama_dir, data, tmp_path / method, method, *settings["baseline"])
    assert result.exit_code == 0, result.output
    ft = json.loads((tmp_path / "ft" / "manifest.json").read_text())
    closed = json.loads((tmp_path / method / "manifest.json").read_text())
    assert _keys(closed) == _keys(ft)
    assert closed["method"] == method and ft["method"] == "locft-bf"
    assert closed["touched"]["weights"] == ft["touched"]["weights"] == "full"
    assert closed["touched"]["trainable_parameters"] > 0 and closed["training"] == []
    entries = read_ledger(tmp_path / method / "model")
    assert [e.recipe for e in entries] == [method, method] and read_ledger(tmp_path / method) == entries


def test_a_baseline_edit_contradicting_the_ledger_stops_with_on_conflict_error(tmp_path, llama_dir, data_dir,
                                                                                settings):
    first = _records(data_dir, tmp_path, "first", 0, 1)
    assert _edit(llama_dir, first, tmp_path / "e1", "rome", "--no-eval", *settings["baseline"]).exit_code == 0
    changed = _records(data_dir, tmp_path, "changed", 0, 1, target="Klingon")
    stopped = _edit(tmp_path / "e1" / "model", changed, tmp_path / "e2", "memit", "--no-eval",
                    "--on-conflict", "error", *settings["baseline"])
    assert isinstance(stopped.exception, ContradictionError) and "Klingon" in str(stopped.exception)
    assert not (tmp_path / "e2").exists()


@pytest.mark.parametrize("method,field", [("rome", "seed"), ("locft-bf", "train")])
def test_seed_option_overrides_the_config_and_seeds_torch(method, field, tmp_path, llama_dir, data_dir, settings,
                                                          monkeypatch):
    seeds = []
    real = torch.manual_seed
    monkeypatch.setattr(pipeline.torch, "manual_seed", lambda s: (seeds.append(s), real(s))[1])
    extra = settings["baseline" if method == "rome" else "recipe"]
    data = _records(data_dir, tmp_path, "one", 0, 1)
    result = _edit(llama_dir, data, tmp_path / "out", method, "--no-eval", "--seed", "7", *extra)
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    configured = manifest["config"]["seed"] if field == "seed" else manifest["config"]["train"]["seed"]
    assert manifest["seed"] == configured == 7 and seeds == [7]


def test_unsupported_options_are_errors_from_the_capabilities(tmp_path, llama_dir, data_dir, settings):
    data = _records(data_dir, tmp_path, "one", 0, 1)
    resumed = _edit(llama_dir, data, tmp_path / "r", "rome", "--resume", *settings["baseline"])
    assert resumed.exit_code != 0 and "--resume: not supported by rome" in str(resumed.exception)
    adapter = _edit(llama_dir, data, tmp_path / "a", "alphaedit", "--save", "adapter", *settings["baseline"])
    assert adapter.exit_code != 0 and "--save adapter: not supported by alphaedit" in str(adapter.exception)
    assert not (tmp_path / "r").exists() and not (tmp_path / "a").exists()
