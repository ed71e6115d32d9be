"""GRACE (codebook, deferral radius, sequential editing, save/load) and IKE (prefix, demonstrations) on tiny models."""

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

import tiny
from ftedit.baselines.grace import (
    Codebook,
    GRACEHyperParams,
    GraceLayer,
    _target,
    apply_grace_to_model,
    load_grace,
    save_grace,
)
from ftedit.baselines.ike import (
    IKEHyperParams,
    InContextModel,
    demonstrations,
    evaluation_prompts,
    usable_pool,
)
from ftedit.commands import app
from ftedit.data.loaders import load_requests
from ftedit.data.requests import EditRequest, ProbePrompt, request_hash
from ftedit.evaluate import evaluate_requests, score_pairs
from ftedit.methods import apply_method, method_names
from ftedit.tokenization import encode_prompt

EDIT_SPLIT = "counterfact/easyedit/counterfact-edit.json"
TRAIN_SPLIT = "counterfact/easyedit/counterfact-train.json"
FIXTURE = "fixtures/counterfact_rome_format_first5.json"
FAST = GRACEHyperParams(layer="1", steps=2, epsilon=0.01)


def _edits(data_dir, n, offset=0):
    return load_requests(data_dir / EDIT_SPLIT, n=n, offset=offset).requests


@torch.no_grad()
def _logits(model, tok, prompts):
    return [model(input_ids=torch.tensor([encode_prompt(tok, p)])).logits[0] for p in prompts]


# ------------------------------------------------------------------------------------------ GRACE


def test_grace_replaces_the_output_only_within_the_deferral_radius(llama_model):
    target = _target(llama_model, "1", "down")
    d_out, d_in = target.module.weight.shape
    g = torch.Generator().manual_seed(0)
    key, value = torch.randn(d_in, generator=g), torch.randn(d_out, generator=g)
    layer = GraceLayer(llama_model, target, Codebook(key[None], value[None], torch.tensor([0.5]), ["x"]))
    direction = torch.randn(d_in, generator=g)
    direction /= direction.norm()
    inside, outside = key + 0.4 * direction, key + 0.6 * direction
    x = torch.stack([inside, outside, key])[None]  # one sequence, three positions
    with torch.no_grad():
        out = target.module(x)[0]
        plain = torch.nn.functional.linear(x[0], target.module.weight)
    torch.testing.assert_close(out[0], value)
    torch.testing.assert_close(out[2], value)
    torch.testing.assert_close(out[1], plain[1])  # outside the radius: untouched
    assert layer.hits == 2
    layer.remove()
    with torch.no_grad():
        torch.testing.assert_close(target.module(x)[0], plain)


def test_grace_split_and_expand_follow_the_labels(llama_model, llama_tok):
    a = EditRequest(prompt="The capital of France is", subject="France", target_new="Rome", target_true="Paris")
    same = dataclasses.replace(a, prompt="The capital of France is the")
    other = dataclasses.replace(a, prompt="The capital of France was", target_new="Berlin")
    cfg = GRACEHyperParams(layer="1", steps=1, epsilon=1e6)  # every key within reach of the first
    layer, log = apply_grace_to_model(llama_model, llama_tok, [a, same, other], cfg, progress=False)
    assert [e["action"] for e in log] == ["add", "expand", "split"]
    assert len(layer.codebook) == 2 and layer.codebook.labels == ["Rome", "Berlin"]
    # the split leaves both radii at half the distance between the two keys
    assert layer.codebook.epsilons[0].item() == pytest.approx(log[2]["distance"] / 2)
    assert layer.codebook.epsilons[1].item() == pytest.approx(log[2]["distance"] / 2)


def _hit_entry(layer, tok, request):
    """The codebook entry whose value the model now uses at ``request``'s last prompt token (None: no hit)."""
    ids = torch.tensor([encode_prompt(tok, request.prompt)])
    seen = {}
    handle = layer.target.module.register_forward_hook(lambda m, a, o: seen.update(x=a[0][0, -1], y=o[0, -1]))
    with torch.no_grad():
        layer.model(input_ids=ids)
    handle.remove()
    index, dist = (t.item() for t in layer.codebook.nearest(seen["x"][None]))
    if dist > layer.codebook.epsilons[index].item():
        return None
    torch.testing.assert_close(seen["y"], layer.codebook.values[index])
    return index


