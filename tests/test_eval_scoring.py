"""The batched scoring core against one plain, unbatched full ``model(...)`` call per (prompt, target)."""

from __future__ import annotations

import pytest
import torch

from ftedit import forward
from ftedit.evaluate import scoring
from ftedit.evaluate.scoring import lm_parts, next_token_topk, score_pairs

PAIRS = [
    ("The mother tongue of Danielle Darrieux is", "English"),
    ("The mother tongue of Danielle Darrieux is", "French"),
    ("The mother tongue of Danielle Darrieux is", "the French language of Paris"),
    ("Paris is the capital of", "France"),
    ("The quick brown fox jumps over the lazy dog. Paris is the capital of France and", "Illinois Institute of Technology"),
    ("Paris is the capital of", "France"),  # duplicate on purpose
]


def plain_scores(model, tok, prompt: str, target: str) -> tuple[list[float], list[int], list[int]]:
    """Per-target-token log-probs and argmax from one full forward on prompt + " " + target."""
    prompt_ids = tok(prompt)["input_ids"]
    target_ids = tok(" " + target, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + target_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    lps, argmax = [], []
    for i, t in enumerate(target_ids):
        position = len(prompt_ids) - 1 + i
        lps.append(logprobs[position, t].item())
        argmax.append(int(logits[position].argmax()))
    return lps, argmax, target_ids


def sharpen(model, factor: float = 30.0):
    """Scale the output embedding so that a random model's predictions are peaked (argmax tests mean something)."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(factor)
    return model


@pytest.fixture(params=["gpt2", "llama", "gemma"])
def model_tok(request, gpt2_tok, llama_tok):
    import tiny

    if request.param == "gpt2":
        return tiny.tiny_gpt2(gpt2_tok), gpt2_tok
    build = tiny.tiny_llama if request.param == "llama" else tiny.tiny_gemma3
    return build(llama_tok), llama_tok


def assert_matches_plain(model, tok, pairs, scores):
    for (prompt, target), s in zip(pairs, scores):
        lps, argmax, target_ids = plain_scores(model, tok, prompt, target)
        assert list(s.target_ids) == target_ids
        assert s.logprobs == pytest.approx(lps, abs=1e-5)
        assert list(s.argmax_ids) == argmax


def test_matches_full_forward(model_tok):
    model, tok = model_tok
    sharpen(model)
    scores = score_pairs(model, tok, PAIRS, batch_size=4)
    assert_matches_plain(model, tok, PAIRS, scores)
    assert any(len(s.target_ids) > 1 for s in scores)
    assert scores[3] == scores[5]


def test_nll_and_accuracy_properties(llama_model, llama_tok):
    (s,) = score_pairs(llama_model, llama_tok, [PAIRS[2]])
    lps, argmax, target_ids = plain_scores(llama_model, llama_tok, *PAIRS[2])
    assert s.nll == pytest.approx(-sum(lps) / len(lps), abs=1e-6)
    assert s.mean_token_prob == pytest.approx(torch.tensor(sum(lps) / len(lps)).exp().item(), rel=1e-6)
    correct = [a == t for a, t in zip(argmax, target_ids)]
    assert s.token_accuracy == pytest.approx(sum(correct) / len(correct))
    assert s.all_correct == all(correct)


def test_right_padding_invariance(gemma_model, llama_tok):
    short = ("Paris is the capital of", "France")
    alone = score_pairs(gemma_model, llama_tok, [short])[0]
    padded = score_pairs(gemma_model, llama_tok, [PAIRS[4], short, PAIRS[2]], batch_size=3)[1]
    assert padded.logprobs == pytest.approx(alone.logprobs, abs=1e-6)
    assert padded.argmax_ids == alone.argmax_ids


def test_bos_follows_tokenizer(gpt2_tok, llama_tok, gpt2_model, llama_model):
    assert llama_tok("Paris")["input_ids"][0] == llama_tok.bos_token_id
    assert gpt2_tok("Paris")["input_ids"][0] != gpt2_tok.bos_token_id
    # The score depends on the BOS being there: dropping it changes the numbers, so the check above matters.
    (with_bos,) = score_pairs(llama_model, llama_tok, [PAIRS[3]])
    prompt_ids = llama_tok(PAIRS[3][0])["input_ids"][1:]
    target_ids = llama_tok(" France", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = llama_model(input_ids=torch.tensor([prompt_ids + target_ids])).logits[0]
    no_bos = torch.log_softmax(logits, -1)[len(prompt_ids) - 1, target_ids[0]].item()
    assert abs(with_bos.logprobs[0] - no_bos) > 1e-4


def test_target_gets_exactly_one_leading_space(llama_model, llama_tok, gpt2_model, gpt2_tok):
    for model, tok in ((llama_model, llama_tok), (gpt2_model, gpt2_tok)):
        plain, spaced = score_pairs(model, tok, [("Paris is the capital of", "France"),
                                                 ("Paris is the capital of", " France")])
        assert plain == spaced
        assert list(plain.target_ids) == tok(" France", add_special_tokens=False)["input_ids"]
        assert list(plain.target_ids) != tok("France", add_special_tokens=False)["input_ids"]


def test_final_logit_softcapping(llama_tok):
    import tiny

    model = sharpen(tiny.tiny_gemma3(llama_tok))
    model.config.final_logit_softcapping = 2.0
    assert lm_parts(model).softcap == 2.0
    scores = score_pairs(model, llama_tok, PAIRS)
    assert_matches_plain(model, llama_tok, PAIRS, scores)
    uncapped = sharpen(tiny.tiny_gemma3(llama_tok))  # same seed, same weights, no cap
    other = score_pairs(uncapped, llama_tok, PAIRS)
    assert max(abs(a - b) for s, o in zip(scores, other) for a, b in zip(s.logprobs, o.logprobs)) > 1e-2


def test_falls_back_to_full_forward_when_split_is_wrong(llama_model, llama_tok, monkeypatch):
    real = forward._split_candidate

    def wrong(model):
        parts = real(model)
        return forward.LMParts(parts.body, parts.head, 0.5)  # a cap the model does not have

    monkeypatch.setattr(forward, "_split_candidate", wrong)
    assert lm_parts(llama_model).body is None
    scores = score_pairs(llama_model, llama_tok, PAIRS)
    assert_matches_plain(llama_model, llama_tok, PAIRS, scores)


def test_next_token_topk(model_tok):
    model, tok = model_tok
    prompts = [PAIRS[0][0], PAIRS[3][0], PAIRS[4][0]]
    tops = next_token_topk(model, tok, prompts, k=3, batch_size=2)
    for prompt, top in zip(prompts, tops):
        with torch.no_grad():
            probs = torch.softmax(model(input_ids=torch.tensor([tok(prompt)["input_ids"]])).logits[0, -1], -1)
        want = torch.topk(probs, 3)
        assert [t.token_id for t in top] == want.indices.tolist()
        assert [t.prob for t in top] == pytest.approx(want.values.tolist(), abs=1e-6)


def test_pair_without_target_tokens_rejected(llama_model, llama_tok):
    from ftedit.tokenization import EncodedPair

    for pair in (EncodedPair((2, 5, 6), 3), EncodedPair((5, 6), 0)):
        with pytest.raises(ValueError, match="needs a prompt token and a target token"):
            scoring.score_encoded(llama_model, [pair], llama_tok.pad_token_id)


def _run_batch_before_row_sharing(model, parts, batch, pad_token_id, out, starts, margins):
    """The batch routine as it was before one-token targets shared their head row: one head row per query."""
    from ftedit.tokenization import EncodedPair, pad_right

    padded = pad_right([EncodedPair(c.ids, len(c.ids)) for c in batch], pad_token_id)
    queries = [(row, *q) for row, c in enumerate(batch) for q in c.queries]
    rows, cols = torch.tensor([q[0] for q in queries]), torch.tensor([q[1] for q in queries])
    targets = torch.tensor([q[2] for q in queries])
    where = torch.tensor([starts[q[3]] + q[4] for q in queries])
    logprobs, argmax = [], []
    for start, logits in zip(range(0, len(queries), scoring.HEAD_CHUNK), scoring._position_logits(
            model, parts, padded.input_ids, padded.attention_mask, rows, cols)):
        chunk_targets = targets[start:start + len(logits)]
        logprobs.append(torch.log_softmax(logits, dim=-1).gather(1, chunk_targets[:, None]).squeeze(1))
        argmax.append(logits.argmax(dim=-1))
    out.lp[where] = torch.cat(logprobs).double()
    out.am[where] = torch.cat(argmax)


def _more_pairs():
    return PAIRS + [(p, t) for p in ("Paris is the capital of", "The mother tongue of Danielle Darrieux is")
                    for t in ("Berlin", "France", "English")]


def test_fp32_scores_are_bit_identical_to_the_routine_before(model_tok, monkeypatch):
    model, tok = model_tok
    new = score_pairs(model, tok, _more_pairs(), batch_size=4)
    monkeypatch.setattr(scoring, "_run_batch", _run_batch_before_row_sharing)
    assert score_pairs(model, tok, _more_pairs(), batch_size=4) == new


def test_bf16_scoring_shares_head_rows_of_one_token_targets(gpt2_model, gpt2_tok, monkeypatch):
    """The byte-level tokenizer makes "France" one token: it is read at the row that predicts the first token
    of "Berlin" and "English" after the same prompt, so bf16 scoring runs fewer head rows than fp32."""
    from ftedit.precision import ENV_OVERRIDE

    rows = []
    gpt2_model.get_output_embeddings().register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    monkeypatch.setattr(scoring, "NEAR_TIE", 0.0)
    exact = score_pairs(gpt2_model, gpt2_tok, _more_pairs())
    fp32_rows, rows[:] = sum(rows), []
    monkeypatch.setenv(ENV_OVERRIDE, "1")
    mixed = score_pairs(gpt2_model, gpt2_tok, _more_pairs())
    assert sum(rows) < fp32_rows
    assert all(a.logprobs == pytest.approx(b.logprobs, abs=0.1) for a, b in zip(exact, mixed))
