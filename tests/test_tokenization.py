"""Each tokenization convention (leading space, BOS, EOS, padding side) is checked on its own."""

import pytest
import torch

from ftedit.models import prepare_tokenizer
from ftedit.tokenization import (
    IGNORE_INDEX,
    encode_pair,
    encode_prompt,
    encode_target,
    left_padded,
    pad_right,
    with_leading_space,
)


def test_target_gets_exactly_one_leading_space():
    assert with_leading_space("French") == " French"
    assert with_leading_space(" French") == " French"


@pytest.mark.parametrize("tok_name", ["gpt2_tok", "llama_tok"])
def test_target_is_encoded_with_leading_space_and_no_special_tokens(request, tok_name):
    tok = request.getfixturevalue(tok_name)
    ids = encode_target(tok, "Paris")
    assert ids == tok(" Paris", add_special_tokens=False)["input_ids"]
    assert tok.bos_token_id not in ids
    assert tok.decode(ids).strip() == "Paris"


def test_bos_follows_the_tokenizer(gpt2_tok, llama_tok):
    # Llama/Gemma-style tokenizers prepend <bos>; GPT-2 adds nothing.
    assert encode_prompt(llama_tok, "The capital of France is")[0] == llama_tok.bos_token_id
    assert encode_prompt(gpt2_tok, "The capital of France is")[0] != gpt2_tok.bos_token_id
    # ... and a target never carries BOS
    assert llama_tok.bos_token_id not in encode_target(llama_tok, "Paris")


def test_eos_only_when_asked(llama_tok):
    plain = encode_target(llama_tok, "Paris")
    with_eos = encode_target(llama_tok, "Paris", append_eos=True)
    assert llama_tok.eos_token_id not in plain
    assert with_eos == plain + [llama_tok.eos_token_id]


def test_pair_is_prompt_then_target(llama_tok):
    pair = encode_pair(llama_tok, "The capital of France is", "Paris")
    assert list(pair.input_ids[:pair.target_start]) == encode_prompt(llama_tok, "The capital of France is")
    assert list(pair.target_ids) == encode_target(llama_tok, "Paris")


def test_padding_is_right_and_labels_cover_only_targets(llama_tok):
    a = encode_pair(llama_tok, "The capital of France is", "Paris")
    b = encode_pair(llama_tok, "Paris is", "the capital of France")
    batch = pad_right([a, b], llama_tok.pad_token_id)
    assert llama_tok.padding_side == "right"
    short = 0 if len(a.input_ids) < len(b.input_ids) else 1
    n = len([a, b][short].input_ids)
    assert (batch.input_ids[short, n:] == llama_tok.pad_token_id).all()
    assert (batch.attention_mask[short, n:] == 0).all() and (batch.attention_mask[short, :n] == 1).all()
    labelled = (batch.labels[0] != IGNORE_INDEX).nonzero().flatten().tolist()
    assert labelled == list(range(a.target_start, len(a.input_ids)))
    assert torch.equal(batch.labels[0, a.target_start:len(a.input_ids)], torch.tensor(a.target_ids))


def test_pad_token_defaults_to_eos_when_missing():
    import tiny

    tok = tiny.byte_level_tokenizer()
    tok.pad_token = None
    prepare_tokenizer(tok)
    assert tok.pad_token == tok.eos_token and tok.padding_side == "right"


def test_left_padded_is_temporary(llama_tok):
    with left_padded(llama_tok) as t:
        assert t.padding_side == "left"
    assert llama_tok.padding_side == "right"
