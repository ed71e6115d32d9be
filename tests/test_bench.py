import csv
import json

import pytest
from typer.testing import CliRunner

from ftedit import bench, methods
from ftedit.bench import (
    ABLATIONS,
    BenchError,
    BenchSettings,
    ablation_entries,
    parse_entry,
    plan,
    resolve_entries,
    resolved_config,
    run_bench,
)
from ftedit.commands import app


@pytest.fixture
def settings(tmp_path, gpt2_dir, data_dir):
    return BenchSettings(model=str(gpt2_dir), data=str(data_dir / "fixtures" / "counterfact_rome_format_first5.json"),
                         out=str(tmp_path / "bench"), n=3)


class Interrupted(BaseException):
    """Stands in for Ctrl-C or a kill: not an Exception, so the bench must not swallow it as a failed method."""


def _rows(payload):
    return {r["label"]: r for r in payload["rows"]}


def _counting_apply(monkeypatch, fail_on=None, exc=RuntimeError):
    calls = []
    real = methods.apply_method

    def apply(name, *args, **kwargs):
        calls.append(name)
        if name == fail_on:
            raise exc(f"{name} blew up")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(bench, "apply_method", apply)
    return calls


def test_entry_overrides_split_before_keys_only():
    e = parse_entry("mine=locft-bf:params.layers=15,16, train.lr=1e-4,augment.prefix_seeds=[The, A]")
    assert (e.label, e.method) == ("mine", "locft-bf")
    assert e.overrides == ["params.layers=15,16", "train.lr=1e-4", "augment.prefix_seeds=[The, A]"]
    assert parse_entry("plain=ft").overrides == []


@pytest.mark.parametrize("text, message", [
    ("locft-bf", "expected LABEL=METHOD"),
    ("x=", "expected LABEL=METHOD"),
    ("x=nope", "unknown method 'nope'"),
    ("x=locft-bf:train.lr", "expected key=value"),
    ("unedited=ft", "must be letters"),
    ("a/b=ft", "must be letters"),
])
def test_bad_entry_strings_name_the_entry(text, message):
    with pytest.raises(BenchError, match=message) as info:
        parse_entry(text)
    assert repr(text) in str(info.value)


def test_bad_entry_configs_fail_before_any_work(settings):
    with pytest.raises(BenchError, match="twice"):
        resolve_entries(["a=ft", "a=ft-m"], [])
    with pytest.raises(BenchError, match=r"'x=ft:train.nope=1'.*unknown config field 'train.nope'"):
        plan(settings, [parse_entry("x=ft:train.nope=1")], {"spec": settings.model})
    with pytest.raises(BenchError, match="--pool"):
        plan(settings, [parse_entry("r=ft-mask-para-rand")], {"spec": settings.model})


def test_cli_reports_a_bad_entry(settings):
    result = CliRunner().invoke(app, ["bench", "--data", settings.data, "--out", settings.out, "oops=nope"])
    assert result.exit_code == 2
    assert "unknown method 'nope'" in result.output
    assert "Traceback" not in result.output and "Usage:" not in result.output  # the one error format of #15


def _configs(name, overrides=()):
    s = BenchSettings(model="m", data="d", out="o", overrides=list(overrides))
    return [resolved_config(s, e) for e in ablation_entries(name)]


def test_paper000_entries_ablate_objective_then_augmentation_on_one_budget():
    cfgs = _configs("paper000")
    assert [c["objective"]["conditional"] for c in cfgs] == [False, True, True, True, True]
    assert [bool(c["augment"]["n_paraphrases"]) for c in cfgs] == [False, False, True, True, True]
    assert [bool(c["augment"]["n_random"]) for c in cfgs] == [False, False, False, True, True]
    assert [c["objective"]["dpo_weight"] > 0 for c in cfgs] == [False, False, False, False, True]
    assert all(c["augment"]["n_similar"] == 0 and c["mode"] == "mass" for c in cfgs)
    same = {(c["params"]["layers"], c["params"]["modules"], c["train"]["epochs"], c["train"]["batch_size"],
             c["train"]["lr"], c["train"]["optimizer"], c["train"]["pipeline"]) for c in cfgs}
    assert len(same) == 1


def test_global_overrides_reach_only_unpinned_fields():
    cfgs = _configs("paper000", ["augment.n_paraphrases=3", "augment.n_random=4", "augment.paraphrase_bank=8"])
    assert [c["augment"]["n_paraphrases"] for c in cfgs] == [0, 0, 3, 3, 3]
    assert [c["augment"]["n_random"] for c in cfgs] == [0, 0, 0, 4, 4]


def test_paper001_entries_change_one_thing_at_a_time_with_equal_passes_per_edit():
    df, bf1, bf, loc = _configs("paper001")
    assert [c["train"]["pipeline"] for c in (df, bf1, bf, loc)] == ["depth", "breadth", "breadth", "breadth"]
    assert [c["train"]["batch_size"] for c in (df, bf1, bf, loc)] == [1, 1, 32, 32]
    assert df["train"]["steps_per_edit"] == bf1["train"]["epochs"] == bf["train"]["epochs"] == loc["train"]["epochs"]
    assert df["params"] == bf1["params"] == bf["params"] != loc["params"]
    assert loc["params"]["layers"] == "-3" and loc["params"]["modules"] == "down"
    assert all(c["augment"]["n_paraphrases"] == c["augment"]["n_random"] == 0 for c in (df, bf1, bf, loc))
    assert sorted(ABLATIONS) == ["paper000", "paper001"]
    with pytest.raises(BenchError, match="paper000"):
        ablation_entries("paper999")