def test_grace_sequential_100_edits_grow_the_codebook_and_earlier_edits_still_hit(llama_model, llama_tok, data_dir):
    requests = _edits(data_dir, 100)
    layer, log = apply_grace_to_model(llama_model, llama_tok, requests, FAST, progress=False)
    owners = [i for i, e in enumerate(log) if e["action"] != "expand"]
    assert [log[i]["entry"] for i in owners] == list(range(len(owners)))  # each add or split appends one entry
    assert len(layer.codebook) == len(owners) > 50 and len(owners) < 100  # some expansions on this tiny model
    for i, request in enumerate(requests):
        entry = _hit_entry(layer, llama_tok, request)
        if i in owners:  # a key that owns an entry always hits it
            assert entry == log[i]["entry"], request.prompt
            continue
        # an expansion's coverage is lost only when a later edit with another label splits that entry
        split_later = any(e.get("halved") == log[i]["entry"] for e in log[i + 1:])
        assert entry == log[i]["entry"] or (entry is None and split_later), request.prompt
        assert entry is None or layer.codebook.labels[entry] == request.target_new.strip()


def test_grace_edit_makes_the_new_target_the_prediction_at_the_edit_prompt(gpt2_model, gpt2_tok):
    request = EditRequest(prompt="The capital of France is", subject="France", target_new="Rome",
                          target_true="Paris")
    pair = [(request.prompt, request.target_new)]
    before = score_pairs(gpt2_model, gpt2_tok, pair)[0]  # its first target token is predicted at the key position
    applied = apply_method("grace", gpt2_model, gpt2_tok, [request], overrides=["layer=1", "steps=30"],
                           progress=False)
    after = score_pairs(applied.model, gpt2_tok, pair)[0]
    assert before.argmax_ids[0] != before.target_ids[0] and after.argmax_ids[0] == after.target_ids[0]
    assert after.logprobs[0] > before.logprobs[0] + 0.5  # a random tiny model's logits span little
    applied.restore()
    assert score_pairs(gpt2_model, gpt2_tok, pair)[0].logprobs[0] == pytest.approx(before.logprobs[0])


def test_grace_codebook_round_trip_gives_identical_outputs(llama_tok, data_dir, tmp_path):
    requests = _edits(data_dir, 6)
    model = tiny.tiny_llama(llama_tok)
    layer, _ = apply_grace_to_model(model, llama_tok, requests, FAST, progress=False)
    prompts = [r.prompt for r in requests] + ["The quick brown fox jumps over the lazy"]
    edited = _logits(model, llama_tok, prompts)
    save_grace(layer, tmp_path / "codebook", FAST)
    fresh = tiny.tiny_llama(llama_tok)
    plain = _logits(fresh, llama_tok, prompts)
    loaded = load_grace(fresh, tmp_path / "codebook")
    assert loaded.codebook.labels == layer.codebook.labels
    assert all(torch.equal(a, b) for a, b in zip(_logits(fresh, llama_tok, prompts), edited, strict=True))
    assert not torch.equal(edited[0], plain[0])  # the edit is in the codebook, not in the weights
    loaded.remove()
    assert all(torch.equal(a, c) for a, c in zip(_logits(fresh, llama_tok, prompts), plain))


