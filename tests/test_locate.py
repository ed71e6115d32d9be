import json

import pytest
import torch
from typer.testing import CliRunner

from ftedit import locate
from ftedit.commands import app
from ftedit.config import ConfigError, LocateConfig, resolve_config
from ftedit.data.requests import EditRequest
from ftedit.editor import edit
from ftedit.locate import Candidate, candidates_for, halving_budgets, sweep, write_report
from ftedit.methods import apply_method, apply_spec
from ftedit.outputs import build_manifest
from ftedit.registry import ApplyContext, get_method
from test_editor import REQUESTS


def _config(**locate_over):
    over = {"train": {"epochs": 9, "batch_size": 3, "lr": 1e-2},
            "locate": {"layers": "-2:", "layer_stride": 1, "modules": "down,attn", "n_edits": 3, **locate_over}}
    return resolve_config("locft-bf", overrides=over)


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_candidates_follow_the_model_structure(llama_model, gpt2_model):
    cfg = LocateConfig()
    assert len(candidates_for(llama_model, cfg)) == 3 * 5
    gpt2 = candidates_for(gpt2_model, cfg)  # GPT-2 has no gate projection
    assert len(gpt2) == 3 * 4 and not any(c.module == "gate" for c in gpt2)
    cfg.layer_stride = 2
    assert sorted({c.layer for c in candidates_for(llama_model, cfg)}) == [0, 2]


def test_halving_budgets_grow_by_eta_and_end_at_the_full_budget():
    assert halving_budgets(25, 3, 3) == [3, 8, 25]
    assert halving_budgets(9, 3, 2) == [3, 9]
    assert halving_budgets(1, 3, 3) == [1]


def test_exhaustive_sweep_tries_every_candidate_and_restores_the_model(llama_model, llama_tok):
    before = _weights(llama_model)
    result = sweep(llama_model, llama_tok, REQUESTS, _config(strategy="exhaustive"), progress=False)
    assert {t.candidate for t in result.trials} == {Candidate(1, "down"), Candidate(1, "attn"),
                                                    Candidate(2, "down"), Candidate(2, "attn")}
    assert all(t.epochs == 9 for t in result.trials)
    best = max(result.trials, key=lambda t: t.metrics["soft_edit_score"])
    assert result.best == best.candidate and result.best_metrics() == best.metrics
    assert max(t.metrics["efficacy"] for t in result.trials) > 50  # the trials really edit
    assert all(torch.equal(p, before[n]) for n, p in llama_model.named_parameters())


def test_halving_gives_the_full_budget_only_to_the_best(llama_model, llama_tok, monkeypatch):
    cfg = _config(strategy="halving", eta=2, rungs=2, modules="down,up,attn")
    result = sweep(llama_model, llama_tok, REQUESTS, cfg, progress=False)
    first = [t for t in result.trials if t.epochs == 4]  # round(9 / 2)
    second = [t for t in result.trials if t.epochs == 9]
    assert len(first) == 6 and len(second) == 3
    top = sorted(first, key=locate.rank_key, reverse=True)[:3]
    assert {t.candidate for t in second} == {t.candidate for t in top}
    assert result.best in {t.candidate for t in second}


def test_results_are_cached_per_model_and_settings(llama_model, llama_tok, monkeypatch):
    cfg = _config(strategy="exhaustive", modules="down")
    calls = []
    real_trial = locate.run_trial
    monkeypatch.setattr(locate, "run_trial", lambda *a, **k: calls.append(1) or real_trial(*a, **k))

    def run(requests, **kw):
        return sweep(llama_model, llama_tok, requests, cfg, progress=False, model_fingerprint="m1", **kw)

    first = run(REQUESTS)
    assert len(calls) == 2 and not first.cached
    again = run(REQUESTS)
    assert again.cached and again.best == first.best and len(calls) == 2
    run(REQUESTS[:2])  # other edits: a new search
    assert len(calls) == 4
    assert not sweep(llama_model, llama_tok, REQUESTS, cfg, progress=False, model_fingerprint="m2").cached


def test_layers_auto_edits_at_the_chosen_location_and_records_it(llama_model, llama_tok):
    cfg = _config(strategy="exhaustive")
    cfg.params.layers = "auto"
    context = ApplyContext(progress=False, model_fingerprint="m2")
    result = apply_spec(get_method("locft-bf"), cfg, llama_model, llama_tok, REQUESTS, context)
    loc = result.location
    assert loc["source"] == "search" and loc["n_candidates"] == 4
    assert {t.layer for t in result.touched} == {loc["layer"]} and "locate" in result.phase_seconds
    expected_roles = {"attn": {"q", "k", "v", "o"}, "down": {"down"}}[loc["module"]]
    assert {t.role for t in result.touched} == expected_roles
    manifest = build_manifest(result, REQUESTS, {"spec": "tiny"})
    assert manifest["touched"]["location"] == loc and manifest["config"]["params"]["layers"] == str(loc["layer"])
    assert cfg.params.layers == "auto"  # the caller's config is not mutated


