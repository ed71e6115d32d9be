import pytest

from ftedit.data.requests import EditRequest
from ftedit.methods import apply_method, method_names


def _request():
    return EditRequest(prompt="The capital of France is", subject="France", target_new="Rome", target_true="Paris")


def test_recipe_method_edits_and_restores(gpt2_model, gpt2_tok):
    before = {n: p.detach().clone() for n, p in gpt2_model.named_parameters()}
    applied = apply_method("locft-bf", gpt2_model, gpt2_tok, [_request()],
                           overrides=["train.epochs=2"], progress=False)
    assert applied.touched and applied.seconds > 0
    changed = [n for n, p in applied.model.named_parameters() if not p.detach().equal(before[n])]
    assert changed and all(".mlp." in n for n in changed)
    base = applied.restore()
    assert all(p.detach().equal(before[n]) for n, p in base.named_parameters())


def test_unknown_method_lists_the_available_ones(gpt2_model, gpt2_tok):
    with pytest.raises(ValueError, match="locft-bf"):
        apply_method("nope", gpt2_model, gpt2_tok, [_request()])
    assert "ft" in method_names()
