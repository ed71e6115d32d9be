"""COUNTERFACT metrics against a plain re-implementation of the ROME/MEMIT protocol (one forward per pair)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ftedit.data.requests import EditRequest, Origin, ProbePrompt
from ftedit.evaluate import EvaluationError, compare, evaluate_requests


def rome_requests(data_dir, n: int = 5) -> list[EditRequest]:
    """Full schema: 2 paraphrases, 10 neighbors."""
    path = data_dir / "fixtures" / "counterfact_rome_format_first5.json"
    out = []
    for i, rec in enumerate(json.loads(path.read_text())[:n]):
        rw = rec["requested_rewrite"]
        true = rw["target_true"]["str"]
        out.append(EditRequest(
            prompt=rw["prompt"].format(rw["subject"]), subject=rw["subject"], target_new=rw["target_new"]["str"],
            target_true=true, paraphrase_prompts=tuple(rec["paraphrase_prompts"]),
            neighborhood=tuple(ProbePrompt(p, true) for p in rec["neighborhood_prompts"]),
            generation_prompts=tuple(rec["generation_prompts"]), case_id=rec["case_id"],
            relation_id=rw["relation_id"], origin=Origin(str(path), i)))
    return out


def easyedit_requests(data_dir, n: int = 6) -> list[EditRequest]:
    """Reduced schema: 1 paraphrase, 1 neighbor."""
    path = data_dir / "counterfact" / "easyedit" / "counterfact-edit.json"
    return [EditRequest(prompt=r["prompt"], subject=r["subject"], target_new=r["target_new"],
                        target_true=r["ground_truth"], paraphrase_prompts=(r["rephrase_prompt"],),
                        neighborhood=(ProbePrompt(r["locality_prompt"], r["locality_ground_truth"]),),
                        case_id=r["case_id"])
            for r in json.loads(path.read_text())[:n]]


def plain_nll_and_correct(model, tok, prompt: str, target: str) -> tuple[float, bool]:
    prompt_ids = tok(prompt)["input_ids"]
    target_ids = tok(" " + target, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt_ids + target_ids])).logits[0]
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    total, correct = 0.0, True
    for i, t in enumerate(target_ids):
        total += -logprobs[len(prompt_ids) - 1 + i, t].item()
        correct = correct and int(logits[len(prompt_ids) - 1 + i].argmax()) == t
    return total / len(target_ids), correct


def plain_counterfact(model, tok, requests) -> dict[str, float]:
    """ES/PS/NS, magnitudes, accuracies and edit score, written out with explicit loops."""
    per_metric = {"efficacy": [], "generalization": [], "locality": []}
    magnitudes = {"efficacy": [], "generalization": [], "locality": []}
    accs = {"efficacy": [], "generalization": [], "locality": []}
    for r in requests:
        groups = [("efficacy", [r.prompt]), ("generalization", list(r.paraphrase_prompts)),
                  ("locality", [nb.prompt for nb in r.neighborhood])]
        for name, prompts in groups:
            wins, diffs, correct = 0, 0.0, 0
            for p in prompts:
                nll_new, new_ok = plain_nll_and_correct(model, tok, p, r.target_new)
                nll_true, true_ok = plain_nll_and_correct(model, tok, p, r.target_true)
                if name == "locality":
                    wins += nll_true < nll_new
                    diffs += math.exp(-nll_true) - math.exp(-nll_new)
                    correct += true_ok
                else:
                    wins += nll_new < nll_true
                    diffs += math.exp(-nll_new) - math.exp(-nll_true)
                    correct += new_ok
            per_metric[name].append(wins / len(prompts))
            magnitudes[name].append(diffs / len(prompts))
            accs[name].append(correct / len(prompts))
    out = {}
    for name in per_metric:
        out[name] = 100 * sum(per_metric[name]) / len(requests)
        out[name + "_magnitude"] = 100 * sum(magnitudes[name]) / len(requests)
        out[name + "_acc"] = 100 * sum(accs[name]) / len(requests)
    es, ps, ns = out["efficacy"], out["generalization"], out["locality"]
    out["edit_score"] = 0.0 if min(es, ps, ns) == 0 else 3 / (1 / es + 1 / ps + 1 / ns)
    return out


@pytest.fixture
def sharp_llama(llama_model):
    with torch.no_grad():
        llama_model.lm_head.weight.mul_(30.0)
    return llama_model


@pytest.mark.parametrize("schema", ["rome", "easyedit"])
def test_metrics_match_plain_protocol(schema, data_dir, sharp_llama, llama_tok):
    requests = rome_requests(data_dir) if schema == "rome" else easyedit_requests(data_dir)
    result = evaluate_requests(sharp_llama, llama_tok, requests, batch_size=7, progress=False)
    want = plain_counterfact(sharp_llama, llama_tok, requests)
    for key, value in want.items():
        assert result.summary[key] == pytest.approx(value, abs=1e-5), key
    assert result.protocol == "counterfact"
    n_para, n_nb = (2, 10) if schema == "rome" else (1, 1)
    assert result.summary["n_paraphrase_prompts"] == n_para * len(requests)
    assert result.summary["n_neighborhood_prompts"] == n_nb * len(requests)
    assert result.summary["efficacy"] + result.summary["locality"] > 0  # a non-degenerate check


def test_metrics_match_plain_protocol_gpt2(data_dir, gpt2_model, gpt2_tok):
    requests = rome_requests(data_dir, n=3)
    result = evaluate_requests(gpt2_model, gpt2_tok, requests, progress=False)
    for key, value in plain_counterfact(gpt2_model, gpt2_tok, requests).items():
        assert result.summary[key] == pytest.approx(value, abs=1e-5), key


def test_swapping_targets_mirrors_efficacy(data_dir, sharp_llama, llama_tok):
    requests = easyedit_requests(data_dir)
    swapped = [EditRequest(r.prompt, r.subject, r.target_true, r.target_new, r.paraphrase_prompts,
                           tuple(ProbePrompt(nb.prompt, r.target_new) for nb in r.neighborhood), case_id=r.case_id)
               for r in requests]
    a = evaluate_requests(sharp_llama, llama_tok, requests, progress=False).summary
    b = evaluate_requests(sharp_llama, llama_tok, swapped, progress=False).summary
    assert a["efficacy"] + b["efficacy"] == pytest.approx(100.0)
    assert a["efficacy_magnitude"] == pytest.approx(-b["efficacy_magnitude"], abs=1e-9)


def test_details_per_record(data_dir, llama_model, llama_tok):
    requests = rome_requests(data_dir, n=2)
    result = evaluate_requests(llama_model, llama_tok, requests, details=True, progress=False)
    rec = result.records[0]
    assert rec["case_id"] == requests[0].case_id
    assert len(rec["paraphrase"]["prompts"]) == 2 and len(rec["neighborhood"]["prompts"]) == 10
    first = rec["rewrite"]["prompts"][0]
    nll_new, _ = plain_nll_and_correct(llama_model, llama_tok, requests[0].prompt, requests[0].target_new)
    assert first["nll_new"] == pytest.approx(nll_new, abs=1e-5)
    assert first["success"] == (first["nll_new"] < first["nll_true"])
    assert evaluate_requests(llama_model, llama_tok, requests, progress=False).records is None
    assert set(result.to_dict()) == {"protocol", "summary", "config", "records"}


def test_missing_target_true_names_the_record(data_dir, llama_model, llama_tok):
    requests = rome_requests(data_dir, n=3)
    broken = EditRequest(requests[1].prompt, requests[1].subject, requests[1].target_new, None,
                         requests[1].paraphrase_prompts, case_id=1234)
    with pytest.raises(EvaluationError, match="case_id=1234.*no target_true"):
        evaluate_requests(llama_model, llama_tok, [requests[0], broken], protocol="counterfact", progress=False)


def test_missing_paraphrases_error_or_counted(data_dir, llama_model, llama_tok):
    requests = easyedit_requests(data_dir, n=3)
    bare = EditRequest(requests[0].prompt, requests[0].subject, requests[0].target_new, requests[0].target_true,
                       (), requests[0].neighborhood, case_id=99)
    with pytest.raises(EvaluationError, match="case_id=99 .*no paraphrase prompts"):
        evaluate_requests(llama_model, llama_tok, [bare, *requests[1:]], progress=False)
    counted = evaluate_requests(llama_model, llama_tok, [bare, *requests[1:]], missing="count", progress=False)
    assert counted.summary["n_records_generalization"] == 2
    assert counted.summary["n_records_efficacy"] == 3
    want = plain_counterfact(llama_model, llama_tok, requests[1:])
    assert counted.summary["generalization"] == pytest.approx(want["generalization"], abs=1e-5)


def test_neighbor_target_must_be_target_true(data_dir, llama_model, llama_tok):
    r = easyedit_requests(data_dir, n=1)[0]
    odd = EditRequest(r.prompt, r.subject, r.target_new, r.target_true, r.paraphrase_prompts,
                      (ProbePrompt(r.neighborhood[0].prompt, "Something else"),), case_id=7)
    with pytest.raises(EvaluationError, match="not the record's target_true"):
        evaluate_requests(llama_model, llama_tok, [odd], progress=False)


def test_compare_reports_deltas(data_dir, llama_tok):
    import tiny

    requests = easyedit_requests(data_dir)
    pre = evaluate_requests(tiny.tiny_llama(llama_tok, seed=0), llama_tok, requests, progress=False)
    post = evaluate_requests(tiny.tiny_llama(llama_tok, seed=1), llama_tok, requests, progress=False)
    deltas = compare(pre, post)
    for key in ("efficacy", "generalization", "locality", "edit_score", "efficacy_magnitude"):
        assert deltas[key]["delta"] == pytest.approx(post.summary[key] - pre.summary[key])
    assert "seconds" not in deltas and "protocol" not in deltas
    assert any(d["delta"] != 0 for d in deltas.values())


def test_auto_protocol_rejects_mixed_sets(data_dir, llama_model, llama_tok):
    requests = easyedit_requests(data_dir, n=2)
    no_true = EditRequest(requests[0].prompt, requests[0].subject, requests[0].target_new)
    with pytest.raises(EvaluationError, match="mixed"):
        evaluate_requests(llama_model, llama_tok, [requests[1], no_true], progress=False)


def test_accuracy_on_targets_the_model_predicts(data_dir, sharp_llama, llama_tok):
    from ftedit.evaluate import next_token_topk

    requests = easyedit_requests(data_dir)
    tops = next_token_topk(sharp_llama, llama_tok, [r.prompt for r in requests], k=1)
    predicted = []
    for r, (top,) in zip(requests, tops):
        text = llama_tok.decode([top.token_id]).strip()
        if text and llama_tok(" " + text, add_special_tokens=False)["input_ids"] == [top.token_id]:
            predicted.append(EditRequest(r.prompt, r.subject, text, r.target_true, r.paraphrase_prompts,
                                         r.neighborhood, case_id=r.case_id))
    assert predicted
    result = evaluate_requests(sharp_llama, llama_tok, predicted, progress=False)
    assert result.summary["efficacy_acc"] == 100.0
    assert result.summary["efficacy_acc"] == pytest.approx(plain_counterfact(sharp_llama, llama_tok, predicted)["efficacy_acc"])