def test_grace_codebook_onto_another_architecture_is_refused(llama_model, llama_tok, gpt2_model, data_dir, tmp_path):
    layer, _ = apply_grace_to_model(llama_model, llama_tok, _edits(data_dir, 1), FAST, progress=False)
    save_grace(layer, tmp_path / "cb")
    with pytest.raises(Exception, match="wraps model.layers.1.mlp.down_proj"):
        load_grace(gpt2_model, tmp_path / "cb")


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_edit_command_saves_a_grace_codebook_and_refuses_save_model(llama_dir, llama_tok, data_dir, tmp_path):
    common = ["edit", "--data", data_dir / FIXTURE, "--model", llama_dir, "--recipe", "grace", "--no-progress",
              "--set", "steps=2", "--set", "layer=1"]
    refused = _invoke(*common, "--out", tmp_path / "m", "--save", "model")
    assert refused.exit_code != 0 and "cannot be merged into plain" in refused.output
    result = _invoke(*common, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["method"] == "grace" and manifest["touched"]["weights"] == "codebook"
    model = tiny.tiny_llama(llama_tok)
    layer = load_grace(model, tmp_path / "out" / "codebook")
    assert len(layer.codebook) >= 1
    requests = load_requests(data_dir / FIXTURE).requests
    assert _hit_entry(layer, llama_tok, requests[0]) is not None


# ------------------------------------------------------------------------------------------ IKE


def test_ike_and_grace_are_registered():
    assert {"grace", "ike"} <= set(method_names())


def _prefixed(req: EditRequest, prefix: str) -> EditRequest:
    return dataclasses.replace(req, prompt=prefix + req.prompt,
                               paraphrase_prompts=tuple(prefix + p for p in req.paraphrase_prompts),
                               neighborhood=tuple(ProbePrompt(prefix + nb.prompt, nb.target)
                                                  for nb in req.neighborhood))


def test_ike_prefix_scores_like_the_plain_model_on_the_concatenated_text(gpt2_model, gpt2_tok, data_dir):
    requests = load_requests(data_dir / FIXTURE, n=2).requests
    # ends in a newline: the byte-level tokenizer then splits text exactly where the token ids are joined
    prefixes = {request_hash(r): f"New Fact: {r.prompt} {r.target_new}\n" for r in requests}
    wrapped = InContextModel(gpt2_model, gpt2_tok, prefixes)
    for req in requests:
        text = prefixes[request_hash(req)] + req.prompt
        assert encode_prompt(gpt2_tok, text) == encode_prompt(gpt2_tok, prefixes[request_hash(req)]) + \
            encode_prompt(gpt2_tok, req.prompt)
        ids = torch.tensor([encode_prompt(gpt2_tok, req.prompt)])
        with torch.no_grad(), wrapped.record_context(req):
            got = wrapped(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
        want = _logits(gpt2_model, gpt2_tok, [text])[0][-ids.shape[1]:]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the harness scores each record with its own prefix, exactly as the plain model scores the prefixed text
    ike = evaluate_requests(wrapped, gpt2_tok, requests, progress=False, details=True)
    plain = evaluate_requests(gpt2_model, gpt2_tok, [_prefixed(r, prefixes[request_hash(r)]) for r in requests],
                              progress=False, details=True)
    for a, b in zip(ike.records, plain.records):
        for kind in ("rewrite", "paraphrase", "neighborhood"):
            for pa, pb in zip(a[kind]["prompts"], b[kind]["prompts"]):
                assert pa["nll_new"] == pytest.approx(pb["nll_new"], abs=1e-4)
                assert pa["nll_true"] == pytest.approx(pb["nll_true"], abs=1e-4)
    assert ike.summary["efficacy"] == plain.summary["efficacy"]
    assert ike.summary["locality"] == plain.summary["locality"]


def test_ike_prefix_keeps_one_bos_before_the_prefix(llama_model, llama_tok, data_dir):
    req = load_requests(data_dir / FIXTURE, n=1).requests[0]
    prefix = f"New Fact: {req.prompt} {req.target_new}\nPrompt: "
    wrapped = InContextModel(llama_model, llama_tok, {request_hash(req): prefix})
    ids = encode_prompt(llama_tok, req.prompt)
    assert ids[0] == llama_tok.bos_token_id
    joined = torch.tensor([encode_prompt(llama_tok, prefix) + ids[1:]])
    with torch.no_grad(), wrapped.record_context(req):
        got = wrapped(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids))).logits[0]
        want = llama_model(input_ids=joined).logits[0, -len(ids) + 1:]
    torch.testing.assert_close(got[1:], want, atol=1e-5, rtol=1e-5)


def test_ike_outside_a_record_context_is_an_error(gpt2_model, gpt2_tok):
    wrapped = InContextModel(gpt2_model, gpt2_tok, {})
    with pytest.raises(RuntimeError, match="one record at a time"):
        wrapped(input_ids=torch.tensor([[1, 2]]), attention_mask=torch.ones(1, 2))


