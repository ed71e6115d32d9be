"""The editor on tiny models: prefix caching is exact, objectives mask what they should, modes and methods work."""

import copy
import json
import math

import pytest
import torch

from ftedit import editor as editor_mod
from ftedit.config import resolve_config
from ftedit.data.examples import TrainingExample
from ftedit.data.requests import EditRequest, ProbePrompt
from ftedit.editor import edit
from ftedit.evaluate import evaluate_requests
from ftedit.forward import PrefixActivations, per_example_nll
from ftedit.tokenization import pad_right
from ftedit.train import ObjectiveConfig, Scorer, TrainConfig, batch_loss, dpo_loss, encode_examples, train

REQUESTS = [
    EditRequest("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", "French",
                ("Danielle Darrieux, a native",), (ProbePrompt("The mother tongue of Léon Blum is", "French"),)),
    EditRequest("The official language of Italy is", "Italy", "Korean", "Italian",
                ("In Italy, the language spoken is",), (ProbePrompt("The official language of Lugano is", "Italian"),)),
    EditRequest("iPhone 5, produced by", "iPhone 5", "Porsche", "Apple",
                ("iPhone 5 is produced by",), (ProbePrompt("iPhone XS Max is produced by", "Apple"),)),
]


def _config(**over):
    base = {"augment": {"n_paraphrases": 0, "n_random": 0}, "params": {"layers": "-2:", "modules": "mlp"},
            "train": {"epochs": 40, "batch_size": 3, "lr": 1e-2}}
    for k, v in over.items():
        base.setdefault(k, {}).update(v) if isinstance(v, dict) else base.__setitem__(k, v)
    return resolve_config("locft-bf", overrides=base)


@pytest.mark.parametrize("model_name", ["gpt2_model", "llama_model", "gemma_model"])
def test_prefix_cache_gives_the_same_losses_as_the_full_forward(request, model_name):
    model = request.getfixturevalue(model_name)
    tok = request.getfixturevalue("gpt2_tok" if model_name == "gpt2_model" else "llama_tok")
    examples = [TrainingExample(r.prompt, r.target_new) for r in REQUESTS]
    encoded = encode_examples(tok, examples, ObjectiveConfig())
    pairs = [e.chosen for e in encoded]
    full = per_example_nll(model, pad_right(pairs, tok.pad_token_id))[0]
    cache = PrefixActivations(model, 2, pairs, tok.pad_token_id, batch_size=2)
    cached = cache.nll([2, 0], [pairs[2], pairs[0]])[0]
    torch.testing.assert_close(cached, full[[2, 0]], rtol=1e-5, atol=1e-5)
    # and the model is put back together afterwards
    torch.testing.assert_close(per_example_nll(model, pad_right(pairs, tok.pad_token_id))[0], full)


def test_training_with_and_without_the_cache_ends_at_the_same_weights(llama_model, llama_tok):
    examples = [TrainingExample(r.prompt, r.target_new, request_index=i) for i, r in enumerate(REQUESTS)]
    weights = {}
    for cached in (True, False):
        model = copy.deepcopy(llama_model)
        param = model.model.layers[2].mlp.down_proj.weight
        for p in model.parameters():
            p.requires_grad_(False)
        param.requires_grad_(True)
        cfg = TrainConfig(epochs=3, batch_size=2, lr=1e-2, cache_activations=cached)
        train(model, llama_tok, examples, [param], cfg, ObjectiveConfig(), progress=False, prefix_layers=2)
        weights[cached] = param.detach().clone()
    torch.testing.assert_close(weights[True], weights[False], rtol=1e-4, atol=1e-5)
    assert not torch.equal(weights[True], llama_model.model.layers[2].mlp.down_proj.weight)