def test_report_files(tmp_path, llama_model, llama_tok):
    result = sweep(llama_model, llama_tok, REQUESTS, _config(strategy="halving", eta=2, rungs=2), progress=False)
    write_report(tmp_path, result, {"spec": "tiny"}, "tiny")
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert data["best"] == {"layer": result.best.layer, "module": result.best.module}
    assert len(data["trials"]) == len(result.trials)
    assert (tmp_path / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "sweep.md").read_text().count("\n") == len(result.trials) + 2
    assert (tmp_path / "sweep.csv").read_text().startswith("layer,module,epochs,efficacy")


def test_edit_refuses_an_unresolved_auto_location(llama_model, llama_tok):
    cfg = _config()
    assert cfg.params.layers == "auto"
    with pytest.raises(ValueError, match="resolve_location"):
        edit(llama_model, llama_tok, REQUESTS, cfg, progress=False)


def test_locft_bf_chooses_its_location_among_down_and_up_projections(llama_model, llama_tok):
    result = apply_method("locft-bf", llama_model, llama_tok, REQUESTS, overrides=["train.epochs=3"],
                          progress=False)
    assert result.location["source"] == "search" and result.location["n_candidates"] == 2 * 2  # layers 2, 0
    assert result.location["module"] in ("down", "up") and result.location["layer"] in (0, 2)


def test_bad_locate_settings_are_clear_errors():
    with pytest.raises(ConfigError, match="locate.strategy"):
        resolve_config("locft-bf", overrides=["locate.strategy=random"])
    with pytest.raises(ConfigError, match="eta"):
        resolve_config("locft-bf", overrides=["locate.eta=1"])
    with pytest.raises(ConfigError, match="locate.rank"):
        resolve_config("locft-bf", overrides=["locate.rank=median"])