def test_ike_demonstrations_never_show_an_evaluation_prompt(data_dir):
    edits = _edits(data_dir, 10)
    train = load_requests(data_dir / TRAIN_SPLIT, n=6).requests
    pool = usable_pool(edits + train, edits)  # a pool that wrongly holds the edits themselves
    assert {request_hash(r) for r in pool} == {request_hash(r) for r in train}
    cfg = IKEHyperParams(copy=2, update=2, retain=2)
    scored = set().union(*(evaluation_prompts(e) for e in edits))
    for edit in edits:
        demos = demonstrations(edit, pool, cfg)
        assert len(demos) == 6
        for demo in demos:
            assert not any(prompt in demo for prompt in scored), demo


def test_ike_runs_through_the_edit_command_and_saves_nothing(llama_dir, data_dir, tmp_path):
    common = ["edit", "--data", data_dir / FIXTURE, "--model", llama_dir, "--recipe", "ike", "--no-progress",
              "--set", "copy=1", "--set", "update=0", "--set", "retain=0"]  # the tiny model has 256 positions
    refused = _invoke(*common, "--out", tmp_path / "m", "--save", "model")
    assert refused.exit_code != 0 and "prompt prefix" in refused.output
    result = _invoke(*common, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["method"] == "ike" and manifest["evaluation"]["post"]["n_records"] == 5
    assert not (tmp_path / "out" / "model").exists()


def test_save_codebook_is_refused_for_methods_without_one(llama_dir, data_dir, tmp_path):
    for method in ("locft-bf", "rome"):
        result = _invoke("edit", "--data", data_dir / FIXTURE, "--model", llama_dir, "--recipe", method,
                         "--out", tmp_path / method, "--save", "codebook", "--no-progress")
        assert result.exit_code != 0 and "only GRACE keeps a codebook" in result.output, result.output


def test_ike_zsre_records_score_like_the_prefixed_text_and_refuse_generation(gpt2_model, gpt2_tok, data_dir):
    from ftedit.evaluate import GenerationOptions

    requests = load_requests(data_dir / "fixtures/zsre_mend_eval_first5.json", n=3).requests
    prefixes = {request_hash(r): f"New Fact: {r.prompt} {r.target_new}\n" for r in requests}
    wrapped = InContextModel(gpt2_model, gpt2_tok, prefixes)
    ike = evaluate_requests(wrapped, gpt2_tok, requests, progress=False, details=True)
    plain = evaluate_requests(gpt2_model, gpt2_tok, [_prefixed(r, prefixes[request_hash(r)]) for r in requests],
                              progress=False, details=True)
    assert ike.protocol == plain.protocol == "zsre"
    for metric in ("efficacy", "generalization", "locality"):
        assert ike.summary[metric] == pytest.approx(plain.summary[metric])
    nll = [[p["nll"] for r in result.records for kind in ("rewrite", "paraphrase", "neighborhood")
            for p in r[kind]["prompts"]] for result in (ike, plain)]
    assert nll[0] == pytest.approx(nll[1], abs=1e-4)
    with pytest.raises(Exception, match="in-context edit"):
        evaluate_requests(wrapped, gpt2_tok, requests, progress=False, generation=GenerationOptions(4))


def test_bench_runs_grace_and_ike_next_to_each_other(tmp_path, gpt2_dir, data_dir):
    from ftedit.bench import BenchSettings, resolve_entries, run_bench

    settings = BenchSettings(model=str(gpt2_dir), data=str(data_dir / FIXTURE), out=str(tmp_path / "bench"), n=3)
    entries = resolve_entries(["g=grace:layer=1,steps=5", "i=ike:copy=1,update=0,retain=0",
                               "long=ike:copy=8"], [])  # the tiny GPT-2 has 256 positions
    rows = {r["label"]: r for r in run_bench(settings, entries, isolate=False)["rows"]}
    assert [r["status"] for r in rows.values()] == ["computed"] * 3 + ["failed"], rows
    assert "than the model's 256 positions" in rows["long"]["error"]
    assert rows["g"]["metrics"]["n_records"] == rows["i"]["metrics"]["n_records"] == 3
    assert rows["i"]["metrics"] != rows["unedited"]["metrics"]
