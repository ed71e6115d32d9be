from __future__ import annotations

import json
import logging
from collections import Counter

import numpy as np
import pytest
import torch

from ftedit import augment
from ftedit.augment import (
    AugmentConfig,
    augment_cache_path,
    build_training_set,
    clean_prefix,
    join_prefix,
    leak_filter,
    nearest,
    random_examples,
    similar_examples,
    tokenizer_key,
)
from ftedit.cache import cache_dir, model_fingerprint
from ftedit.data.examples import PoolFact
from ftedit.data.requests import EditRequest, ProbePrompt

REQUESTS = [
    EditRequest(
        prompt="The mother tongue of Danielle Darrieux is", subject="Danielle Darrieux", target_new="English",
        target_true="French", paraphrase_prompts=("Where Danielle Darrieux is from, people speak",),
        neighborhood=(ProbePrompt("Michel Rocard is a native speaker of", "French"),),
    ),
    EditRequest(prompt="Toko Yasuda, the", subject="Toko Yasuda", target_new="piano", target_true="guitar"),
]

# Safe facts that must survive the leak filter.
CLEAN = [PoolFact(f"The capital of Country{i} is", f"City{i}", f"Country{i}") for i in range(60)]


def paraphrases(examples):
    return [e for e in examples if e.kind == "paraphrase"]


def cfg(**kw) -> AugmentConfig:
    base = {"n_paraphrases": 3, "prefix_tokens": 6, "n_random": 0, "cache": False}
    return AugmentConfig(**{**base, **kw})


# ---------------------------------------------------------------- prefixes and paraphrases

@pytest.mark.parametrize(("raw", "expected"), [
    ("Because of the rain", "Because of the rain. P is"),
    ("He left early.", "He left early. P is"),
    ('She said "no!"', 'She said "no!" P is'),
    ("I think,\n\nthat -", "I think, that. P is"),
    ("The\x16 cat\ufffd sat (", "The cat sat. P is"),
    ("  \n ", "P is"),
])
def test_join_prefix_ends_z_cleanly(raw, expected):
    assert join_prefix(raw, "P is") == expected


def test_clean_prefix_is_one_line():
    assert clean_prefix("a\n\tb   c\r\n") == "a b c"


@pytest.mark.parametrize("model_name", ["gpt2_model", "llama_model"])
def test_paraphrases_keep_target_and_end_with_prompt(request, model_name):
    model = request.getfixturevalue(model_name)
    tok = request.getfixturevalue("gpt2_tok" if model_name == "gpt2_model" else "llama_tok")
    out = build_training_set(model, tok, REQUESTS, cfg(n_paraphrases=4), progress=False)
    para = paraphrases(out)
    assert Counter(e.request_index for e in para) == {0: 4, 1: 4}
    for e in para:
        r = REQUESTS[e.request_index]
        assert (e.target, e.rejected) == (r.target_new, r.target_true)
        assert e.prompt.endswith(" " + r.prompt) and len(e.prompt) > len(r.prompt) + 2
        z = e.prompt[: -len(r.prompt) - 1]
        assert "\n" not in z and z == z.strip()


def test_prefixes_start_from_seed_words(gpt2_model, gpt2_tok):
    para = paraphrases(build_training_set(gpt2_model, gpt2_tok, REQUESTS[:1], cfg(n_paraphrases=5), progress=False))
    for e, seed in zip(para, ("The", "Therefore", "Because", "I", "You"), strict=True):
        assert e.prompt.startswith(seed)


def test_unconditional_prefixes_from_bos(llama_model, llama_tok):
    c = cfg(n_paraphrases=3, prefix_seeds=())
    para = paraphrases(build_training_set(llama_model, llama_tok, REQUESTS[:1], c, progress=False))
    assert len(para) == 3 and all(len(e.prompt) > len(REQUESTS[0].prompt) + 2 for e in para)


def test_same_seed_same_texts_different_seed_differs(gpt2_model, gpt2_tok):
    a = build_training_set(gpt2_model, gpt2_tok, REQUESTS, cfg(seed=1), progress=False)
    b = build_training_set(gpt2_model, gpt2_tok, REQUESTS, cfg(seed=1), progress=False)
    c = build_training_set(gpt2_model, gpt2_tok, REQUESTS, cfg(seed=2), progress=False)
    assert a == b
    assert [e.prompt for e in paraphrases(a)] != [e.prompt for e in paraphrases(c)]


def test_sampling_leaves_global_rng_and_train_mode_alone(gpt2_model, gpt2_tok):
    gpt2_model.train()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_training_set(gpt2_model, gpt2_tok, REQUESTS, cfg(), progress=False)
    assert torch.equal(torch.rand(3), expected)
    assert gpt2_model.training