def test_cli_locate_both_strategies(tmp_path, llama_model, llama_tok, data_dir):
    path = tmp_path / "tiny"
    llama_model.save_pretrained(path)
    llama_tok.save_pretrained(path)
    out = tmp_path / "sweep"
    args = ["locate", "--model", str(path), "--data", str(data_dir / "fixtures/counterfact_rome_format_first5.json"),
            "--n", "3", "--strategy", "both", "--set", "train.epochs=4", "--set", "train.lr=1e-2",
            "--set", "locate.modules=down,up", "--set", "locate.layers=-2:", "--set", "locate.eta=2",
            "--set", "locate.rungs=2", "--out", str(out), "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "recommended: --set params.layers=" in result.output and "halving picked" in result.output
    for name in ("halving", "exhaustive"):
        assert (out / name / "heatmap.png").exists() and (out / name / "sweep.json").exists()
    bad = CliRunner().invoke(app, args[:-3] + ["--strategy", "random", "--out", str(out), "--no-progress"])
    assert bad.exit_code == 2 and "--strategy" in bad.output


def test_auto_searches_on_the_calibration_set_never_on_the_edits(llama_model, llama_tok, monkeypatch, tmp_path):
    from ftedit.calibration import calibration_path
    from ftedit.data.loaders import load_requests

    # no probes, no subject, no true answer; prompts that the calibration set does not hold
    bare = [EditRequest("Paris is the capital of", "", "Italy"), EditRequest("The quick brown fox jumps over the",
                                                                              "", "lazy cat")]
    seen = []
    real_trial = locate.run_trial
    monkeypatch.setattr(locate, "run_trial", lambda m, t, reqs, *a: seen.extend(reqs) or real_trial(m, t, reqs, *a))
    cfg = _config(strategy="exhaustive")
    cfg.params.layers = "auto"
    spec, context = get_method("locft-bf"), ApplyContext(progress=False, model_fingerprint="m3")
    first = apply_spec(spec, cfg, llama_model, llama_tok, bare, context)
    first.restore()
    calibration = load_requests(calibration_path()).requests
    assert seen and set(seen) <= set(calibration)
    edit_prompts = {r.prompt for r in bare}
    assert not edit_prompts & {p for r in seen for p in (r.prompt, *r.paraphrase_prompts)}
    loc = first.location
    assert loc["source"] == "search" and loc["calibration"]["file"] == calibration_path().name
    assert {t.layer for t in first.touched} == {loc["layer"]} and loc["trials"]
    n_trials = len(seen)
    again = apply_spec(spec, cfg, llama_model, llama_tok, REQUESTS, context)  # other edits
    assert again.location["source"] == "cached" and len(seen) == n_trials
    assert (again.location["layer"], again.location["module"]) == (loc["layer"], loc["module"])


def test_shipped_results_are_found_by_gguf_file_and_settings(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from ftedit.calibration import calibration_sha256

    cfg = resolve_config("locft-bf")
    key = locate.settings_key(locate.search_settings(cfg), calibration_sha256())
    model_dir = tmp_path / "dequantized"
    model_dir.mkdir()
    (model_dir / "ftedit_source.json").write_text(json.dumps({"sha256": "abc"}))
    identity = SimpleNamespace(source="bundled", name_or_path=str(model_dir))
    entry = {"model": "demo", "search": {"best": {"layer": 1, "module": "down"}}}
    monkeypatch.setattr(locate, "shipped_locations", lambda: {f"abc:{key}": entry})
    assert locate.shipped_result(identity, key) == entry
    assert locate.shipped_result(identity, "other-settings") is None
    assert locate.shipped_result(SimpleNamespace(source="local", name_or_path=str(model_dir)), key) is None
    # augmentation and the recipe's name do not change the search; its training does
    assert locate.search_settings(resolve_config("locft-bf", overrides=["augment.n_random=5"])) == \
        locate.search_settings(cfg)
    assert locate.search_settings(resolve_config("locft-bf", overrides=["train.lr=1e-3"])) != \
        locate.search_settings(cfg)


def test_shipped_locations_match_the_bundled_models_and_settings():
    from ftedit.calibration import CALIBRATION_FILE, calibration_sha256, resource

    shipped = locate.shipped_locations()
    shipped_set = calibration_sha256(str(resource(CALIBRATION_FILE)))  # not the tests' small calibration set
    key = locate.settings_key(locate.search_settings(resolve_config("locft-bf")), shipped_set)
    assert "demo" in {e["model"] for e in shipped.values()}  # `ftedit demo` needs no search
    for name, entry in shipped.items():
        assert name == f"{entry['gguf_sha256']}:{key}", f"shipped {entry['model']} is stale: rerun its search"
        assert entry["search"]["best"]["module"] in ("down", "up")


def _record(rewrite, paraphrase, neighborhood):
    def kind(pairs):
        return {"prompts": [{"nll_new": n, "nll_true": t} for n, t in pairs]}

    return {"rewrite": kind(rewrite), "paraphrase": kind(paraphrase), "neighborhood": kind(neighborhood)}


def test_soft_scores_are_sigmoid_margins_averaged_like_the_rates():
    import math

    records = [_record([(1.0, 3.0)], [(2.0, 2.0), (4.0, 2.0)], [(5.0, 1.0)]),
               _record([(3.0, 1.0)], [(1.0, 2.0)], [(1.0, 1.5)])]
    s = locate.soft_scores(records)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert s["soft_efficacy"] == pytest.approx(100 * (sig(2) + sig(-2)) / 2)
    assert s["soft_generalization"] == pytest.approx(100 * ((sig(0) + sig(-2)) / 2 + sig(1)) / 2)
    assert s["soft_locality"] == pytest.approx(100 * (sig(4) + sig(-0.5)) / 2)  # neighbors: the true answer wins
    parts = [s[k] for k in ("soft_efficacy", "soft_generalization", "soft_locality")]
    assert s["soft_edit_score"] == pytest.approx(3 / sum(1 / p for p in parts))
    with pytest.raises(ValueError, match="neighborhood"):
        locate.soft_scores([{**records[0], "neighborhood": None}])


def test_soft_rank_separates_trials_the_0_1_rates_tie():
    # Neither trial flips a prompt (same discrete scores); the one whose margins moved toward the edit ranks first.
    still = locate.soft_scores([_record([(3.0, 1.0)], [(3.0, 1.0)], [(2.0, 1.0)])])
    moved = locate.soft_scores([_record([(1.2, 1.0)], [(1.5, 1.0)], [(2.0, 1.0)])])
    discrete = {"efficacy": 0.0, "generalization": 0.0, "locality": 100.0, "edit_score": 0.0}
    a = locate.Trial(Candidate(1, "down"), 3, {**discrete, **still}, 1.0)
    b = locate.Trial(Candidate(2, "down"), 3, {**discrete, **moved}, 1.0)
    assert max([a, b], key=locate.rank_key) is b
    assert max([a, b], key=lambda t: locate.rank_key(t, "discrete")) is a  # ties go to the earlier layer


def test_cli_locate_calibration_runs_the_search_of_layers_auto(tmp_path, llama_dir):
    out = tmp_path / "cal"
    args = ["locate", "--calibration", "--model", str(llama_dir), "--set", "train.epochs=2", "--set",
            "locate.layers=-2:", "--set", "locate.modules=down", "--out", str(out), "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "sweep.json").read_text())
    assert data["strategy"] == "halving" and data["n_edits"] == 5  # the (tests') calibration set, all 5 records
    assert "recommended: --set params.layers=" in result.output
    both = CliRunner().invoke(app, args + ["--data", "x.json"])
    assert both.exit_code != 0 and "either --data" in both.output
