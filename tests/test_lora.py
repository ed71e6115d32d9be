"""LoRA edits: the recipes' LoRA settings, the unreached-edits warning, stacked adapters and their ledger."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ftedit.adapters import stack_adapters
from ftedit.commands import app
from ftedit.config import LoraConfig, recipe_names, resolve_config
from ftedit.data.loaders import load_requests
from ftedit.data.requests import EditRequest
from ftedit.editor import apply_recipe
from ftedit.evaluate.scoring import score_pairs
from ftedit.ledger import ContradictionError, read_ledger
from ftedit.models import load_model
from ftedit.registry import ApplyContext, get_method
from ftedit.unreached import check_reached, suggestion, unreached_edits
from tiny import tiny_llama

FIXTURE = "fixtures/counterfact_rome_format_first5.json"
PLAIN_PEFT = Path(__file__).resolve().parents[1] / "benchmarks" / "load_adapter_plain.py"
REQUESTS = [
    EditRequest(prompt="The Eiffel Tower is located in", subject="The Eiffel Tower", target_new="Rome",
                target_true="Paris"),
    EditRequest(prompt="The quick brown fox jumps over the", subject="fox", target_new="capital"),
]


@pytest.fixture
def confident(llama_tok):
    """The tiny Llama with a 30x LM head: its random head caps how far any edit can move a prediction
    (final norm x 0.02-scale weights: every NLL stays near log(vocab)), which leaves reached edits with margins
    small enough for two stacked adapters to cancel each other by chance."""
    model = tiny_llama(llama_tok)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model


@pytest.fixture
def confident_dir(tmp_path, confident, llama_tok):
    confident.save_pretrained(tmp_path / "confident")
    llama_tok.save_pretrained(tmp_path / "confident")
    return tmp_path / "confident"


def _lora(*extra: str):
    return resolve_config("locft-bf", overrides=["params.layers=1", "params.method=lora", *extra])


def _apply(model, tok, requests, config):
    torch.manual_seed(config.train.seed)
    return apply_recipe(model, tok, requests, config, ApplyContext(progress=False))


# --- settings -------------------------------------------------------------------------------------------------

def test_lora_section_replaces_lr_epochs_modules_only_for_lora():
    full = resolve_config("locft-bf", overrides=["params.layers=1", "lora.epochs=7", "lora.modules=up"])
    lora = _lora("lora.epochs=7", "lora.modules=up")
    assert (full.train.lr, full.train.epochs, full.params.modules) == (5e-4, 25, "down")
    assert (lora.train.lr, lora.train.epochs, lora.params.modules) == (lora.lora.lr, 7, "up")
    assert lora.train.lr != full.train.lr


def test_explicit_train_lr_wins_over_the_lora_section(tmp_path):
    assert _lora("train.lr=3e-4").train.lr == 3e-4
    cfg_file = tmp_path / "my.yaml"
    cfg_file.write_text("train: {lr: 2.0e-4}\nparams: {method: lora, layers: '1'}\n")
    assert resolve_config("locft-bf", cfg_file).train.lr == 2e-4


@pytest.mark.parametrize("recipe", [r for r in recipe_names() if not resolve_config(r).params.norm_constraint])
def test_every_recipe_ships_lora_settings(recipe):
    """Each recipe that can train LoRA (FT-L's weight clamp cannot) states its LoRA settings."""
    text = (Path(__file__).resolve().parents[1] / "src" / "ftedit" / "recipes" / f"{recipe}.yaml").read_text()
    assert "lora:" in text
    cfg = resolve_config(recipe, overrides=["params.method=lora"])
    assert cfg.train.lr == cfg.lora.lr > resolve_config(recipe, overrides=["params.method=full"]).train.lr


def test_lora_edit_of_a_tiny_model_reaches_its_targets_with_shipped_defaults(confident, llama_tok, data_dir):
    requests = load_requests(data_dir / FIXTURE).requests[:4]
    assert unreached_edits(confident, llama_tok, requests)
    applied = _apply(confident, llama_tok, requests, _lora())
    assert applied.weights == "lora" and applied.config["train"]["lr"] == applied.config["lora"]["lr"]
    assert unreached_edits(applied.model, llama_tok, requests) == []


def test_a_full_weight_learning_rate_leaves_lora_edits_unreached(confident, llama_tok, data_dir):
    """What the LoRA settings fix: the recipe's full-weight lr (5e-4) on LoRA adapters barely moves them."""
    requests = load_requests(data_dir / FIXTURE).requests[:4]
    applied = _apply(confident, llama_tok, requests, _lora("train.lr=5e-4"))
    assert unreached_edits(applied.model, llama_tok, requests)


# --- unreached-edits warning ----------------------------------------------------------------------------------

def test_unreached_warning_fires_after_one_step(llama_model, llama_tok, caplog):
    config = resolve_config("locft-bf", overrides=["params.layers=1", "train.epochs=1", "train.lr=1e-5"])
    applied = _apply(llama_model, llama_tok, REQUESTS, config)
    with caplog.at_level(logging.WARNING, logger="ftedit.unreached"):
        section = check_reached(applied.model, llama_tok, REQUESTS, config)
    assert section["n"] == 2 and section["of"] == 2
    assert [e["index"] for e in section["edits"]] == [0, 1]
    assert section["edits"][0]["nll_true"] is not None and section["edits"][1]["nll_true"] is None
    message = caplog.records[-1].getMessage()
    assert "2 of 2 edits unreached" in message and "Eiffel" in message and "train.epochs, now 1" in message


def test_unreached_check_is_silent_when_all_edits_are_reached(llama_model, llama_tok, caplog):
    config = resolve_config("locft-bf", overrides=["params.layers=1", "train.epochs=40", "train.lr=1e-2"])
    applied = _apply(llama_model, llama_tok, REQUESTS, config)
    with caplog.at_level(logging.WARNING, logger="ftedit.unreached"):
        section = check_reached(applied.model, llama_tok, REQUESTS, config)
    assert section["n"] == 0 and section["edits"] == []
    assert not [r for r in caplog.records if r.name == "ftedit.unreached"]


def test_suggestion_names_the_closed_form_methods_own_settings():
    rome = get_method("rome").resolve_config(overrides=["value.steps=7", "layer=3"])
    assert "value.steps, now 7" in suggestion(rome) and "layer=3" in suggestion(rome)
    assert "train.steps_per_edit, now 25" in suggestion(resolve_config("ft-m"))


def test_reached_means_preferred_over_target_true_or_greedy(llama_model, llama_tok):
    """The criterion itself, checked against scores computed here."""
    new, true, other = score_pairs(llama_model, llama_tok, [(REQUESTS[0].prompt, "Rome"), (REQUESTS[0].prompt, "Paris"),
                                                            (REQUESTS[1].prompt, "capital")])
    missed = {m.index for m in unreached_edits(llama_model, llama_tok, REQUESTS)}
    assert (0 in missed) == (not new.nll < true.nll)
    assert (1 in missed) == (not other.all_correct)


# --- pipeline, adapters, ledger -------------------------------------------------------------------------------

def _records(data_dir, tmp_path, name, start, stop):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(json.loads((data_dir / FIXTURE).read_text())[start:stop]))
    return path


