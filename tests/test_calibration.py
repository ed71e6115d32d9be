"""The shipped calibration set and pool: COUNTERFACT's train split only, reproducible from the shared data."""

import json

from ftedit.calibration import (
    CALIBRATION_FILE,
    POOL_FILE,
    build_calibration_set,
    calibration_sha256,
    case_ids,
    resolve_pool,
    resource,
)
from ftedit.data.loaders import load_pool_facts, load_requests


def _splits(data_dir):
    easy = data_dir / "counterfact" / "easyedit"
    return {name: case_ids(easy / f"counterfact-{name}.json") for name in ("train", "edit", "val")}


def test_calibration_set_comes_from_the_train_split_and_never_the_edit_or_val_split(data_dir):
    splits = _splits(data_dir)
    shipped = case_ids(resource(CALIBRATION_FILE))
    assert len(shipped) >= 100
    assert shipped <= splits["train"]
    assert not shipped & (splits["edit"] | splits["val"] | case_ids(resource("demo_edits.json")))


def test_calibration_records_have_paraphrases_and_neighbors():
    requests = load_requests(resource(CALIBRATION_FILE)).requests
    assert all(r.paraphrase_prompts and r.neighborhood and r.target_true for r in requests)


def test_calibration_set_is_rebuilt_exactly_by_its_builder(data_dir):
    union = json.loads((data_dir / "counterfact/full/counterfact_full_union.json").read_text())
    splits = _splits(data_dir)
    held = splits["edit"] | splits["val"] | case_ids(resource("demo_edits.json"))
    rebuilt = build_calibration_set(union, splits["train"], held, n=120, seed=0)
    assert rebuilt == json.loads(resource(CALIBRATION_FILE).read_text())


def test_shipped_pool_is_train_split_facts_and_loads_by_name(data_dir):
    splits = _splits(data_dir)
    pool_ids = case_ids(resource(POOL_FILE))
    assert pool_ids <= splits["train"] and not pool_ids & splits["edit"]
    assert resolve_pool("shipped") == str(resource(POOL_FILE)) and resolve_pool("x.json") == "x.json"
    assert len(load_pool_facts("shipped")) == len(pool_ids)


def test_shipped_location_matches_the_default_recipes_search_settings():
    """The bundled model's shipped search is found only under the settings it was run with: a config change that
    alters the search settings (a renamed field, a new default) must come with a new search or a re-keyed entry,
    or the demo silently runs a 20-minute search."""
    from ftedit.config import DEFAULT_RECIPE, resolve_config
    from ftedit.locate import search_settings, settings_key, shipped_locations

    shipped_set = calibration_sha256(str(resource(CALIBRATION_FILE)))  # unit tests swap in a small set
    key = settings_key(search_settings(resolve_config(DEFAULT_RECIPE)), shipped_set)
    entries = shipped_locations()
    assert any(name.endswith(f":{key}") for name in entries), sorted(entries)
    for name, entry in entries.items():
        assert name.endswith(f":{settings_key(entry['search']['settings'], shipped_set)}")


def test_precision_and_other_execution_settings_find_the_same_search():
    from ftedit.config import resolve_config
    from ftedit.locate import search_settings

    base = search_settings(resolve_config("locft-bf-rand"))
    for override in ("train.mixed_precision=bf16", "train.mixed_precision=no", "train.cache_activations=false",
                     "objective.locality_loss=ce", "train.stop_margin=1.0"):
        assert search_settings(resolve_config("locft-bf-rand", overrides=[override])) == base, override
    assert search_settings(resolve_config("locft-bf-rand", overrides=["train.lr=1e-3"])) != base


def test_a_lora_edit_uses_the_full_weight_search():
    from ftedit.config import resolve_config
    from ftedit.locate import Candidate, full_weight_twin, search_settings, trial_config

    base = resolve_config("locft-bf-rand")
    lora = resolve_config("locft-bf-rand", overrides=["params.method=lora"])
    assert lora.train.lr != base.train.lr  # the adapter trains at its own rate ...
    assert search_settings(full_weight_twin(lora)) == search_settings(base)  # ... but is placed like full weights
    assert search_settings(lora) != search_settings(base)
    assert trial_config(lora, Candidate(1, "up"), 3).params.method == "full"