def test_paraphrase_bank_draws_per_edit_from_one_bank(gpt2_model, gpt2_tok, monkeypatch):
    calls = []
    real = augment.sample_prefixes

    def spy(model, tok, n, config, progress=False):
        calls.append(n)
        return real(model, tok, n, config, progress)

    monkeypatch.setattr(augment, "sample_prefixes", spy)
    out = build_training_set(gpt2_model, gpt2_tok, REQUESTS, cfg(n_paraphrases=3, paraphrase_bank=5), progress=False)
    assert calls == [5]
    assert Counter(e.request_index for e in paraphrases(out)) == {0: 3, 1: 3}
    with pytest.raises(ValueError, match="paraphrase_bank"):
        AugmentConfig(n_paraphrases=15, paraphrase_bank=10)


def test_duplicate_prompts_share_prefixes(gpt2_model, gpt2_tok):
    reqs = [REQUESTS[0], REQUESTS[0]]
    para = paraphrases(build_training_set(gpt2_model, gpt2_tok, reqs, cfg(), progress=False))
    assert [e.prompt for e in para if e.request_index == 0] == [e.prompt for e in para if e.request_index == 1]


# ---------------------------------------------------------------- leak filter and random facts

LEAKS = [
    PoolFact("Danielle Darrieux was born in", "Paris", "DANIELLE darrieux"),  # same subject, other case
    PoolFact("where danielle darrieux is from, people speak", "French", "someone"),  # = paraphrase prompt
    PoolFact("Michel Rocard is a native speaker of", "French", "Michel Rocard"),  # = neighborhood prompt
    PoolFact("The mother tongue of Danielle Darrieux is", "French", "X"),  # = edit prompt
    PoolFact("A film starring Toko Yasuda was shot in", "Tokyo", "Film Z"),  # mentions an edit subject
]
KEPT = [
    PoolFact("Paris is the capital of", "France", "Paris"),
    PoolFact("Toko is a town in", "Japan", "Toko"),  # part of a subject only: not a leak
    PoolFact("The band Toko Yasudas released", "an album", "Toko Yasudas"),  # different word: not a leak
]


def test_leak_filter_removes_subject_prompt_and_neighbor_overlaps():
    assert leak_filter(LEAKS + KEPT + KEPT[:1], REQUESTS) == KEPT  # duplicates removed, order kept


def test_random_counts_true_answers_and_no_repeats():
    pool = LEAKS + CLEAN
    out = random_examples(REQUESTS, pool, cfg(n_random=20, seed=3))
    assert Counter(e.request_index for e in out) == {0: 20, 1: 20}
    assert all(e.kind == "random" and e.rejected is None for e in out)
    facts = [(e.prompt, e.target) for e in out]
    # Without replacement, no leaks, each with its true answer.
    assert len(set(facts)) == 40 and set(facts) <= {(f.prompt, f.target) for f in CLEAN}
    assert out == random_examples(REQUESTS, pool, cfg(n_random=20, seed=3))
    assert out != random_examples(REQUESTS, pool, cfg(n_random=20, seed=4))


def test_random_with_replacement_when_pool_too_small(caplog):
    with caplog.at_level(logging.WARNING, logger="ftedit.augment"):
        out = random_examples(REQUESTS, LEAKS + CLEAN[:7], cfg(n_random=5))
    assert len(out) == 10
    assert {e.prompt for e in out} == {f.prompt for f in CLEAN[:7]}  # every fact used before any repeats
    assert "need 10" in caplog.text and "only 7 of 12" in caplog.text


def test_random_facts_need_a_pool(gpt2_model, gpt2_tok):
    with pytest.raises(ValueError, match="pool"):
        build_training_set(gpt2_model, gpt2_tok, REQUESTS, cfg(n_random=2), progress=False)
    with pytest.raises(ValueError, match="leak filter"):
        random_examples(REQUESTS, LEAKS, cfg(n_random=2))


def test_build_order_counts_and_edits(gpt2_model, gpt2_tok):
    out = build_training_set(gpt2_model, gpt2_tok, REQUESTS, cfg(n_paraphrases=2, n_random=3), pool=CLEAN,
                             progress=False)
    assert [e.kind for e in out] == ["edit"] * 2 + ["paraphrase"] * 4 + ["random"] * 6
    assert [(e.prompt, e.target, e.rejected, e.request_index) for e in out[:2]] == [
        (r.prompt, r.target_new, r.target_true, i) for i, r in enumerate(REQUESTS)
    ]


def test_config_pool_path_is_loaded(tmp_path, gpt2_model, gpt2_tok):
    facts = [PoolFact("Danielle Darrieux was born in", "Paris", "Danielle Darrieux"), *CLEAN[:4]]  # 1 leak
    records = [{"prompt": f.prompt, "subject": f.subject, "target": f.target} for f in facts]
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    c = cfg(n_paraphrases=0, n_random=2, pool=str(tmp_path / "pool.jsonl"))
    out = build_training_set(None, gpt2_tok, REQUESTS, c, progress=False)
    assert [e.kind for e in out] == ["edit"] * 2 + ["random"] * 4
    assert {(e.prompt, e.target) for e in out[2:]} == {(f.prompt, f.target) for f in CLEAN[:4]}


