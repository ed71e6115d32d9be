"""ROME, MEMIT, AlphaEdit and FT-L: their linear algebra, statistics cache, and end-to-end runs on tiny models."""

import json

import pytest
import torch

from ftedit.baselines import stats as stats_mod
from ftedit.baselines.alphaedit import null_space_projection, projected_update
from ftedit.baselines.common import (
    add_update,
    down_proj,
    essence_probe,
    last_token_before,
    post_mlp_module,
    residual_to_down,
    rewrite_probes,
)
from ftedit.baselines.rome import rank_one_update
from ftedit.baselines.stats import CorpusError, StatsConfig, mom2
from ftedit.data.requests import EditRequest
from ftedit.methods import apply_method, method_names
from ftedit.params import weight_out_in
from ftedit.registry import get_method
from ftedit.tokenization import encode_prompt

REQUESTS = [
    EditRequest(prompt="The capital of France is", subject="France", target_new="Rome", target_true="Paris"),
    EditRequest(prompt="The quick brown fox jumps over the", subject="brown fox", target_new="Paris",
                target_true="dog"),
]


@pytest.fixture
def corpus(tmp_path, data_dir):
    lines = (data_dir / "downstream" / "wiki_summaries.jsonl").read_text().splitlines()[:12]
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _spd(d: int, rank: int | None = None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, rank or 2 * d, generator=g, dtype=torch.float64)
    return a @ a.T / a.shape[1]


# ------------------------------------------------------------------------------------------ linear algebra


def test_rank_one_update_inserts_the_key_value_pair_and_spares_c_orthogonal_keys():
    d_in, d_out = 12, 7
    g = torch.Generator().manual_seed(1)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    cov = _spd(d_in)
    key, value = torch.randn(d_in, generator=g, dtype=torch.float64), torch.randn(d_out, generator=g, dtype=torch.float64)
    new = w + rank_one_update(w, key, value, cov)
    torch.testing.assert_close(new @ key, value)
    # keys orthogonal to key in the C⁻¹ metric: k = x − (xᵀC⁻¹key / keyᵀC⁻¹key) key
    u = torch.linalg.solve(cov, key)
    for _ in range(3):
        x = torch.randn(d_in, generator=g, dtype=torch.float64)
        k = x - (x @ u) / (key @ u) * key
        torch.testing.assert_close(new @ k, w @ k)


def test_rank_one_update_on_a_conv1d_module_changes_its_output_at_the_key_by_delta(gpt2_model):
    module = down_proj(gpt2_model, 1).module  # GPT-2 Conv1D: weight stored [in, out]
    w = weight_out_in(module).detach().clone()
    key = torch.randn(w.shape[1], dtype=torch.float64)
    delta = torch.randn(w.shape[0], dtype=torch.float64)
    with torch.no_grad():
        before = module(key.float()[None])[0]
        add_update(module, rank_one_update(w, key, w.double() @ key + delta, _spd(w.shape[1])))
        after = module(key.float()[None])[0]
    torch.testing.assert_close(after - before, delta.float(), atol=1e-4, rtol=1e-4)


def test_memit_least_squares_update_solves_its_normal_equations():
    from ftedit.baselines.common import least_squares_update

    d_in, d_out, n = 16, 6, 5
    g = torch.Generator().manual_seed(2)
    keys = torch.randn(d_in, n, generator=g, dtype=torch.float64)
    resid = torch.randn(d_out, n, generator=g, dtype=torch.float64)
    gram = 3.0 * _spd(d_in)
    update = least_squares_update(keys, resid, gram)
    # gradient of ||ΔW K − R||² + tr(ΔW G ΔWᵀ) vanishes: ΔW (G + K Kᵀ) = R Kᵀ
    torch.testing.assert_close(update @ (gram + keys @ keys.T), resid @ keys.T)
    # a negligible penalty makes the update fit the residuals exactly (n < d_in)
    torch.testing.assert_close(least_squares_update(keys, resid, 1e-9 * gram) @ keys, resid, atol=1e-5, rtol=1e-5)


