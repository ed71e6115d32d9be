"""ZsRE token accuracy against MEMIT's construction: one forward per target token on ``prompt + target[:i]``."""

from __future__ import annotations

import json

import pytest
import torch

from ftedit.data.requests import EditRequest, ProbePrompt
from ftedit.evaluate import EvaluationError, evaluate_requests
from ftedit.evaluate.zsre import loc_prompt


def zsre_requests(data_dir, question_mark: bool = True) -> list[EditRequest]:
    """As MEMIT's MENDQADataset maps them: src -> answers[0], rephrase, loc + "?" -> loc_ans."""
    raw = json.loads((data_dir / "fixtures" / "zsre_mend_eval_first5.json").read_text())
    return [EditRequest(prompt=r["src"], subject=r["subject"], target_new=r["answers"][0],
                        paraphrase_prompts=(r["rephrase"],),
                        neighborhood=(ProbePrompt(r["loc"] + ("?" if question_mark else ""), r["loc_ans"]),),
                        case_id=i)
            for i, r in enumerate(raw)]


def plain_token_accuracy(model, tok, prompt: str, target: str) -> list[bool]:
    """MEMIT's test_batch_prediction_acc, one token at a time: a separate forward per target prefix."""
    prompt_ids = tok(prompt)["input_ids"]
    target_ids = tok(" " + target, add_special_tokens=False)["input_ids"]
    correct = []
    for i in range(len(target_ids)):
        ids = torch.tensor([prompt_ids + target_ids[:i]])
        with torch.no_grad():
            next_id = int(model(input_ids=ids).logits[0, -1].argmax())
        correct.append(next_id == target_ids[i])
    return correct


def plain_zsre(model, tok, requests) -> dict[str, float]:
    sums = {"efficacy": 0.0, "generalization": 0.0, "locality": 0.0}
    for r in requests:
        groups = {"efficacy": [(r.prompt, r.target_new)],
                  "generalization": [(p, r.target_new) for p in r.paraphrase_prompts],
                  "locality": [(nb.prompt, nb.target) for nb in r.neighborhood]}
        for name, pairs in groups.items():
            tokens = [c for p, t in pairs for c in plain_token_accuracy(model, tok, p, t)]
            sums[name] += sum(tokens) / len(tokens)
    out = {k: 100 * v / len(requests) for k, v in sums.items()}
    es, ps, ns = out.values()
    out["edit_score"] = 0.0 if min(es, ps, ns) == 0 else 3 / (1 / es + 1 / ps + 1 / ns)
    return out


def teach(model, tok, pairs, steps: int = 60):
    """A few steps of plain fine-tuning so that some answer tokens are right (accuracy tests mean something)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        for prompt, target in pairs:
            ids = tok(prompt)["input_ids"] + tok(" " + target, add_special_tokens=False)["input_ids"]
            labels = [-100] * len(tok(prompt)["input_ids"]) + ids[len(tok(prompt)["input_ids"]):]
            loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_matches_memit_token_by_token(family, data_dir, llama_tok, gpt2_tok):
    import tiny

    tok = llama_tok if family == "llama" else gpt2_tok
    model = (tiny.tiny_llama if family == "llama" else tiny.tiny_gpt2)(tok)
    requests = zsre_requests(data_dir)
    teach(model, tok, [(r.prompt, r.target_new) for r in requests[:3]], steps=15)
    result = evaluate_requests(model, tok, requests, batch_size=3, progress=False)
    assert result.protocol == "zsre"
    want = plain_zsre(model, tok, requests)
    for key, value in want.items():
        assert result.summary[key] == pytest.approx(value, abs=1e-5), key
    assert result.summary["efficacy"] > 0


def test_loc_question_mark_added_once(data_dir, llama_model, llama_tok):
    assert loc_prompt("nq question: who wrote hamlet") == "nq question: who wrote hamlet?"
    assert loc_prompt("nq question: who wrote hamlet?") == "nq question: who wrote hamlet?"
    raw = evaluate_requests(llama_model, llama_tok, zsre_requests(data_dir, question_mark=False), progress=False)
    marked = evaluate_requests(llama_model, llama_tok, zsre_requests(data_dir), progress=False)
    assert raw.summary == {**marked.summary, "seconds": raw.summary["seconds"]}


def test_details_and_exact(data_dir, llama_tok):
    import tiny

    model = tiny.tiny_llama(llama_tok)
    requests = zsre_requests(data_dir)[:2]
    teach(model, llama_tok, [(requests[0].prompt, requests[0].target_new)], steps=40)
    result = evaluate_requests(model, llama_tok, requests, details=True, progress=False)
    rec = result.records[0]["rewrite"]
    assert rec["prompts"][0]["token_correct"] == plain_token_accuracy(model, llama_tok, requests[0].prompt,
                                                                      requests[0].target_new)
    assert rec["accuracy"] == 1.0 and rec["exact"] == 1.0
    assert result.records[0]["neighborhood"]["prompts"][0]["prompt"].endswith("?")


def test_missing_rephrase_is_an_error(data_dir, llama_model, llama_tok):
    r = zsre_requests(data_dir)[0]
    bare = EditRequest(r.prompt, r.subject, r.target_new, neighborhood=r.neighborhood, case_id="z1")
    with pytest.raises(EvaluationError, match="'z1'.*no paraphrase prompts"):
        evaluate_requests(llama_model, llama_tok, [bare], progress=False)
    counted = evaluate_requests(llama_model, llama_tok, [bare, r], missing="count", progress=False)
    assert counted.summary["n_records_generalization"] == 1
