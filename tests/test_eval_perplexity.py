"""Token-weighted perplexity against a plain per-text loop."""

from __future__ import annotations

import math

import pytest
import torch

from ftedit.evaluate.perplexity import load_texts, perplexity


def plain_perplexity(model, tok, texts, max_length):
    total, count = 0.0, 0
    for text in texts:
        ids = tok(text)["input_ids"][:max_length]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        for pos in range(1, len(ids)):
            total -= logprobs[pos - 1, ids[pos]].item()
            count += 1
    return math.exp(total / count), count


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_matches_plain_loop(family, data_dir, llama_tok, gpt2_tok):
    import tiny

    tok = llama_tok if family == "llama" else gpt2_tok
    model = (tiny.tiny_llama if family == "llama" else tiny.tiny_gpt2)(tok)
    texts = load_texts(data_dir / "downstream" / "wiki_summaries.jsonl", n=4, offset=1)
    assert len(texts) == 4
    result = perplexity(model, tok, texts + ["x"], max_length=40, batch_size=3)
    want, count = plain_perplexity(model, tok, texts + ["x"], 40)
    assert result.perplexity == pytest.approx(want, rel=1e-6)
    assert result.n_tokens == count
    skipped = 1 if len(tok("x")["input_ids"]) < 2 else 0
    assert result.n_texts_skipped == skipped and result.n_texts == 5 - skipped


def test_token_weighted_not_text_averaged(llama_model, llama_tok):
    short, long = "Paris is the capital of France.", " ".join(["The quick brown fox jumps over the lazy dog."] * 4)
    both = perplexity(llama_model, llama_tok, [short, long], max_length=200)
    a = perplexity(llama_model, llama_tok, [short], max_length=200)
    b = perplexity(llama_model, llama_tok, [long], max_length=200)
    weighted = math.exp((a.nll * a.n_tokens + b.nll * b.n_tokens) / (a.n_tokens + b.n_tokens))
    assert both.perplexity == pytest.approx(weighted, rel=1e-6)
    assert abs(both.perplexity - (a.perplexity + b.perplexity) / 2) > 1e-3


def test_truncation(llama_model, llama_tok):
    text = " ".join(["The quick brown fox jumps over the lazy dog."] * 10)
    assert perplexity(llama_model, llama_tok, [text], max_length=16).n_tokens == 15