def test_config_accepts_assignment_and_revalidates(gpt2_tok):
    c = AugmentConfig()
    c.prefix_seeds = ["The"]  # as a YAML recipe sets it
    c.n_random = -1
    with pytest.raises(ValueError, match="n_random"):
        build_training_set(None, gpt2_tok, REQUESTS, c, progress=False)
    c.n_random, c.n_paraphrases = 0, 0
    assert len(build_training_set(None, gpt2_tok, REQUESTS, c, progress=False)) == 2
    assert c.prefix_seeds == ("The",)
    assert AugmentConfig.single_editing().n_similar == 15 and AugmentConfig.single_editing().n_random == 0


# ---------------------------------------------------------------- similar facts

def test_nearest_orders_by_similarity():
    keys = np.eye(4, dtype=np.float32)
    queries = np.array([[0.1, 0.9, 0.5, 0.0], [1.0, 0.0, 0.0, 0.2]], dtype=np.float32)
    assert nearest(queries, keys, 2, chunk=1).tolist() == [[1, 2], [0, 3]]


def test_similar_facts_are_the_nearest_ones_real_minilm():
    language = [PoolFact("The mother tongue of Jean Gabin is", "French", "Jean Gabin"),
                PoolFact("The native language of Vladimir Putin is", "Russian", "Vladimir Putin")]
    devices = [PoolFact("Galaxy S4 is produced by", "Samsung", "Galaxy S4"),
               PoolFact("MacBook Air is developed by", "Apple", "MacBook Air")]
    other = [PoolFact("The Eiffel Tower is located in", "Paris", "Eiffel Tower"),
             PoolFact("Jimi Hendrix plays the", "guitar", "Jimi Hendrix"),
             PoolFact("Lionel Messi plays the sport of", "soccer", "Lionel Messi")]
    leak = PoolFact("Danielle Darrieux was born in", "Paris", "Danielle Darrieux")  # the nearest of all
    pool = [*other[:2], devices[1], leak, language[1], other[2], devices[0], language[0]]
    requests = [REQUESTS[0], EditRequest("iPhone 5 is a product of", "iPhone 5", "Nokia", "Apple")]
    out = similar_examples(requests, pool, cfg(n_similar=2))
    assert all(e.kind == "similar" and e.rejected is None for e in out)
    assert [(e.prompt, e.target) for e in out if e.request_index == 0] == [(f.prompt, f.target) for f in language]
    assert {e.prompt for e in out if e.request_index == 1} == {f.prompt for f in devices}


# ---------------------------------------------------------------- cache

def test_cache_hit_equals_fresh_and_seed_changes_key(gpt2_model, gpt2_tok, monkeypatch):
    c = cfg(n_random=2, cache=True, seed=5)
    fresh = build_training_set(gpt2_model, gpt2_tok, REQUESTS, cfg(n_random=2, seed=5), pool=CLEAN, progress=False)
    first = build_training_set(gpt2_model, gpt2_tok, REQUESTS, c, pool=CLEAN, progress=False)
    assert first == fresh
    files = list((cache_dir() / "augment").glob("*.jsonl"))
    assert len(files) == 1 and not list(files[0].parent.glob("*.tmp"))

    def boom(*a, **k):
        raise AssertionError("cache miss: prefixes were sampled again")

    monkeypatch.setattr(augment, "sample_prefixes", boom)
    assert build_training_set(gpt2_model, gpt2_tok, REQUESTS, c, pool=CLEAN, progress=False) == fresh
    with pytest.raises(AssertionError, match="cache miss"):  # another seed is another key
        build_training_set(gpt2_model, gpt2_tok, REQUESTS, cfg(n_random=2, cache=True, seed=6), pool=CLEAN,
                           progress=False)


def test_cache_key_tracks_weights_tokenizer_pool_and_requests(gpt2_model, gpt2_tok, llama_tok):
    c = cfg(n_random=2, n_paraphrases=1)
    model = {"fingerprint": model_fingerprint(gpt2_model), "tokenizer": tokenizer_key(gpt2_tok), "device": "cpu"}
    path = augment_cache_path(REQUESTS, c, CLEAN, model)
    with torch.no_grad():
        next(gpt2_model.parameters())[0, 0] += 1.0
    changed = {**model, "fingerprint": model_fingerprint(gpt2_model)}
    assert changed["fingerprint"] != model["fingerprint"]
    assert augment_cache_path(REQUESTS, c, CLEAN, changed) != path
    assert augment_cache_path(REQUESTS, c, CLEAN, {**model, "tokenizer": tokenizer_key(llama_tok)}) != path
    assert augment_cache_path(REQUESTS, c, CLEAN[:-1], model) != path
    assert augment_cache_path(REQUESTS[:1], c, CLEAN, model) != path
    assert augment_cache_path(REQUESTS, c, CLEAN, model) == path
    # without paraphrases the model does not matter
    no_para = cfg(n_random=2, n_paraphrases=0)
    assert augment_cache_path(REQUESTS, no_para, CLEAN, changed) == augment_cache_path(REQUESTS, no_para, CLEAN, model)
    assert path.suffix == ".jsonl" and path.parent == cache_dir() / "augment"
