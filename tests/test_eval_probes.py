"""Knowledge probes: the first non-stop-word greedy token, and the known-fact filter (top-1 margin >= 0.1)."""

from __future__ import annotations

import pytest
import torch

from ftedit.evaluate import probes
from ftedit.evaluate.probes import first_content_token, knows, knows_batch, retention_rate, select_known_facts
from ftedit.evaluate.scoring import NextToken


def ids(tok, *pieces: str) -> list[int]:
    out = []
    for p in pieces:
        (t,) = tok(p, add_special_tokens=False)["input_ids"]
        out.append(t)
    return out


def test_first_content_token_skips_stop_words_and_blanks(gpt2_tok):
    stops = probes.default_stop_words()
    assert "the" in stops and "of" in stops and "paris" not in stops
    the, of, paris, comma, nl = ids(gpt2_tok, " the", " of", " Paris", ",", "\n")
    assert first_content_token(gpt2_tok, [the, nl, of, paris, comma], stops) == paris
    assert first_content_token(gpt2_tok, [comma, paris], stops) == comma  # punctuation is not skipped
    assert first_content_token(gpt2_tok, [the, of], stops) is None


def test_knows_on_constructed_generations(gpt2_model, gpt2_tok, monkeypatch):
    the, of, paris, france, comma = ids(gpt2_tok, " the", " of", " Paris", " France", ",")
    generations = {"A": [the, france], "B": [the, paris], "C": [comma, france], "D": [the, of, the]}
    monkeypatch.setattr(probes, "generate_ids",
                        lambda model, tok, prompts, n, batch_size: [generations[p] for p in prompts])
    facts = [("A", "France"), ("B", "France"), ("C", "France"), ("D", "France")]
    assert knows_batch(gpt2_model, gpt2_tok, facts) == [True, False, False, False]
    assert knows(gpt2_model, gpt2_tok, "A", "France") is True
    assert retention_rate(gpt2_model, gpt2_tok, facts) == 25.0


PROMPTS = ["Paris is the capital of", "The mother tongue of Danielle Darrieux is", "Watts Humphrey attended",
           "Danielle Darrieux was born in", "Michel Rocard is a native speaker of", "The quick brown fox"]


def plain_first_content(model, tok, prompt: str, stops) -> int | None:
    ids_, generated = tok(prompt)["input_ids"], []
    for _ in range(10):
        with torch.no_grad():
            generated.append(int(model(input_ids=torch.tensor([ids_ + generated])).logits[0, -1].argmax()))
    words = [tok.decode([t]).strip().lower() for t in generated]
    return next((t for t, w in zip(generated, words) if w and w not in stops), None)


def test_knows_with_real_greedy_continuations(gpt2_model, gpt2_tok):
    stops = probes.default_stop_words()
    facts, expected = [], []
    for prompt in PROMPTS:
        content = plain_first_content(gpt2_model, gpt2_tok, prompt, stops)
        for word in ([gpt2_tok.decode([content]).strip()] if content is not None else []) + ["France"]:
            facts.append((prompt, word))
            expected.append(content is not None and gpt2_tok(" " + word, add_special_tokens=False)["input_ids"][0] == content)
    assert knows_batch(gpt2_model, gpt2_tok, facts, batch_size=4) == expected
    assert any(expected) and not all(expected)


def test_select_known_facts_rule(gpt2_model, gpt2_tok, monkeypatch):
    paris, rome = ids(gpt2_tok, " Paris", " France")
    table = {"a": [NextToken(paris, " Paris", 0.625), NextToken(rome, " France", 0.5)],    # margin 0.125
             "b": [NextToken(paris, " Paris", 0.55), NextToken(rome, " France", 0.5)],     # margin 0.05
             "c": [NextToken(rome, " France", 0.9), NextToken(paris, " Paris", 0.05)],     # wrong top-1
             "d": [NextToken(paris, " Paris", 0.375), NextToken(rome, " France", 0.25)]}   # margin exactly 0.125
    monkeypatch.setattr(probes, "next_token_topk", lambda model, tok, prompts, k, batch_size: [table[p] for p in prompts])
    facts = [(p, "Paris") for p in "abcd"]
    kept = select_known_facts(gpt2_model, gpt2_tok, facts, margin=0.1)
    assert [(f.prompt, f.index) for f in kept] == [("a", 0), ("d", 3)]
    assert [f.prompt for f in select_known_facts(gpt2_model, gpt2_tok, facts, margin=0.125)] == ["a", "d"]
    assert kept[0].p_top1 == 0.625 and kept[0].p_top2 == 0.5


def test_select_known_facts_real_model(llama_model, llama_tok):
    prompts = ["Paris is the capital of", "The mother tongue of Danielle Darrieux is", "Watts Humphrey attended"]
    facts, expected, margins = [], [], {}
    for p in prompts:
        with torch.no_grad():
            probs = torch.softmax(llama_model(input_ids=torch.tensor([llama_tok(p)["input_ids"]])).logits[0, -1], -1)
        top = torch.topk(probs, 2)
        margins[p] = float(top.values[0] - top.values[1])
        for rank in (0, 1):  # the top-1 token as target (known), the second one (not known)
            word = llama_tok.decode([int(top.indices[rank])]).strip()
            first = llama_tok(" " + word, add_special_tokens=False)["input_ids"][0]
            facts.append((p, word))
            expected.append(rank == 0 and first == int(top.indices[0]))
    kept = select_known_facts(llama_model, llama_tok, facts, margin=0.0)
    assert [f.index for f in kept] == [i for i, e in enumerate(expected) if e]
    assert kept
    for f in kept:
        assert f.p_top1 - f.p_top2 == pytest.approx(margins[f.prompt], abs=1e-6)
    assert select_known_facts(llama_model, llama_tok, facts, margin=1.0) == []