def test_conditional_objective_masks_the_prompt_and_full_objective_does_not(llama_tok):
    ex = [TrainingExample("The capital of France is", "Paris")]
    masked = encode_examples(llama_tok, ex, ObjectiveConfig(conditional=True))[0].chosen
    full = encode_examples(llama_tok, ex, ObjectiveConfig(conditional=False))[0].chosen
    assert masked.input_ids == full.input_ids
    assert masked.target_len == len(llama_tok(" Paris", add_special_tokens=False)["input_ids"])
    assert full.target_len == len(full.input_ids) - 1


def test_breadth_first_edit_reaches_the_targets_and_restore_undoes_it(llama_model, llama_tok):
    original = copy.deepcopy(llama_model.state_dict())
    pre = evaluate_requests(llama_model, llama_tok, REQUESTS, progress=False).summary
    result = edit(llama_model, llama_tok, REQUESTS, _config(), progress=False)
    post = evaluate_requests(result.model, llama_tok, REQUESTS, progress=False).summary
    assert post["efficacy"] == 100.0 and pre["efficacy"] < 100.0
    assert result.train[0].final_loss < result.train[0].loss_history[0]
    touched = {t["name"] for t in result.targets}
    assert touched == {f"model.layers.{i}.mlp.{m}" for i in (1, 2) for m in ("gate_proj", "up_proj", "down_proj")}
    changed = {k for k, v in llama_model.state_dict().items() if not torch.equal(v, original[k])}
    assert changed == {f"{name}.weight" for name in touched}
    result.restore()
    assert all(torch.equal(v, original[k]) for k, v in llama_model.state_dict().items())


def test_depth_first_trains_each_edit_in_turn(llama_model, llama_tok):
    cfg = _config(train={"pipeline": "depth", "steps_per_edit": 5, "batch_size": 1})
    result = edit(llama_model, llama_tok, REQUESTS, cfg, progress=False)
    assert len(result.train[0].loss_history) == len(REQUESTS)
    assert result.train[0].steps == 5 * len(REQUESTS)


def test_lora_trains_only_adapters_and_merges(llama_model, llama_tok):
    original = copy.deepcopy(llama_model.state_dict())
    cfg = _config(params={"method": "lora", "modules": "down"}, lora={"r": 4, "alpha": 8})
    result = edit(llama_model, llama_tok, REQUESTS, cfg, progress=False)
    assert all("lora_" in n for n in result._attached.params)
    assert result.trainable_parameters == sum(p.numel() for p in result._attached.params.values())
    post = evaluate_requests(result.model, llama_tok, REQUESTS, progress=False).summary
    assert post["efficacy"] > 0
    merged = result.merged_model()
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, original[k])}
    assert changed == {"model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"}


def test_norm_constraint_bounds_every_weight_change(llama_model, llama_tok):
    before = llama_model.model.layers[2].mlp.down_proj.weight.detach().clone()
    edit(llama_model, llama_tok, REQUESTS, _config(params={"norm_constraint": 1e-3}), progress=False)
    delta = (llama_model.model.layers[2].mlp.down_proj.weight - before).abs().max().item()
    assert 0 < delta <= 1e-3 + 1e-7


def test_single_mode_resets_between_edits(llama_model, llama_tok):
    original = copy.deepcopy(llama_model.state_dict())
    result = edit(llama_model, llama_tok, REQUESTS, _config(mode="single"), progress=False)
    assert [m["request_index"] for m in result.single_edit_metrics] == [0, 1, 2]
    assert all(m["efficacy"] == 100.0 for m in result.single_edit_metrics)
    assert all(torch.equal(v, original[k]) for k, v in llama_model.state_dict().items())


def test_sequential_mode_trains_batches_in_order(llama_model, llama_tok, monkeypatch):
    trained: list[list[str]] = []

    def recording_train(model, tok, examples, *args, **kwargs):
        trained.append([e.target for e in examples if e.kind == "edit"])
        return real_train(model, tok, examples, *args, **kwargs)

    real_train = editor_mod.train
    monkeypatch.setattr(editor_mod, "train", recording_train)
    order = [REQUESTS[2], REQUESTS[0], REQUESTS[1]]
    result = edit(llama_model, llama_tok, order, _config(mode="sequential", sequential_batch=2), progress=False)
    assert len(result.train) == 2
    assert trained == [["Porsche", "English"], ["Korean"]]  # the batches, in request order