def test_alphaedit_projection_leaves_preserved_keys_unchanged():
    d_in, d_out, n = 20, 8, 3
    g = torch.Generator().manual_seed(3)
    basis = torch.randn(d_in, 12, generator=g, dtype=torch.float64)
    cov = basis @ basis.T / 12  # preserved keys span 12 of 20 dimensions
    proj = null_space_projection(cov, 1e-8)
    assert round(torch.trace(proj).item()) == d_in - 12
    keys = torch.randn(d_in, n, generator=g, dtype=torch.float64)
    resid = torch.randn(d_out, n, generator=g, dtype=torch.float64)
    update = projected_update(keys, resid, proj, torch.zeros(d_in, d_in, dtype=torch.float64), l2=1e-6)
    preserved = basis @ torch.randn(12, 5, generator=g, dtype=torch.float64)
    assert (update @ preserved).abs().max() < 1e-6 * update.abs().max() * preserved.abs().max()  # W' k0 == W k0
    # the edited keys' residuals are still written, through their null-space components
    torch.testing.assert_close(update @ proj @ keys, resid, atol=1e-4, rtol=1e-4)
    # sequential batches: the first batch's keys weigh on the second update and are barely disturbed
    later = torch.randn(d_in, n, generator=g, dtype=torch.float64)
    free = projected_update(later, resid, proj, torch.zeros(d_in, d_in, dtype=torch.float64), l2=1.0)
    kept = projected_update(later, resid, proj, 1e4 * keys @ keys.T, l2=1.0)
    assert (kept @ keys).norm() < 0.1 * (free @ keys).norm()


def test_alphaedit_on_a_tiny_model_preserves_keys_in_the_statistics_span(llama_model, llama_tok, corpus):
    stats = StatsConfig(corpus=str(corpus), n_samples=12, max_length=64)
    target = down_proj(llama_model, 1)
    cov = mom2(llama_model, llama_tok, [target], stats, progress=False)[1]
    eig = torch.linalg.eigvalsh(cov.double())
    threshold = eig.quantile(0.5).item()  # half of the dimensions are "preserved"
    w = weight_out_in(target.module).detach().clone()
    applied = apply_method("alphaedit", llama_model, llama_tok, REQUESTS, progress=False, overrides={
        "layers": "1", "nullspace_threshold": threshold, "value": {"steps": 3},
        "stats": {"corpus": str(corpus), "n_samples": 12, "max_length": 64}})
    new = weight_out_in(target.module).detach()
    assert not new.equal(w)
    values, vectors = torch.linalg.eigh(cov.double())
    preserved = vectors[:, values >= threshold].float()
    update = new - w
    assert (update @ preserved).norm() < 1e-3 * update.norm()  # without the projection: same order as ΔW
    applied.restore()


# ------------------------------------------------------------------------------------------ structure and positions


def test_post_mlp_norm_is_found_by_data_flow(gpt2_model, llama_model, gemma_model):
    assert post_mlp_module(gpt2_model, 1) is None
    assert post_mlp_module(llama_model, 1) is None
    post = post_mlp_module(gemma_model, 1)
    assert post is not None and post is not down_proj(gemma_model, 1).module


def test_residual_to_down_inverts_the_post_mlp_norm(gemma_model):
    post = post_mlp_module(gemma_model, 1)
    with torch.no_grad():
        post.weight.normal_()  # a non-trivial norm scale
    g = torch.Generator().manual_seed(4)
    current = torch.randn(3, post.weight.shape[0], generator=g)
    change = 0.3 * torch.randn(current.shape, generator=g)
    with torch.no_grad():
        residual = post(current + change) - post(current)
    x = residual_to_down(post, current, residual)
    with torch.no_grad():
        torch.testing.assert_close(post(current + x) - post(current), residual, atol=1e-3, rtol=1e-3)
    # the norm ignores scale: the smallest such change is no larger than the one that made the residual
    assert (x.norm(dim=-1) <= change.norm(dim=-1) * 1.01).all()
    assert residual_to_down(None, current, residual) is residual


