"""The one cache module: keyed paths and the model fingerprint."""

import torch

from ftedit.cache import cache_dir, cache_path, key_hash, model_fingerprint


def test_cache_dir_honours_ftedit_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FTEDIT_CACHE", str(tmp_path / "elsewhere"))
    assert cache_dir() == tmp_path / "elsewhere"
    assert cache_path("mom2", model="m").parent == tmp_path / "elsewhere" / "mom2"


def test_same_key_same_path_and_any_changed_part_another():
    parts = {"model": "abc", "settings": {"lr": 0.1, "layers": [1, 2]}, "n": 3}
    path = cache_path("locate", **parts)
    assert cache_path("locate", **dict(reversed(parts.items()))) == path  # order of parts does not matter
    assert cache_path("locate", model="abc", n=3, settings={"layers": [1, 2], "lr": 0.1}) == path
    changed = [{**parts, "model": "abd"}, {**parts, "n": 4}, {**parts, "settings": {"lr": 0.1, "layers": [2, 1]}},
               {**parts, "extra": None}]
    others = {cache_path("locate", **p) for p in changed} | {cache_path("augment", **parts)}
    assert path not in others and len(others) == len(changed) + 1
    assert cache_path("mom2", suffix=".safetensors", **parts).suffix == ".safetensors"


def test_key_hash_is_canonical_json():
    assert key_hash({"b": 1, "a": [1, "x"]}) == key_hash({"a": [1, "x"], "b": 1})
    assert key_hash({"a": 1}) != key_hash({"a": "1"})


def test_fingerprint_changes_when_one_weight_changes_and_is_stable_otherwise(llama_model, llama_tok):
    import tiny

    first = model_fingerprint(llama_model)
    assert model_fingerprint(llama_model) == first
    assert model_fingerprint(tiny.tiny_llama(llama_tok)) == first  # same weights (seeded), another object
    assert model_fingerprint(tiny.tiny_llama(llama_tok, seed=1)) != first
    original = {k: v.clone() for k, v in llama_model.state_dict().items()}
    with torch.no_grad():
        llama_model.model.layers[1].mlp.down_proj.weight[3, 4] += 1e-3
    assert model_fingerprint(llama_model) != first  # the remembered fingerprint is not reused after a change
    llama_model.load_state_dict(original)
    assert model_fingerprint(llama_model) == first


def test_fingerprint_tells_apart_a_swap_of_two_weights(llama_model):
    first = model_fingerprint(llama_model)
    weight = llama_model.model.layers[0].mlp.up_proj.weight
    with torch.no_grad():
        a, b = weight[0, 0].item(), weight[0, 1].item()
        weight[0, 0], weight[0, 1] = b, a  # every sum stays the same
    assert a != b and model_fingerprint(llama_model) != first