@pytest.mark.parametrize("weight", [0.0, 0.5, 2.0])
def test_dpo_loss_is_the_weighted_dpo_formula(weight):
    beta = 0.3
    chosen, rejected = torch.tensor([-2.0, -5.0, -1.0]), torch.tensor([-3.0, -1.5, -4.0])
    ref_chosen, ref_rejected = torch.tensor([-2.5, -4.0, -1.0]), torch.tensor([-2.0, -2.0, -6.0])
    objective = ObjectiveConfig(dpo_weight=weight, dpo_beta=beta)
    expected = 0.0
    for pw, pl, rw, rl in zip(chosen.tolist(), rejected.tolist(), ref_chosen.tolist(), ref_rejected.tolist(),
                              strict=True):
        margin = beta * ((pw - rw) - (pl - rl))
        expected += math.log1p(math.exp(-margin)) / 3  # -log sigmoid(m) = log(1 + e^-m)
    got = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, objective)
    assert got.item() == pytest.approx(weight * expected, rel=1e-6, abs=1e-12)


def test_batch_loss_adds_the_dpo_term_only_with_a_weight():
    class CraftedScorer:
        device = torch.device("cpu")
        locality_ref: dict = {}  # no pool facts under a KL locality loss
        nll, logp = torch.tensor([0.4, 0.8]), {"chosen": torch.tensor([-1.0, -2.0]), "rejected": torch.tensor([-3.0])}

        def __call__(self, idx, which="chosen"):
            return (self.nll, self.logp["chosen"]) if which == "chosen" else (None, self.logp["rejected"])

    ref = {1: (-2.5, -2.0)}  # only example 1 has a rejected answer
    plain = batch_loss(CraftedScorer(), [0, 1], ObjectiveConfig(dpo_weight=0.0), ref)
    assert plain.item() == pytest.approx(0.6)
    with_dpo = batch_loss(CraftedScorer(), [0, 1], ObjectiveConfig(dpo_weight=1.0, dpo_beta=0.1), ref)
    margin = 0.1 * ((-2.0 + 2.5) - (-3.0 + 2.0))
    assert with_dpo.item() == pytest.approx(0.6 + math.log1p(math.exp(-margin)))


def test_dpo_term_runs_with_and_without_cache(llama_model, llama_tok):
    examples = [TrainingExample(r.prompt, r.target_new, "edit", i, r.target_true) for i, r in enumerate(REQUESTS)]
    objective = ObjectiveConfig(dpo_weight=1.0)
    encoded = encode_examples(llama_tok, examples, objective)
    plain = Scorer(llama_model, encoded, llama_tok.pad_token_id)
    cached = Scorer(llama_model, encoded, llama_tok.pad_token_id, prefix_layers=1)
    for which in ("chosen", "rejected"):
        torch.testing.assert_close(plain([0, 2], which)[1], cached([0, 2], which)[1], rtol=1e-5, atol=1e-5)


def test_manifest_and_saved_model_round_trip(tmp_path, llama_model, llama_tok):
    from transformers import AutoModelForCausalLM

    from ftedit.editor import apply_recipe
    from ftedit.models import identity_of
    from ftedit.outputs import build_manifest, save_edit
    from ftedit.registry import ApplyContext

    result = apply_recipe(llama_model, llama_tok, REQUESTS, _config(train={"epochs": 2}), ApplyContext(progress=False))
    manifest = build_manifest(result, REQUESTS, identity_of(llama_model).to_dict())
    out = save_edit(tmp_path / "edited", result, llama_tok, manifest)
    saved = json.loads((out / "manifest.json").read_text())
    assert saved["touched"]["layers"] == [1, 2] and len(saved["edits"]) == 3
    assert saved["config"]["train"]["epochs"] == 2
    reloaded = AutoModelForCausalLM.from_pretrained(out / "model")
    torch.testing.assert_close(reloaded.model.layers[2].mlp.down_proj.weight,
                               llama_model.model.layers[2].mlp.down_proj.weight)
    with pytest.raises(FileExistsError):
        save_edit(tmp_path / "edited", result, llama_tok, manifest)