@pytest.mark.parametrize("tok_name", ["gpt2_tok", "llama_tok"])
def test_subject_last_token_position(request, tok_name):
    tok = request.getfixturevalue(tok_name)
    for req in REQUESTS:
        for probe in rewrite_probes(tok, req, ["", "I said so. "], req.target_new):
            ids = list(probe.pair.input_ids[:probe.position + 1])
            assert tok.decode(ids, skip_special_tokens=True).endswith(req.subject)
        probe = essence_probe(tok, req.subject)
        assert tok.decode(list(probe.pair.input_ids[:probe.position + 1]), skip_special_tokens=True).endswith(req.subject)
    assert last_token_before(tok, "Paris is nice", 5) == len(encode_prompt(tok, "Paris")) - 1


# ------------------------------------------------------------------------------------------ statistics


def test_mom2_matches_a_direct_computation(llama_model, llama_tok, corpus):
    cfg = StatsConfig(corpus=str(corpus), n_samples=4, max_length=32, batch_size=3)
    target = down_proj(llama_model, 0)
    cov = mom2(llama_model, llama_tok, [target], cfg, fingerprint="fp", progress=False)[0]
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()[:4]]
    keys = []
    handle = target.module.register_forward_pre_hook(lambda m, a: keys.append(a[0][0]))
    with torch.no_grad():
        for text in texts:
            ids = llama_tok(text, truncation=True, max_length=32, return_tensors="pt")["input_ids"]
            llama_model(input_ids=ids)
            keys[-1] = keys[-1][1:]  # without the BOS position
    handle.remove()
    k = torch.cat(keys).double()
    torch.testing.assert_close(cov.double(), k.T @ k / k.shape[0], atol=1e-5, rtol=1e-4)


def test_mom2_cache_hit_and_miss(llama_model, llama_tok, corpus, monkeypatch):
    cfg = StatsConfig(corpus=str(corpus), n_samples=3, max_length=16)
    target = down_proj(llama_model, 0)
    first = mom2(llama_model, llama_tok, [target], cfg, fingerprint="abc", progress=False)[0]
    path = stats_mod.stats_path("abc", target, cfg)
    assert path.is_file()

    def no_collect(*args, **kwargs):
        raise AssertionError("collected although cached")

    monkeypatch.setattr(stats_mod, "collect", no_collect)
    assert mom2(llama_model, llama_tok, [target], cfg, fingerprint="abc", progress=False)[0].equal(first)
    for other in (StatsConfig(corpus=str(corpus), n_samples=4, max_length=16), cfg):
        fingerprint = "abc" if other is not cfg else "another-model"
        with pytest.raises(AssertionError, match="collected although cached"):
            mom2(llama_model, llama_tok, [target], other, fingerprint=fingerprint, progress=False)


@pytest.mark.parametrize("name,content,match", [
    ("bad.jsonl", '{"text": "fine"}\n{"body": "no text"}\n', r"bad\.jsonl: line 2: missing field 'text'"),
    ("bad2.jsonl", '{"text": "fine"}\n{"text": 3}\n', r"bad2\.jsonl: line 2: field 'text' must be a string"),
    ("bad3.jsonl", '{"text": "fine"}\nnot json\n', r"bad3\.jsonl: line 2: not valid JSON"),
    ("bad.csv", "title,body\na,b\n", r"bad\.csv: no column 'text'"),
    ("bad.json", '[{"text": "a"}, "b"]', r"bad\.json: record 1: expected an object"),
])
def test_bad_corpus_errors_name_file_record_and_field(tmp_path, llama_model, llama_tok, name, content, match):
    path = tmp_path / name
    path.write_text(content)
    cfg = StatsConfig(corpus=str(path), n_samples=5)
    with pytest.raises(CorpusError, match=match):
        mom2(llama_model, llama_tok, [down_proj(llama_model, 0)], cfg, fingerprint="x", progress=False)


