"""Parameter selection resolves modules from the model's structure, across architectures."""

import pytest
from transformers import AutoModelForCausalLM, GPTJConfig, GPTNeoXConfig, OPTConfig

from ftedit.params import SelectionError, block_roles, find_blocks, parse_layers, select_targets


def _gptj():
    return AutoModelForCausalLM.from_config(GPTJConfig(vocab_size=64, n_embd=32, n_layer=2, n_head=2, rotary_dim=8,
                                                       bos_token_id=0, eos_token_id=0))


def _neox():
    return AutoModelForCausalLM.from_config(GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                          num_attention_heads=2, intermediate_size=64))


def _opt():
    return AutoModelForCausalLM.from_config(OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                      num_attention_heads=2, ffn_dim=64, word_embed_proj_dim=32))


EXPECTED_DOWN = {
    "gpt2_model": "transformer.h.2.mlp.c_proj",
    "llama_model": "model.layers.2.mlp.down_proj",
    "gemma_model": "model.layers.2.mlp.down_proj",
}


@pytest.mark.parametrize("name", sorted(EXPECTED_DOWN))
def test_last_layer_down_projection(request, name):
    model = request.getfixturevalue(name)
    [target] = select_targets(model, "-1:", "down")
    assert target.name == EXPECTED_DOWN[name] and target.layer == 2 and target.role == "down"
    assert model.get_submodule(target.name) is target.module


@pytest.mark.parametrize("factory,roles", [
    (_gptj, {"q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj", "o": "attn.out_proj",
             "up": "mlp.fc_in", "down": "mlp.fc_out"}),
    (_neox, {"qkv": "attention.query_key_value", "o": "attention.dense", "up": "mlp.dense_h_to_4h",
             "down": "mlp.dense_4h_to_h"}),
    (_opt, {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.out_proj",
            "up": "fc1", "down": "fc2"}),
])
def test_roles_in_other_architectures(factory, roles):
    _, blocks = find_blocks(factory())
    assert {role: rel for role, (rel, _) in block_roles(blocks[0]).items()} == roles


def test_gpt2_roles_distinguish_the_two_c_proj(gpt2_model):
    roles = {role: rel for role, (rel, _) in block_roles(gpt2_model.transformer.h[0]).items()}
    assert roles == {"qkv": "attn.c_attn", "o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"}


def test_groups_and_block(llama_model):
    attn = select_targets(llama_model, [0], "attn")
    assert [t.role for t in attn] == ["q", "k", "v", "o"]
    [block] = select_targets(llama_model, "1", "block")
    assert block.name == "model.layers.1" and block.role == "block"


@pytest.mark.parametrize("spec,expected", [
    ("-3:", [15, 16, 17]), ("15,16", [15, 16]), ([-1], [17]), ("4:6", [4, 5]), ("frac:0.66", [11]),
    ("all", list(range(18))), (3, [3]),
])
def test_parse_layers(spec, expected):
    assert parse_layers(spec, 18) == expected


@pytest.mark.parametrize("spec", ["18", "-19", "", "5:5"])
def test_bad_layers_are_errors(spec):
    with pytest.raises(SelectionError, match="outside"):
        parse_layers(spec, 18)


def test_unknown_module_is_an_error(llama_model):
    with pytest.raises(SelectionError, match="unknown module 'mlp_down'"):
        select_targets(llama_model, "-1:", "mlp_down")


def test_missing_role_is_an_error(gpt2_model):
    with pytest.raises(SelectionError, match="gate"):
        select_targets(gpt2_model, "-1:", "gate")
