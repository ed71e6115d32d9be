"""Slow tests on the real gemma-3-270m (run with `make test-real` or `pytest -m real_model`)."""

import pytest

from ftedit.models import load_model

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def gemma():
    return load_model("demo", device="cpu")


def test_demo_model_loads_from_the_bundled_gguf_and_knows_facts(gemma):
    from ftedit.evaluate import next_token_topk

    model, tok, identity = gemma
    assert identity.source == "bundled" and identity.model_class == "Gemma3ForCausalLM"
    assert identity.fingerprint.startswith("a5fd3b62")
    assert tok.bos_token == "<bos>" and tok.padding_side == "right"
    [top] = next_token_topk(model, tok, ["The mother tongue of Danielle Darrieux is"], k=1)
    assert top[0].token.strip() == "French"


def test_unedited_gemma_scores_like_an_unedited_model_on_counterfact(gemma, data_dir):
    from ftedit.data import load_requests
    from ftedit.evaluate import evaluate_requests

    model, tok, _ = gemma
    requests = load_requests(data_dir / "counterfact/easyedit/counterfact-edit.json", n=30).requests
    summary = evaluate_requests(model, tok, requests, progress=False).summary
    # the guide's reference for these 30 records: 13/17/80
    assert round(summary["efficacy"]) == 13 and round(summary["generalization"]) == 17
    assert round(summary["locality"]) == 80


def test_augmentation_protects_neighbors_on_gemma(gemma, data_dir):
    from ftedit.config import resolve_config
    from ftedit.data import load_pool_facts, load_requests
    from ftedit.editor import edit
    from ftedit.evaluate import evaluate_requests

    model, tok, identity = gemma
    requests = load_requests(data_dir / "counterfact/easyedit/counterfact-edit.json", n=20).requests
    pool = load_pool_facts(data_dir / "counterfact/easyedit/counterfact-train.json", n=2000)
    # paper 000's claim, isolated: the same recipe (same layers, objective and training) with and without
    # pseudo-paraphrases and random pool facts
    scores = {}
    for name, augment in (("plain", ["augment.n_paraphrases=0", "augment.n_random=0"]),
                          ("augmented", ["augment.n_paraphrases=5", "augment.n_random=10"])):
        cfg = resolve_config("ft-mask-para-rand", overrides=augment)
        result = edit(model, tok, requests, cfg, pool=pool, progress=False, model_fingerprint=identity.fingerprint)
        scores[name] = evaluate_requests(result.model, tok, requests, progress=False).summary
        model = result.restore()
    assert scores["augmented"]["efficacy"] >= 95
    assert scores["augmented"]["locality"] > scores["plain"]["locality"] + 10
    assert scores["augmented"]["edit_score"] > scores["plain"]["edit_score"]


def test_demo_end_to_end_edits_gemma():
    from rich.console import Console

    from ftedit.commands.demo import run_demo

    out = run_demo(console=Console(width=200))
    assert out["post"]["efficacy"] == 100.0 and out["pre"]["efficacy"] < 50
    # 4 paraphrases: PS moves in steps of 25, and the KL-locality default left it at 25 on these edits
    assert out["post"]["generalization"] >= out["pre"]["generalization"]
    assert out["post"]["locality"] >= 75  # the neighbors keep their answers
    assert out["location"]["source"] == "shipped"  # no search at demo time