def test_lora_adapter_saves_and_reloads_with_peft(tmp_path, llama_model, llama_tok):
    from peft import PeftModel

    from ftedit.editor import apply_recipe
    from ftedit.models import identity_of
    from ftedit.outputs import build_manifest, save_edit
    from ftedit.registry import ApplyContext

    base = copy.deepcopy(llama_model)
    pair = encode_examples(llama_tok, [TrainingExample(REQUESTS[0].prompt, REQUESTS[0].target_new)],
                           ObjectiveConfig())[0].chosen
    batch = pad_right([pair], llama_tok.pad_token_id)
    cfg = _config(params={"method": "lora", "modules": "down"}, lora={"r": 4}, train={"epochs": 5})
    result = apply_recipe(llama_model, llama_tok, REQUESTS, cfg, ApplyContext(progress=False))
    assert result.weights == "lora" and result.merge is not None
    expected = per_example_nll(result.model, batch)[0]
    assert not torch.allclose(expected, per_example_nll(base, batch)[0])
    manifest = build_manifest(result, REQUESTS, identity_of(base).to_dict())
    out = save_edit(tmp_path / "lora", result, llama_tok, manifest, save="adapter")
    assert (out / "adapter" / "adapter_config.json").exists() and not (out / "model").exists()
    reloaded = PeftModel.from_pretrained(base, out / "adapter")
    torch.testing.assert_close(per_example_nll(reloaded, batch)[0], expected)


def test_gradient_accumulation_equals_one_large_batch(llama_model, llama_tok):
    examples = [TrainingExample(r.prompt, t, request_index=i)
                for i, r in enumerate(REQUESTS) for t in (r.target_new, r.target_true)][:4]
    weights = []
    for batch_size, accum in ((4, 1), (2, 2)):
        model = copy.deepcopy(llama_model)
        param = model.model.layers[2].mlp.down_proj.weight
        cfg = TrainConfig(epochs=1, batch_size=batch_size, grad_accum=accum, lr=0.5, optimizer="sgd", seed=3)
        result = train(model, llama_tok, examples, [param], cfg, ObjectiveConfig(), progress=False)
        assert result.steps == 1
        weights.append(param.detach().clone())
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-5, atol=1e-6)


def test_depth_first_takes_steps_per_edit_optimizer_steps_even_with_several_examples(llama_model, llama_tok):
    examples = [TrainingExample(r.prompt, r.target_new, request_index=i) for i, r in enumerate(REQUESTS)]
    examples += [TrainingExample(p, r.target_new, "paraphrase", i)
                 for i, r in enumerate(REQUESTS) for p in r.paraphrase_prompts]
    param = llama_model.model.layers[2].mlp.down_proj.weight
    cfg = TrainConfig(pipeline="depth", steps_per_edit=4, batch_size=1)
    result = train(llama_model, llama_tok, examples, [param], cfg, ObjectiveConfig(), progress=False)
    assert result.steps == 4 * len(REQUESTS)


def test_a_failing_edit_leaves_the_model_as_it_was(llama_model, llama_tok):
    original = copy.deepcopy(llama_model.state_dict())

    def boom(model, tok, reqs):
        raise RuntimeError("evaluation failed")

    with pytest.raises(RuntimeError, match="evaluation failed"):
        edit(llama_model, llama_tok, REQUESTS, _config(mode="single", params={"method": "lora"}),
             evaluate_single=boom, progress=False)
    assert type(llama_model).__name__ == "LlamaForCausalLM" and not hasattr(llama_model, "peft_config")
    assert all(torch.equal(v, original[k]) for k, v in llama_model.state_dict().items())
    assert not any(p.requires_grad for p in llama_model.parameters())
