"""Recipes, config files and --set overrides."""

import pytest

from ftedit.config import ConfigError, parse_assignments, recipe_names, resolve_config

RECIPES = {"ft", "ft-m", "ft-mask-para-rand", "ft-mask-para-sim", "locft-bf"}


def test_all_named_recipes_exist_and_resolve():
    assert set(recipe_names()) >= RECIPES
    for name in RECIPES:
        cfg = resolve_config(name)
        assert cfg.recipe == name and cfg.description


def test_recipes_differ_where_the_papers_do():
    ft, ftm = resolve_config("ft"), resolve_config("ft-m")
    final, sim = resolve_config("ft-mask-para-rand"), resolve_config("ft-mask-para-sim")
    assert not ft.objective.conditional and final.objective.conditional
    assert ftm.train.pipeline == "depth" and final.train.pipeline == "breadth"
    assert final.augment.n_paraphrases == 15 and final.augment.n_random == 20
    assert sim.mode == "single" and sim.augment.n_similar == 15 and sim.augment.n_random == 0
    assert resolve_config("locft-bf").params.modules == "down"


def test_yaml_and_toml_files_override_the_recipe(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  lr: 0.001\n  epochs: 3\nparams:\n  method: lora\n")
    cfg = resolve_config("locft-bf", y)
    assert cfg.train.lr == 0.001 and cfg.train.epochs == 3 and cfg.params.method == "lora"
    t = tmp_path / "c.toml"
    t.write_text("mode = 'sequential'\n[train]\nbatch_size = 7\n")
    cfg = resolve_config("locft-bf", t)
    assert cfg.mode == "sequential" and cfg.train.batch_size == 7


def test_set_overrides_win_and_are_typed():
    cfg = resolve_config("locft-bf", overrides=["train.lr=1e-4", "objective.append_eos=true", "params.layers=-2:"])
    assert cfg.train.lr == 1e-4 and cfg.objective.append_eos is True and cfg.params.layers == "-2:"
    assert parse_assignments(["a.b=3"]) == {"a": {"b": "3"}}
    cfg = resolve_config("locft-bf", overrides=["augment.paraphrase_bank=16", "augment.prefix_seeds=[The, A]"])
    assert cfg.augment.paraphrase_bank == 16 and cfg.augment.prefix_seeds == ("The", "A")


def test_unknown_field_names_the_key_and_the_file(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'train\.learning_rate'"):
        resolve_config("locft-bf", y)


@pytest.mark.parametrize("override,message", [
    (["mode=batch"], "mode"), (["params.method=qlora"], "method"), (["train.epochs=0"], "epochs"),
    (["train.lr=fast"], "train.lr"), (["nonsense"], "key=value"),
])
def test_bad_values_are_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config("locft-bf", overrides=override)


def test_unknown_recipe():
    with pytest.raises(ConfigError, match="unknown recipe 'rome'"):
        resolve_config("rome")