def test_missing_corpus_and_txt_corpus(tmp_path, llama_model, llama_tok):
    target = down_proj(llama_model, 0)
    with pytest.raises(CorpusError, match="not found"):
        mom2(llama_model, llama_tok, [target], StatsConfig(corpus=str(tmp_path / "nope.jsonl")), "x", False)
    txt = tmp_path / "c.txt"
    txt.write_text("Paris is the capital of France.\n\nThe quick brown fox.\n")
    cov = mom2(llama_model, llama_tok, [target], StatsConfig(corpus=str(txt), n_samples=5), "x", False)[0]
    assert cov.shape == (64, 64) and torch.isfinite(cov).all()


# ------------------------------------------------------------------------------------------ end to end


@pytest.mark.parametrize("model_name,tok_name", [("gpt2_model", "gpt2_tok"), ("llama_model", "llama_tok"),
                                                 ("gemma_model", "llama_tok")])
@pytest.mark.parametrize("method", ["rome", "memit", "alphaedit"])
def test_baseline_runs_touches_only_down_projections_and_restores(request, model_name, tok_name, method, corpus):
    model, tok = request.getfixturevalue(model_name), request.getfixturevalue(tok_name)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    applied = apply_method(method, model, tok, REQUESTS, progress=False, overrides=[
        f"stats.corpus={corpus}", "stats.n_samples=6", "stats.max_length=32", "value.steps=4",
        "value.context_lengths=[3]", "value.context_seeds=[The, I]"])
    assert applied.method == method and applied.seconds > 0 and applied.config["stats"]["n_samples"] == 6
    assert applied.touched and all(t.role == "down" for t in applied.touched)
    changed = {n for n, p in model.named_parameters() if not p.detach().equal(before[n])}
    assert changed == {t.name + ".weight" for t in applied.touched}
    assert applied.restore() is model
    assert all(p.detach().equal(before[n]) for n, p in model.named_parameters())


def test_rome_writes_the_optimized_value(gpt2_model, gpt2_tok, corpus):
    """After ROME, the edited layer outputs W k* + δ at the averaged key k* (δ: the optimized delta)."""
    from ftedit.baselines.common import context_prefixes, mean_keys
    from ftedit.baselines.rome import ROMEHyperParams, apply_rome_to_model

    hp = ROMEHyperParams(layer="1")
    hp.stats = StatsConfig(corpus=str(corpus), n_samples=6, max_length=32)
    hp.value.steps, hp.value.context_lengths = 4, (3,)
    prefixes = context_prefixes(gpt2_model, gpt2_tok, hp.value)
    key = mean_keys(gpt2_model, gpt2_tok, REQUESTS[:1], prefixes, 1)[:, 0]
    module = down_proj(gpt2_model, 1).module
    with torch.no_grad():
        before = module(key.float()[None])[0]
    snapshot, _, log = apply_rome_to_model(gpt2_model, gpt2_tok, REQUESTS[:1], hp, progress=False)
    with torch.no_grad():
        after = module(key.float()[None])[0]
    delta = log["deltas"][0]
    assert delta.norm() > 0
    torch.testing.assert_close(after - before, delta.float(), atol=1e-4, rtol=1e-3)
    snapshot.restore()


def test_value_objective_penalizes_kl_of_the_edited_distribution_from_the_original(llama_model, llama_tok):
    """The value's KL term is KL(edited || original) on "{subject} is a", as in ROME's equation 4 and code, not
    the reverse. Sharpened logits (LM head x 30) make the two directions differ well beyond the tolerance."""
    import torch.nn.functional as F

    from ftedit.baselines.common import ValueConfig, ValueProblem

    with torch.no_grad():
        llama_model.get_output_embeddings().weight.mul_(30.0)
    problem = ValueProblem(llama_model, llama_tok, REQUESTS[0], [""], 1)
    cfg = ValueConfig(steps=2, lr=1.0, weight_decay=0.0, kl_factor=1.0, clamp_norm_factor=1e4)
    delta, _, info = problem.solve(cfg)
    original = problem.log_probs(torch.zeros_like(delta))[2]
    edited = problem.log_probs(delta)[2]
    edited_first = (edited.exp() * (edited - original)).sum(-1).mean().item()
    original_first = (original.exp() * (original - edited)).sum(-1).mean().item()
    assert abs(edited_first - original_first) > 0.01 * edited_first  # ten times the tolerance below
    assert info["kl"] == pytest.approx(edited_first, rel=1e-3)
    assert F.kl_div(original, edited, log_target=True, reduction="batchmean").item() == \
        pytest.approx(edited_first, rel=1e-4)


