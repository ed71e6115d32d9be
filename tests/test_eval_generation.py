"""Generation metrics: n-gram entropy, TF-IDF consistency, batched greedy decoding, exact match."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ftedit.data.requests import EditRequest
from ftedit.evaluate import evaluate_requests
from ftedit.evaluate.generation import (
    NO_SNIPPETS,
    GenerationOptions,
    _simple_tokenize,
    compute_n_gram_entropy,
    evaluate_generation,
    generate_ids,
    generate_texts,
    greedy_exact_match,
    load_snippets,
    n_gram_entropy,
    tfidf_similarity,
    tfidf_vectorizer,
)
from ftedit.evaluate.scoring import score_pairs

PROMPTS = ["Danielle Darrieux's mother tongue is", "Paris is the capital of",
           "The quick brown fox jumps over the lazy dog. Where Danielle Darrieux is from, people speak"]


def plain_greedy(model, tok, prompt: str, n: int) -> list[int]:
    ids = tok(prompt)["input_ids"]
    out = []
    for _ in range(n):
        with torch.no_grad():
            nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
        if nxt == tok.eos_token_id:
            break
        out.append(nxt)
    return out


def test_n_gram_entropy_hand_computed():
    # words a b a b: bigrams ab x2, ba x1 -> H2 = h(1/3); trigrams aba, bab -> H3 = 1 bit.
    h2 = -(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3)
    want = (2 / 3 * h2 + 4 / 3 * 1.0) / 2
    assert compute_n_gram_entropy("a b a b") == pytest.approx(want, abs=1e-12)
    assert want == pytest.approx(0.9727652, abs=1e-6)
    assert compute_n_gram_entropy("x x x x x") == 0.0
    assert compute_n_gram_entropy("one") == 0.0
    assert n_gram_entropy(["a b a b", "x x x x x"]) == pytest.approx(want / 2)


def test_fallback_word_tokenizer_is_treebank_like():
    assert _simple_tokenize("Paris is the capital of France.") == ["Paris", "is", "the", "capital", "of", "France", "."]
    assert _simple_tokenize("I don't know, it's 1,000.5 km in the U.S.") == [
        "I", "do", "n't", "know", ",", "it", "'s", "1,000.5", "km", "in", "the", "U.S."]
    assert _simple_tokenize('a well-known "film"') == ["a", "well-known", "''", "film", "''"]


def test_tfidf_similarity_and_vectorizer_files(tmp_path):
    docs = {"P103": {"Q150": ["French is spoken in France.", "The French language of Paris."]},
            "P17": {"Q30": ["The United States of America is a country."]}}
    vec = tfidf_vectorizer(docs)
    a, b = "French is the language of France", "The United States is a country"
    va, vb = vec.transform([a, b]).toarray()
    assert tfidf_similarity(a, b, vec) == pytest.approx(float(va @ vb / np.linalg.norm(va) / np.linalg.norm(vb)))
    assert tfidf_similarity(a, a, vec) == pytest.approx(1.0)
    assert tfidf_similarity("zzz qqq", a, vec) == 0.0
    np.save(tmp_path / "idf.npy", vec.idf_)
    (tmp_path / "vocab.json").write_text(json.dumps({k: int(v) for k, v in vec.vocabulary_.items()}))
    loaded = tfidf_vectorizer(idf_path=tmp_path / "idf.npy", vocab_path=tmp_path / "vocab.json")
    assert tfidf_similarity(a, b, loaded) == pytest.approx(tfidf_similarity(a, b, vec))


def test_load_snippets_both_layouts(tmp_path):
    listed = [{"relation_id": "P103", "target_id": "Q150", "samples": [{"name": "X", "text": "t1"}]},
              {"relation_id": "P103", "target_id": "Q150", "samples": [{"name": "Y", "text": "t2"}]}]
    (tmp_path / "a.json").write_text(json.dumps(listed))
    (tmp_path / "b.json").write_text(json.dumps({"P103": {"Q150": [{"text": "t1"}, {"text": "t2"}]}}))
    assert load_snippets(tmp_path / "a.json")["P103"]["Q150"] == ["t1", "t2"]
    assert load_snippets(tmp_path / "b.json")["P103"]["Q150"] == ["t1", "t2"]


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma"])
def test_batched_greedy_equals_plain_loop(family, llama_tok, gpt2_tok):
    import tiny

    tok = gpt2_tok if family == "gpt2" else llama_tok
    model = {"llama": tiny.tiny_llama, "gpt2": tiny.tiny_gpt2, "gemma": tiny.tiny_gemma3}[family](tok)
    batched = generate_ids(model, tok, PROMPTS, 6, batch_size=3)
    assert batched == [plain_greedy(model, tok, p, 6) for p in PROMPTS]
    assert tok.padding_side == "right"  # left padding was only for generation


def test_max_out_len_counts_prompt_tokens(llama_model, llama_tok):
    opts = GenerationOptions(max_out_len=14, top_k=None)
    texts = generate_texts(llama_model, llama_tok, PROMPTS, opts)
    for prompt, text in zip(PROMPTS, texts):
        prompt_len = len(llama_tok(prompt)["input_ids"])
        new = plain_greedy(llama_model, llama_tok, prompt, max(0, 14 - prompt_len))
        assert text == llama_tok.decode(llama_tok(prompt)["input_ids"] + new, skip_special_tokens=True)
    assert texts[2].startswith("The quick brown fox")  # prompt longer than 14 tokens: returned as is


def test_sampling_is_seeded(llama_model, llama_tok):
    a = generate_texts(llama_model, llama_tok, PROMPTS, GenerationOptions(30, top_k=5, seed=1))
    b = generate_texts(llama_model, llama_tok, PROMPTS, GenerationOptions(30, top_k=5, seed=1))
    c = generate_texts(llama_model, llama_tok, PROMPTS, GenerationOptions(30, top_k=5, seed=2))
    assert a == b and a != c


def test_greedy_exact_match_equals_teacher_forced_all_correct(llama_model, llama_tok):
    greedy = [llama_tok.decode(plain_greedy(llama_model, llama_tok, p, 2)) for p in PROMPTS]
    pairs = [(p, "France") for p in PROMPTS] + [(p, g.strip()) for p, g in zip(PROMPTS, greedy)]
    matches = greedy_exact_match(llama_model, llama_tok, pairs)
    assert matches == [s.all_correct for s in score_pairs(llama_model, llama_tok, pairs)]
    assert any(matches) and not all(matches)


def _request(case_id, prompts, relation="P103"):
    return EditRequest("Paris is the capital of", "Paris", "Italy", "France", generation_prompts=tuple(prompts),
                       case_id=case_id, relation_id=relation)


def test_fluency_and_consistency(llama_model, llama_tok):
    requests = [_request(0, PROMPTS[:2]), _request(1, PROMPTS[2:]), _request(2, [])]
    opts = GenerationOptions(max_out_len=24, top_k=None)
    summary, records = evaluate_generation(llama_model, llama_tok, requests, opts, progress=False)
    assert summary["consistency"] == NO_SNIPPETS and summary["n_records_fluency"] == 2 and records[2] is None
    texts = [generate_texts(llama_model, llama_tok, PROMPTS[:2], opts), generate_texts(llama_model, llama_tok, PROMPTS[2:], opts)]
    assert summary["fluency"] == pytest.approx(100 * (n_gram_entropy(texts[0]) + n_gram_entropy(texts[1])) / 2)

    snippets = {"P103": {"Q652": ["Italian is spoken in Italy and the capital of Italy is Rome."]}}
    summary, records = evaluate_generation(llama_model, llama_tok, requests, opts, snippets=snippets,
                                           target_ids={0: "Q652", 1: "Q999"}, progress=False)
    vec = tfidf_vectorizer(snippets)
    assert records[0]["consistency"] == pytest.approx(
        tfidf_similarity(" ".join(texts[0]), snippets["P103"]["Q652"][0], vec))
    assert records[1]["consistency"].startswith("unavailable: no snippets for (P103, Q999)")
    assert summary["n_records_consistency"] == 1
    assert summary["consistency"] == pytest.approx(100 * records[0]["consistency"])


def test_evaluate_requests_with_generation(llama_model, llama_tok):
    requests = [_request(0, PROMPTS[:1]), _request(1, [])]
    result = evaluate_requests(llama_model, llama_tok, requests, missing="count", details=True, progress=False,
                               generation=GenerationOptions(max_out_len=20, top_k=None))
    assert result.summary["n_records_fluency"] == 1
    assert result.records[0]["generation"]["fluency"] * 100 == pytest.approx(result.summary["fluency"])
    assert result.records[1]["generation"] is None
    assert result.summary["generation"]["max_out_len"] == 20