def test_bench_runs_entries_restores_between_them_and_writes_every_output(settings):
    entries = resolve_entries(["a1=locft-bf:train.epochs=3", "a2=locft-bf:train.epochs=3",
                               "b=ft-m:train.steps_per_edit=3"], [])
    payload = run_bench(settings, entries, isolate=False)
    rows = _rows(payload)
    assert list(rows) == ["unedited", "a1", "a2", "b"]
    assert all(r["status"] == "computed" for r in rows.values())
    # a2 starts from the restored model, so it reproduces a1 exactly; from a1's edited weights it would not.
    drop = ("seconds",)
    assert {k: v for k, v in rows["a1"]["metrics"].items() if k not in drop} == \
        {k: v for k, v in rows["a2"]["metrics"].items() if k not in drop}
    assert rows["a1"]["metrics"] != rows["unedited"]["metrics"]
    assert rows["b"]["config"]["train"]["pipeline"] == "depth"

    out = settings.out
    stored = json.loads((bench.Path(out) / "results.json").read_text())
    assert stored["config"]["n_requests"] == 3 and stored["model"]["identity"]["model_class"] == "GPT2LMHeadModel"
    table = (bench.Path(out) / "table.md").read_text()
    for label in rows:
        assert f"| {label} |" in table
    assert "depth 3 steps/edit" in table and "breadth 3 epochs" in table
    with (bench.Path(out) / "table.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["label"] for r in csv_rows] == list(rows)
    assert float(csv_rows[1]["efficacy"]) == pytest.approx(rows["a1"]["metrics"]["efficacy"])
    assert (bench.Path(out) / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (bench.Path(out) / "results").iterdir()) == \
        ["a1.json", "a2.json", "b.json", "unedited.json"]


def test_interrupted_run_keeps_finished_entries_and_rerun_recomputes_only_what_changed(settings, monkeypatch):
    entries = ["a=locft-bf:train.epochs=2", "b=ft-m:train.steps_per_edit=2"]
    calls = _counting_apply(monkeypatch, fail_on="ft-m", exc=Interrupted)
    with pytest.raises(Interrupted):
        run_bench(settings, resolve_entries(entries, []), isolate=False)
    results = bench.Path(settings.out) / "results"
    assert calls == ["locft-bf", "ft-m"] and sorted(p.name for p in results.iterdir()) == ["a.json", "unedited.json"]
    a_before = (results / "a.json").read_text()

    calls = _counting_apply(monkeypatch)
    payload = run_bench(settings, resolve_entries(entries, []), isolate=False)
    assert calls == ["ft-m"]
    assert {k: r["status"] for k, r in _rows(payload).items()} == \
        {"unedited": "reused", "a": "reused", "b": "computed"}
    assert (results / "a.json").read_text() == a_before

    calls = _counting_apply(monkeypatch)
    changed = [entries[0], "b=ft-m:train.steps_per_edit=2,train.lr=1e-3"]
    payload = run_bench(settings, resolve_entries(changed, []), isolate=False)
    assert calls == ["ft-m"]
    assert _rows(payload)["b"]["status"] == "computed" and _rows(payload)["a"]["status"] == "reused"
    assert "train.lr=1e-3" in _rows(payload)["b"]["overrides"]


def test_a_failing_entry_is_reported_and_not_stored(settings, monkeypatch):
    _counting_apply(monkeypatch, fail_on="ft-m")
    payload = run_bench(settings, resolve_entries(["b=ft-m", "a=locft-bf:train.epochs=1"], []), isolate=False)
    rows = _rows(payload)
    assert rows["b"]["status"] == "failed" and "blew up" in rows["b"]["error"]
    assert rows["a"]["status"] == "computed"
    assert not (bench.Path(settings.out) / "results" / "b.json").exists()
    assert "| b | ft-m | failed |" in (bench.Path(settings.out) / "table.md").read_text()


def test_isolated_entries_run_in_their_own_process_with_their_own_peak_memory(settings):
    settings.n = 2
    payload = run_bench(settings, resolve_entries(["a=locft-bf:train.epochs=1"], []), isolate=True)
    rows = _rows(payload)
    for row in rows.values():
        assert row["status"] == "computed"
        assert "fresh process" in row["memory"]["measured"]
        assert row["memory"]["rss_peak_mb"] >= row["memory"]["rss_after_load_mb"] > 0
    assert rows["a"]["touched"] and rows["a"]["metrics"]["efficacy"] is not None
    table = bench.table_rows(payload)
    assert all(r["peak_rss_mb"] for r in table)


def test_generation_metrics_are_optional_and_part_of_the_key(settings):
    entries = resolve_entries(["a=locft-bf:train.epochs=1"], [])
    plain = {p.entry.label: p.hash for p in plan(settings, entries, {"spec": settings.model})}
    settings.generation = {"max_out_len": 12, "top_k": 5, "seed": 0, "batch_size": 4}
    with_fluency = {p.entry.label: p.hash for p in plan(settings, entries, {"spec": settings.model})}
    assert plain.keys() == with_fluency.keys() and not set(plain.values()) & set(with_fluency.values())
    settings.n = 2
    rows = _rows(run_bench(settings, entries, isolate=False))
    assert all("fluency" in r["metrics"] for r in rows.values())


def test_bench_passes_the_model_identity_so_auto_layers_find_a_shipped_location(settings, monkeypatch):
    seen = []
    real = methods.apply_method

    def apply(name, *args, **kwargs):
        seen.append(kwargs.get("identity"))
        return real(name, *args, **kwargs)

    monkeypatch.setattr(bench, "apply_method", apply)
    run_bench(settings, resolve_entries(["a=locft-bf:train.epochs=1"], []), isolate=False)
    assert seen and all(getattr(i, "fingerprint", "") for i in seen)