def test_ft_l_keeps_weights_within_the_norm_bound(gpt2_model, gpt2_tok):
    before = {n: p.detach().clone() for n, p in gpt2_model.named_parameters()}
    applied = apply_method("ft-l", gpt2_model, gpt2_tok, REQUESTS, progress=False,
                           overrides=["train.epochs=3", "params.norm_constraint=1e-3", "train.lr=1e-2"])
    changed = [n for n, p in gpt2_model.named_parameters() if not p.detach().equal(before[n])]
    assert changed and all("c_proj" in n for n in changed)
    for n in changed:
        diff = (dict(gpt2_model.named_parameters())[n].detach() - before[n]).abs().max().item()
        assert 0 < diff <= 1e-3 + 1e-7
    applied.restore()
    assert method_names().count("ft-l") == 1 and get_method("ft-l").recipe  # FT-L is its recipe, once


def test_cli_edit_with_a_baseline_writes_model_and_manifest(tmp_path, llama_model, llama_tok, corpus, data_dir):
    from typer.testing import CliRunner

    from ftedit.commands import app

    base = tmp_path / "tiny-llama"
    llama_model.save_pretrained(base)
    llama_tok.save_pretrained(base)
    out = tmp_path / "edited"
    args = ["edit", "--model", str(base), "--data", str(data_dir / "fixtures/counterfact_rome_format_first5.json"),
            "--n", "2", "--recipe", "rome", "--set", f"stats.corpus={corpus}", "--set", "stats.n_samples=4",
            "--set", "value.steps=3", "--set", "value.context_lengths=[3]", "--out", str(out), "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"] == "rome" and manifest["config"]["value"]["steps"] == 3
    assert manifest["touched"]["modules"][0]["role"] == "down" and len(manifest["edits"]) == 2
    assert set(manifest["evaluation"]["post"]) >= {"efficacy", "edit_score"}
    assert (out / "model" / "model.safetensors").exists() and (out / "config.yaml").exists()


def test_hyperparameters_from_file_and_overrides_with_clear_errors(tmp_path):
    from ftedit.baselines.common import resolve_hparams, resolve_layers
    from ftedit.baselines.memit import MEMITHyperParams
    from ftedit.config import ConfigError

    path = tmp_path / "memit.yaml"
    path.write_text("mom2_update_weight: 100\nvalue: {steps: 7}\n")
    hp = resolve_hparams(MEMITHyperParams, path, ["stats.n_samples=50"])
    assert (hp.mom2_update_weight, hp.value.steps, hp.stats.n_samples) == (100.0, 7, 50)
    with pytest.raises(ConfigError, match="value.stepz"):
        resolve_hparams(MEMITHyperParams, None, ["value.stepz=3"])
    assert resolve_layers("frac:0.15:0.4", 18) == [3, 4, 5, 6, 7]
    assert resolve_layers("frac:0.3", 18) == [5]


def test_hf_corpus_is_streamed_by_name_and_config(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return iter([{"text": "one"}, {"text": ""}, {"text": "two"}, {"text": "three"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = StatsConfig(corpus="hf:wikitext@wikitext-103-raw-v1", n_samples=2)
    assert list(stats_mod.corpus_texts(cfg)) == ["one", "two"]
    assert calls == [("wikitext", "wikitext-103-raw-v1", "train", True)]
    assert "wikitext" in stats_mod.corpus_id(cfg)