def _edit(model, data, out, *sets):
    args = ["edit", "--model", str(model), "--data", str(data), "--out", str(out), "--recipe", "locft-bf",
            "--no-progress", "--no-eval", "--save", "adapter", "--set", "params.layers=1",
            "--set", "params.method=lora", *[a for s in sets for a in ("--set", s)]]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads((out / "manifest.json").read_text())


def test_pipeline_records_unreached_edits_in_the_manifest(tmp_path, llama_dir, data_dir):
    data = _records(data_dir, tmp_path, "two", 0, 2)
    weak = _edit(llama_dir, data, tmp_path / "weak", "train.epochs=1", "train.lr=1e-6")
    assert weak["unreached"]["n"] == 2 and weak["unreached"]["of"] == 2
    strong = _edit(llama_dir, data, tmp_path / "strong", "train.epochs=60")
    assert strong["unreached"]["n"] == 0


def test_stacked_adapters_carry_both_runs_and_the_ledger_says_which(tmp_path, confident_dir, data_dir):
    first, second = _records(data_dir, tmp_path, "a", 0, 2), _records(data_dir, tmp_path, "b", 2, 4)
    m1 = _edit(confident_dir, first, tmp_path / "e1", "train.epochs=80")
    m2 = _edit(confident_dir, second, tmp_path / "e2", "train.epochs=80", "params.layers=2")
    assert m1["unreached"]["n"] == 0 and m2["unreached"]["n"] == 0
    assert {e["adapter"] for e in map(vars, read_ledger(tmp_path / "e1" / "adapter"))} == {"default"}
    reqs1 = [EditRequest.from_dict({k: v for k, v in e.items() if k != "hash"}) for e in m1["edits"]]
    reqs2 = [EditRequest.from_dict({k: v for k, v in e.items() if k != "hash"}) for e in m2["edits"]]

    base, tok, _ = load_model(str(confident_dir))
    assert unreached_edits(base, tok, reqs1 + reqs2)
    stack = stack_adapters(base, {"first": tmp_path / "e1" / "adapter", "second": tmp_path / "e2" / "adapter"})
    assert unreached_edits(stack.model, tok, reqs1 + reqs2) == []
    assert [e.prompt for e in stack.carried_by("first")] == [r.prompt for r in reqs1]
    assert [e.prompt for e in stack.carried_by("second")] == [r.prompt for r in reqs2]

    pairs = [(r.prompt, r.target_new) for r in reqs1 + reqs2]
    stacked = [s.nll for s in score_pairs(stack.model, tok, pairs)]
    merged = stack.merge("both")
    assert merged.names == ["both"] and {e.adapter for e in merged.entries} == {"both"}
    assert [s.nll for s in score_pairs(merged.model, tok, pairs)] == pytest.approx(stacked, abs=1e-4)
    out = merged.save(tmp_path / "merged")
    assert [e.adapter for e in read_ledger(out)] == ["both"] * 4


def test_adapter_directory_loads_for_ftedit_eval_and_in_plain_peft(tmp_path, llama_dir, data_dir):
    data = _records(data_dir, tmp_path, "two", 0, 2)
    _edit(llama_dir, data, tmp_path / "e", "train.epochs=60")
    adapter = tmp_path / "e" / "adapter"
    model, tok, identity = load_model(str(adapter))
    assert identity.source == "adapter" and identity.extra["base_spec"] == str(llama_dir)
    ours = score_pairs(model, tok, [("The Eiffel Tower is located in", "Rome")])[0].nll
    result = CliRunner().invoke(app, ["eval", "--model", str(adapter), "--data", str(data), "--no-progress",
                                      "--out", str(tmp_path / "eval.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "eval.json").read_text())["result"]["summary"]["efficacy"] == 100.0
    plain = subprocess.run([sys.executable, str(PLAIN_PEFT), str(adapter), "The Eiffel Tower is located in", "Rome"],
                           capture_output=True, text=True, check=True)
    report = json.loads(plain.stdout)
    assert report["ftedit_imported"] is False
    assert report["nll"] == pytest.approx(ours, abs=1e-4)


def test_lora_config_defaults_are_documented_fields():
    assert {"r", "alpha", "dropout", "lr", "epochs", "modules"} <= set(LoraConfig.__dataclass_fields__)


def test_stacking_contradicting_adapters_is_reported(tmp_path, llama_dir, data_dir):
    records = json.loads((data_dir / FIXTURE).read_text())[:1]
    first = tmp_path / "first.json"
    first.write_text(json.dumps(records))
    records[0]["requested_rewrite"]["target_new"]["str"] = "German"
    second = tmp_path / "second.json"
    second.write_text(json.dumps(records))
    _edit(llama_dir, first, tmp_path / "e1", "train.epochs=1")
    _edit(llama_dir, second, tmp_path / "e2", "train.epochs=1")
    base, _, _ = load_model(str(llama_dir))
    with pytest.raises(ContradictionError, match="German"):
        stack_adapters(base, [tmp_path / "e1" / "adapter", tmp_path / "e2" / "adapter"], on_conflict="error")
